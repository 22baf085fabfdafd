import pytest
import torch

from model.config import NVAEConfig, apply_overrides, get_preset


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-API server over HTTP on loopback (moto's server mode), for the S3 clients MinIO speaks to.

    Yields a dict with `endpoint_url`, `access_key`, `secret_key`, `region` and `make_bucket(name)`.
    The server is stopped at the end of the session.
    """
    import socket

    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    info = {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "access_key": "testing-access-key",
        "secret_key": "testing-secret-key",
        "region": "us-east-1",
    }

    def make_bucket(name: str) -> str:
        client = boto3.client(
            "s3",
            endpoint_url=info["endpoint_url"],
            aws_access_key_id=info["access_key"],
            aws_secret_access_key=info["secret_key"],
            region_name=info["region"],
        )
        client.create_bucket(Bucket=name)
        return name

    info["make_bucket"] = make_bucket
    try:
        yield info
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Endpoint and credentials through the environment only, as in a pod."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["access_key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret_key"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_server["region"])
    return s3_server


FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="session")
def fmnist64(tmp_path_factory):
    """The first 64 images of each split of the real Fashion-MNIST, prepared once by `nvae prepare`'s
    library function; tests only read it."""
    from pathlib import Path

    from data.prepare import prepare

    if not Path(FASHION_MNIST).exists():
        pytest.skip(f"{FASHION_MNIST} is not available (apt-get install dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("prepared") / "fmnist64"
    prepare("fashion-mnist", FASHION_MNIST, out, limit=64)
    return out


def tiny_config(**overrides) -> NVAEConfig:
    """A few-thousand-parameter NVAE with every mechanism on: two scales, flows, DMoL."""
    base = {
        "channels": 8,
        "z_channels": 4,
        "groups": 2,
        "num_scales": 2,
        "cells_enc": 1,
        "cells_dec": 1,
        "pre_blocks": 1,
        "pre_cells": 1,
        "post_blocks": 1,
        "post_cells": 1,
        "num_nf": 1,
        "data_size": 12,
        "image_size": 16,
    }
    base.update(overrides)
    return apply_overrides(get_preset("fmnist-cpu"), base)


@pytest.fixture
def tiny_cfg() -> NVAEConfig:
    return tiny_config()


@pytest.fixture
def make_tiny():
    """Factory for tiny configs with overrides (test modules cannot import conftest)."""
    return tiny_config
