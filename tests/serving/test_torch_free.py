"""The serving package runs from the slim image's dependencies: no torch, nothing of the project's other
packages (the layering test checks the imports; this one runs them)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_serving_imports_and_draws_noise_with_torch_unimportable(tmp_path):
    code = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "model", "data", "training", "inference", "cli", "components"}:
            raise ImportError(f"{name} is not in the serving image")
sys.meta_path.insert(0, Refuse())
import numpy as np
import serving.server, serving.app, serving.protocol, serving.batching, serving.transport, serving.config
import serving.onnx_sampler, serving.kserve_model, kserve
from serving.onnx_sampler import OnnxSampler
s = OnnxSampler.__new__(OnnxSampler)
s.latent_shapes, s.uniforms = [(2, 4, 4), (2, 8, 8)], [("u_pix", (1, 16, 16))]
feeds = s.noise(3, seed=7)
assert feeds["eps_0"].dtype == np.float32 and feeds["eps_1"].shape == (3, 2, 8, 8)
assert feeds["u_pix"].shape == (3, 1, 16, 16) and 0 <= feeds["u_pix"].min() < feeds["u_pix"].max() < 1
assert "torch" not in sys.modules
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
