"""The sampler as a kserve.Model on kserve.ModelServer (`python -m serving --server kserve`), in its own
process on loopback: REST and gRPC v2 give the sampler's images, bad input is 4xx, the token guards infer."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from background_server import wait_ready
from oip_cases import BAD, body
from tiny import TINY

from inference.export import export_model, randomize_bn
from model.config import apply_overrides, get_preset
from model.network import NVAE
from serving.onnx_sampler import OnnxSampler
from serving.protocol import to_uint8_nhwc

TOKEN = "kserve-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
INFER = "/v2/models/nvae-decoder/infer"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def onnx(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = NVAE(apply_overrides(get_preset("fmnist-cpu"), TINY))
    randomize_bn(model)
    path = tmp_path_factory.mktemp("kserve") / "decoder.onnx"
    export_model(model, path, exporter="torchscript", verify=False)
    return path


@pytest.fixture(scope="module")
def kserve_server(onnx, tmp_path_factory):
    port, grpc_port = _free_port(), _free_port()
    log = tmp_path_factory.mktemp("kserve-log") / "server.log"
    cmd = [sys.executable, "-m", "serving", "--server", "kserve", "--onnx", str(onnx), "--port", str(port),
           "--grpc-port", str(grpc_port), "--max-images", "32", "--shutdown-timeout", "2"]  # fmt: skip
    env = {**os.environ, "NVAE_SERVE_TOKEN": TOKEN}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).parents[2]
        )
    url = f"http://127.0.0.1:{port}"
    if not wait_ready(url, proc, timeout_s=90):
        proc.kill()
        pytest.fail(f"kserve model server did not start:\n{log.read_text()[-3000:]}")
    yield {"url": url, "grpc": f"127.0.0.1:{grpc_port}", "proc": proc, "log": log}
    if proc.poll() is None:
        proc.kill()


def test_rest_infer_gives_the_samplers_images(kserve_server, onnx):
    with httpx.Client(base_url=kserve_server["url"], timeout=30, headers=AUTH) as c:
        r = c.post(INFER, json=body(n=3, temperature=0.7, seed=11))
        assert r.status_code == 200, r.text
        answer = r.json()
        (out,) = answer["outputs"]
        assert out["name"] == "images" and out["datatype"] == "UINT8" and out["shape"] == [3, 28, 28, 1]
        got = np.asarray(out["data"], np.uint8).reshape(out["shape"])
        want = to_uint8_nhwc(OnnxSampler(onnx, "cpu").sample(3, 0.7, 11))
        assert np.abs(got.astype(int) - want).max() <= 1
        assert answer["parameters"]["seed"] == 11
        meta = c.get("/v2/models/nvae-decoder").json()
        assert [i["name"] for i in meta["inputs"]] == ["n", "temperature", "seed"]


def test_infer_needs_the_token(kserve_server):
    r = httpx.post(kserve_server["url"] + INFER, json=body(), timeout=30)
    assert r.status_code == 401
    r = httpx.post(
        kserve_server["url"] + INFER, json=body(), timeout=30, headers={"Authorization": "Bearer no"}
    )
    assert r.status_code == 401


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_4xx_never_5xx(kserve_server, case):
    payload = BAD[case]
    with httpx.Client(base_url=kserve_server["url"], timeout=30, headers=AUTH) as c:
        if isinstance(payload, bytes):
            r = c.post(INFER, content=payload, headers={"content-type": "application/json"})
        else:
            r = c.post(INFER, json=payload)
    assert 400 <= r.status_code < 500, (case, r.status_code, r.text[:300])


def test_grpc_infer_gives_the_same_images_as_rest(kserve_server):
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    def tensor(name, datatype, **contents):
        return pb.ModelInferRequest.InferInputTensor(
            name=name, datatype=datatype, shape=[1], contents=pb.InferTensorContents(**contents)
        )

    request = pb.ModelInferRequest(
        model_name="nvae-decoder",
        inputs=[
            tensor("n", "INT64", int64_contents=[2]),
            tensor("temperature", "FP32", fp32_contents=[0.7]),
            tensor("seed", "INT64", int64_contents=[5]),
        ],
    )
    with grpc.insecure_channel(kserve_server["grpc"]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError):  # no token: refused
            stub.ModelInfer(request, timeout=30)
        reply = stub.ModelInfer(request, timeout=30, metadata=[("authorization", f"Bearer {TOKEN}")])
        bad = pb.ModelInferRequest(
            model_name="nvae-decoder", inputs=[tensor("n", "INT64", int64_contents=[0])]
        )
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(bad, timeout=30, metadata=[("authorization", f"Bearer {TOKEN}")])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    (out,) = reply.outputs
    raw = reply.raw_output_contents[0] if reply.raw_output_contents else bytes(out.contents.uint_contents)
    via_grpc = (
        np.frombuffer(raw, np.uint8) if reply.raw_output_contents else np.asarray(out.contents.uint_contents)
    )
    r = httpx.post(
        kserve_server["url"] + INFER, json=body(n=2, temperature=0.7, seed=5), headers=AUTH, timeout=30
    )
    via_rest = np.asarray(r.json()["outputs"][0]["data"], np.uint8)
    assert list(out.shape) == [2, 28, 28, 1] and np.array_equal(via_grpc.ravel(), via_rest)


def test_sigterm_stops_the_model_server(kserve_server):  # last: it ends the module's server
    proc = kserve_server["proc"]
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)
    assert time.monotonic() - start < 10
