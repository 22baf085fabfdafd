"""The NVAE network and its objective: config and presets, layers, cells, flows, distributions, network,
objective, regularizers, the checkpoint format and prior sampling. Imports torch and `common` only."""
