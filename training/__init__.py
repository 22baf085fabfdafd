"""Training: one run as `nvae train` asks for it and the torchrun launcher (`run`), the loop in named phases
with the step it repeats (`train`: AdaMax with warm-up and cosine decay, KL warm-up, mixed precision,
checkpoints and resume), torchrun/DDP helpers (`distributed`), checkpoint stores, local and S3 (`storage`),
and metrics logging (`metrics`). Imports `model`, `data` and `common`."""
