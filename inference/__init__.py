"""Using a trained checkpoint: loading it for inference (`checkpoints`), IW evaluation (`evaluate`), BN
readjustment (`readjust`), sampling to files, fixed scales, reconstructions and nearest neighbours (`sample`)
and ONNX export (`export`). Imports `model`, `data` and `common`."""
