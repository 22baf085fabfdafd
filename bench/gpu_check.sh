#!/usr/bin/env bash
# Every CUDA path of the project in one run (< 8 minutes on one H200): the CUDA libraries torch, DALI and
# onnxruntime each load, fp32/bf16/fp16 training steps, the gpu-marked tests, DALI GPU preparation vs CPU,
# onnxruntime-gpu parity and ms/image, the FID Inception network on CUDA.
# Usage, on a machine with a CUDA GPU: bash bench/gpu_check.sh OUTDIR
#   -> OUTDIR/gpu_check.json, OUTDIR/cuda_libs.json, OUTDIR/*.log
# Wheels the machine lacks (nvidia-dali-cuda130, onnxruntime-gpu, ...) are installed from .whl/ when it holds them.
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" 2>&1 || true

# Which CUDA libraries each of torch, DALI and onnxruntime loads once it has initialised CUDA (and run a cuBLAS
# and a cuDNN op where it has them): the paths in /proc/self/maps, each with its soname, its real file and the
# wheel it comes from. Each package in its own process, so the maps are its own.
cat > "$OUT/cuda_libs.py" <<'PY'
"""python cuda_libs.py torch|dali|onnxruntime OUT   (one package's CUDA libraries -> OUT/cuda_libs-PKG.json)
python cuda_libs.py summary OUT                       (the three side by side -> OUT/cuda_libs.json)"""

import json
import os
import re
import sys
from importlib import metadata
from pathlib import Path

LIB = re.compile(r"/(lib(?:cuda|cudart|cublas|cublasLt|cudnn\w*|cufft|curand|cusolver|cusparse\w*|nvrtc\w*|"
                 r"nvJitLink|nccl|nvshmem\w*|nvjpeg\w*|nvimgcodec\w*|nvcomp\w*|onnxruntime_providers_cuda)"
                 r"\.so[.\d]*)$")


def torch_init():
    import torch

    x = torch.randn(8, 1, 16, 16, device="cuda")
    torch.nn.functional.conv2d(x, torch.randn(4, 1, 3, 3, device="cuda"))  # cuDNN
    (x.flatten(1) @ x.flatten(1).T).sum().item()  # cuBLAS
    return {"version": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}


def dali_init():
    import nvidia.dali.backend as backend
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=2, num_threads=1, device_id=0)
    def pipe():
        return fn.random.uniform(shape=[16], range=[0.0, 1.0]).gpu()

    p = pipe()
    p.build()
    p.run()
    import nvidia.dali

    version = getattr(backend, "GetCudaVersion", lambda: None)()
    return {"version": nvidia.dali.__version__, "cuda": version}


def onnxruntime_init():
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 1, 3, 3], [0.1] * 18)
    m = helper.make_tensor("m", TensorProto.FLOAT, [6, 6], [0.1] * 36)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("MatMul", ["c", "m"], ["y"])]
    graph = helper.make_graph(nodes, "probe", [x], [y], [w, m])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
    session.run(None, {"x": np.ones((1, 1, 8, 8), np.float32)})
    return {"version": ort.__version__, "providers": session.get_providers(), "onnx": onnx.__version__}


def owners():
    """Real path of each shared library a wheel installs -> 'distribution version'."""
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"] or ""
        if not re.match(r"(nvidia-|cuda-|torch$|onnxruntime)", name):
            continue
        for f in dist.files or ():
            if ".so" in f.name:
                found[os.path.realpath(dist.locate_file(f))] = f"{name} {dist.version}"
    return found


def probe(package, out):
    report = {"package": package}
    try:
        report["init"] = {"torch": torch_init, "dali": dali_init, "onnxruntime": onnxruntime_init}[package]()
    except Exception as e:  # recorded, not fatal: what loaded before the failure is still listed
        report["error"] = f"{type(e).__name__}: {e}"
    wheels, libs = owners(), {}
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split(maxsplit=5)[-1] if len(line.split()) >= 6 else ""
        if (match := LIB.search(path)) and path not in libs:
            real = os.path.realpath(path)
            libs[path] = {"soname": match.group(1), "file": os.path.basename(real), "wheel": wheels.get(real, "")}
    report["libraries"] = [{"path": p, **v} for p, v in sorted(libs.items())]
    (out / f"cuda_libs-{package}.json").write_text(json.dumps(report, indent=1))
    print(f"== {package}: {json.dumps(report.get('init', report.get('error')))}")
    for p, v in sorted(libs.items()):
        print(f"   {v['soname']:34s} {v['file']:34s} {v['wheel'] or '(not from a wheel)'}  {p}")


def summary(out):
    reports = [json.loads((out / f"cuda_libs-{p}.json").read_text()) for p in ("torch", "dali", "onnxruntime")
               if (out / f"cuda_libs-{p}.json").exists()]
    runtimes = {r["package"]: sorted({lib["soname"] for lib in r["libraries"] if lib["soname"].startswith("libcudart")})
                for r in reports}
    majors = {m.group(1) for names in runtimes.values() for n in names if (m := re.search(r"\.so\.(\d+)", n))}
    verdict = f"one CUDA runtime major: {majors.pop()}" if len(majors) == 1 else f"CUDA runtime majors: {majors}"
    (out / "cuda_libs.json").write_text(json.dumps({"libcudart": runtimes, "verdict": verdict,
                                                    "reports": reports}, indent=1))
    print(f"== libcudart per package: {runtimes}; {verdict}")


if __name__ == "__main__":
    what, out = sys.argv[1], Path(sys.argv[2])
    summary(out) if what == "summary" else probe(what, out)
PY
for pkg in torch dali onnxruntime; do
  timeout 90 $PY "$OUT/cuda_libs.py" "$pkg" "$OUT" 2>&1 | tee -a "$OUT/cuda_libs.log"
done
$PY "$OUT/cuda_libs.py" summary "$OUT" 2>&1 | tee -a "$OUT/cuda_libs.log"
timeout 470 $PY bench/gpu_check.py --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log"
