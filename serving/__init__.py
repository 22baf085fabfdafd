"""The ONNX sampler (onnxruntime) and its Open Inference Protocol v2 servers. No torch, and nothing of the
project but `common` (errors, argument types, atomic files, CPU facts), so the serving image can install it
alone.

Modules, by job:
- `onnx_sampler`: n images at a temperature from an exported decoder (`OnnxSampler`), the noise drawn as
  the PyTorch backend draws it;
- `config`: the service's limits (`ServeConfig`), one flag of `nvae serve` each;
- `protocol`: infer request parsing and validation, image encodings, bearer-token check (both servers);
- `batching`: request batching (`Batcher`) and the Prometheus metrics (`ServerMetrics`);
- `app`: the built-in server's FastAPI app (endpoints, authentication, error answers);
- `transport`: uvicorn's h11 protocol with header and shutdown deadlines (`BackgroundServer` runs it in a
  thread);
- `server`: `serve`, which puts the sampler, the app and the transport together;
- `kserve_model`: the sampler as a `kserve.Model` for KServe clusters;
- `__main__`: `python -m serving` (and `nvae serve`), which picks the built-in server or KServe's.
"""
