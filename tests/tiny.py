"""The tiny NVAE the tests train and export: every mechanism on, a few thousand parameters.

Importable from any test module (pytest's `pythonpath` includes tests/).
"""

# Overrides of the fmnist-cpu preset (28x28 data, two latent scales, a flow pair, DMoL).
TINY = {
    "channels": 8,
    "z_channels": 4,
    "groups": 2,
    "cells_enc": 1,
    "cells_dec": 1,
    "pre_cells": 1,
    "post_cells": 1,
}
# The same as `--set` arguments, with fewer mixture components for subprocess runs.
TINY_SET = [f"{k}={v}" for k, v in TINY.items()] + ["num_mix=2"]
