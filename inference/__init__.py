"""Using a trained checkpoint: IW evaluation, BN readjustment, sampling (fixed scales, reconstructions,
nearest neighbours) and ONNX export. Imports `model`, `data` and `common`."""
