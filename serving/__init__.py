"""The ONNX sampler (onnxruntime) and its Open Inference Protocol server. Imports nothing of the project
but `common.errors`, so the serving image can install it alone."""
