"""The DVC remote against a real S3-API server (SeaweedFS on 127.0.0.1, the `s3_server` fixture), and the
`minio` SDK against the same server: push/pull restores bytes exactly, and a failed or corrupted transfer
never turns into a good-looking file.

What is tested: an interrupted upload leaves no object (S3 writes are atomic per object; the SDK aborts an
unfinished multipart upload); DVC re-hashes what it pulls (`verify = true` in .dvc/config), so an object
corrupted or truncated in the store fails the pull instead of landing as good data; and a body damaged in
flight, by a proxy that flips a byte, is refused by the store for the clients the product uploads with
(boto3 and DVC send a CRC32 of the body, which SeaweedFS checks)."""

from __future__ import annotations

import configparser
import hashlib
import io
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from .conftest import REPO, run, tool, tool_env

pytestmark = pytest.mark.usefixtures("s3_server")


def _bucket(s3_server) -> str:
    return s3_server["make_bucket"](f"nvae-{uuid.uuid4().hex[:12]}")


def _boto(s3_server):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_server["endpoint_url"],
        aws_access_key_id=s3_server["access_key"],
        aws_secret_access_key=s3_server["secret_key"],
        region_name=s3_server["region"],
    )


def _minio(s3_server):
    from minio import Minio

    host = s3_server["endpoint_url"].removeprefix("http://")
    return Minio(
        host,
        access_key=s3_server["access_key"],
        secret_key=s3_server["secret_key"],
        secure=False,
        region=s3_server["region"],
    )


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the committed configuration -----------------------------------------------------------------------------


def _project_config() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read_string((REPO / ".dvc/config").read_text())
    return cfg


def test_committed_remote_is_s3_with_an_endpoint_verification_and_no_credentials():
    cfg = _project_config()
    assert cfg["core"]["remote"] == "store"
    remote = cfg["'remote \"store\"'"]
    assert remote["url"].startswith("s3://")
    assert remote["endpointurl"].startswith("http")
    assert remote["verify"] == "true"
    secret_keys = {"access_key_id", "secret_access_key", "session_token", "profile", "credentialpath"}
    for section in cfg.sections():
        assert not secret_keys & set(cfg[section]), f"credentials in the committed .dvc/config [{section}]"
    assert "/config.local" in (REPO / ".dvc/.gitignore").read_text().split()


# --- push, then pull on a clean clone ------------------------------------------------------------------------


def _configure_local(repo: Path, s3_server, bucket: str, with_keys: bool) -> None:
    """What a user does once per clone: point the committed remote at their store, in .dvc/config.local."""
    dvc = tool("dvc")
    run([dvc, "remote", "modify", "--local", "store", "url", f"s3://{bucket}/dvc"], cwd=repo)
    run([dvc, "remote", "modify", "--local", "store", "endpointurl", s3_server["endpoint_url"]], cwd=repo)
    run([dvc, "remote", "modify", "--local", "store", "region", s3_server["region"]], cwd=repo)
    if with_keys:
        run([dvc, "remote", "modify", "--local", "store", "access_key_id", s3_server["access_key"]], cwd=repo)
        run(
            [dvc, "remote", "modify", "--local", "store", "secret_access_key", s3_server["secret_key"]],
            cwd=repo,
        )


@pytest.fixture(scope="module")
def pushed(tmp_path_factory, s3_server):
    """A project repo with stand-ins for the prepared data, a checkpoint and the ONNX model, `dvc add`ed,
    committed and pushed (credentials from the environment). Yields (origin, bucket, {path: sha256})."""
    origin = tmp_path_factory.mktemp("remote") / "origin"
    (origin / ".dvc").mkdir(parents=True)
    for name in (".dvc/config", ".dvc/.gitignore"):
        (origin / name).write_text((REPO / name).read_text())
    rng = __import__("random").Random(0)
    files = {
        "outputs/data/train.npy": rng.randbytes(300_000),
        "outputs/data/test.npy": rng.randbytes(50_000),
        "outputs/data/manifest.json": b'{"dataset": "fashion-mnist"}\n',
        "outputs/train/checkpoint.pt": rng.randbytes(200_000),
        "outputs/model/decoder.onnx": rng.randbytes(120_000),
    }
    for name, data in files.items():
        (origin / name).parent.mkdir(parents=True, exist_ok=True)
        (origin / name).write_bytes(data)
    run(["git", "init", "-q"], cwd=origin)
    bucket = _bucket(s3_server)
    _configure_local(origin, s3_server, bucket, with_keys=False)
    dvc = tool("dvc")
    run([dvc, "add", "outputs/data", "outputs/train/checkpoint.pt", "outputs/model/decoder.onnx"], cwd=origin)
    run(["git", "add", "-A"], cwd=origin)
    run(["git", "commit", "-qm", "data, checkpoint, model"], cwd=origin)
    assert "config.local" not in run(["git", "ls-files"], cwd=origin).stdout
    env = tool_env(AWS_ACCESS_KEY_ID=s3_server["access_key"], AWS_SECRET_ACCESS_KEY=s3_server["secret_key"])
    run([dvc, "push"], cwd=origin, env=env)
    yield origin, bucket, {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def _clone(origin: Path, dest: Path, s3_server, bucket: str) -> Path:
    run(["git", "clone", "-q", str(origin), str(dest)], cwd=origin.parent)
    _configure_local(dest, s3_server, bucket, with_keys=True)
    return dest


def test_push_then_pull_on_a_clean_clone_restores_every_byte(pushed, tmp_path, s3_server):
    origin, bucket, shas = pushed
    clone = _clone(origin, tmp_path / "clone", s3_server, bucket)
    assert not (clone / "outputs/model/decoder.onnx").exists()
    run([tool("dvc"), "pull"], cwd=clone)
    assert {name: _sha(clone / name) for name in shas} == shas
    assert run([tool("dvc"), "status", "--cloud"], cwd=clone).returncode == 0


def _objects(s3_server, bucket: str) -> list[str]:
    return [o["Key"] for o in _boto(s3_server).list_objects_v2(Bucket=bucket).get("Contents", [])]


@pytest.fixture
def damage_onnx(pushed, s3_server):
    """Overwrites the pushed ONNX model's object in the store with given bytes; restores it afterwards."""
    origin, bucket, _ = pushed
    good = (origin / "outputs/model/decoder.onnx").read_bytes()
    key = _key_of(s3_server, bucket, hashlib.md5(good).hexdigest())  # DVC's content address is the MD5
    client = _boto(s3_server)
    yield good, lambda bad: client.put_object(Bucket=bucket, Key=key, Body=bad)
    client.put_object(Bucket=bucket, Key=key, Body=good)


def _key_of(s3_server, bucket: str, sha_md5: str) -> str:
    (key,) = [k for k in _objects(s3_server, bucket) if k.endswith(sha_md5[2:]) and f"/{sha_md5[:2]}/" in k]
    return key


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_pull_fails_on_an_object_corrupted_in_the_store(pushed, damage_onnx, tmp_path, s3_server, damage):
    origin, bucket, _ = pushed
    good, corrupt = damage_onnx
    corrupt(bytes([good[0] ^ 0xFF]) + good[1:] if damage == "flipped" else good[: len(good) // 2])

    clone = _clone(origin, tmp_path / "clone", s3_server, bucket)
    proc = run([tool("dvc"), "pull"], cwd=clone, check=False)
    assert proc.returncode != 0, "a corrupt object must fail the pull"
    assert "decoder.onnx" in proc.stdout + proc.stderr or "failed" in (proc.stdout + proc.stderr).lower()
    target = clone / "outputs/model/decoder.onnx"
    assert not target.exists() or target.read_bytes() == good, "corrupt bytes landed in the workspace"
    # The untouched files still arrive intact.
    assert _sha(clone / "outputs/train/checkpoint.pt") == _sha(origin / "outputs/train/checkpoint.pt")


def test_without_verify_dvc_pulls_a_corrupt_object_as_good(pushed, damage_onnx, tmp_path, s3_server):
    """Documents why .dvc/config sets verify = true: with it off, DVC does not re-hash what it downloads."""
    origin, bucket, _ = pushed
    good, corrupt = damage_onnx
    bad = bytes([good[0] ^ 0xFF]) + good[1:]
    corrupt(bad)
    clone = _clone(origin, tmp_path / "clone", s3_server, bucket)
    run([tool("dvc"), "remote", "modify", "--local", "store", "verify", "false"], cwd=clone)
    proc = run([tool("dvc"), "pull"], cwd=clone, check=False)
    target = clone / "outputs/model/decoder.onnx"
    silently_corrupt = proc.returncode == 0 and target.exists() and target.read_bytes() == bad
    detected = proc.returncode != 0 and (not target.exists() or target.read_bytes() == good)
    # Observed with dvc 3.67 / dvc-s3 3.3: exit 0 and the corrupt bytes in the workspace. If a later DVC starts
    # checking on its own, this test fails and the note in docs/dvc-minio.md can go.
    assert silently_corrupt and not detected


# --- the minio SDK: an aborted upload leaves nothing ---------------------------------------------------------


class _FailingReader(io.RawIOBase):
    """A stream that serves `good` bytes and then fails, like a process killed or a disk erroring mid-upload."""

    def __init__(self, size: int, fail_after: int):
        self.size, self.fail_after, self.pos = size, fail_after, 0

    def readable(self):
        return True

    def read(self, n=-1):
        if self.pos >= self.fail_after:
            raise OSError("source died mid-upload")
        n = self.size - self.pos if n is None or n < 0 else n
        n = min(n, self.fail_after - self.pos, self.size - self.pos)
        self.pos += n
        return os.urandom(n)


def _absent(client, bucket: str, key: str) -> bool:
    from minio.error import S3Error

    try:
        client.stat_object(bucket, key)
    except S3Error as exc:
        return exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound")
    return False


def test_minio_sdk_round_trip_is_byte_exact(s3_server):
    client, bucket = _minio(s3_server), _bucket(s3_server)
    data = os.urandom(700_000)
    client.put_object(bucket, "models/decoder.onnx", io.BytesIO(data), len(data))
    assert client.get_object(bucket, "models/decoder.onnx").read() == data


def test_minio_sdk_multipart_upload_killed_midway_leaves_no_object(s3_server):
    client, bucket = _minio(s3_server), _bucket(s3_server)
    part = 5 * 1024 * 1024  # the S3 minimum part size: the failure comes after a whole part was sent
    with pytest.raises(OSError, match="mid-upload"):
        client.put_object(bucket, "big.pt", _FailingReader(3 * part, part + 1000), length=-1, part_size=part)
    assert _absent(client, bucket, "big.pt")
    uploads = _boto(s3_server).list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert uploads == [], "the SDK aborts the unfinished multipart upload"


def test_minio_sdk_single_put_killed_midway_leaves_no_object(s3_server):
    client, bucket = _minio(s3_server), _bucket(s3_server)
    with pytest.raises(OSError, match="mid-upload"):
        client.put_object(bucket, "small.pt", _FailingReader(1_000_000, 300_000), length=1_000_000)
    assert _absent(client, bucket, "small.pt")


def test_minio_sdk_overwrite_is_all_or_nothing(s3_server):
    """A failed re-upload of an existing key leaves the previous object whole."""
    client, bucket = _minio(s3_server), _bucket(s3_server)
    old = os.urandom(100_000)
    client.put_object(bucket, "ckpt.pt", io.BytesIO(old), len(old))
    with pytest.raises(OSError):
        client.put_object(bucket, "ckpt.pt", _FailingReader(1_000_000, 200_000), length=1_000_000)
    assert client.get_object(bucket, "ckpt.pt").read() == old


# --- a body damaged in flight --------------------------------------------------------------------------------


class _DamagingProxy:
    """A loopback proxy in front of the S3 server that flips one byte in the body of every PUT it forwards,
    as a bad NIC or middlebox would; headers (Host and signature included) pass unchanged."""

    def __init__(self, upstream: str):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        up = urlsplit(upstream)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = bytearray(self.rfile.read(length) if length else b"")
                if self.command == "PUT" and len(body) > 100:
                    body[len(body) // 2] ^= 0x01
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "expect")}
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=bytes(body) or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                            self.send_header(k, v)
                    length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else len(data)
                    self.send_header("Content-Length", str(length))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def damaging(s3_server):
    proxy = _DamagingProxy(s3_server["endpoint_url"])
    yield {**s3_server, "endpoint_url": proxy.url}
    proxy.close()


def test_a_body_damaged_in_flight_is_refused_by_the_store(s3_server, damaging, tmp_path):
    """boto3 (the checkpoint store, the registry) and DVC's s3fs send a CRC32 of the body
    (x-amz-checksum-crc32), which the store checks: the damaged upload fails and no object appears. The
    `minio` SDK over plain HTTP signs a SHA-256 of the body, which SeaweedFS does not check, so there the
    damage lands; over HTTPS the SDK sends a Content-MD5, which it does check."""
    from botocore.exceptions import ClientError

    bucket = _bucket(s3_server)
    data = os.urandom(4096)
    with pytest.raises(ClientError, match="BadDigest"):
        _boto(damaging).put_object(Bucket=bucket, Key="boto.bin", Body=data)
    assert _absent(_minio(s3_server), bucket, "boto.bin")

    minio_client = _minio(damaging)
    minio_client.put_object(bucket, "minio.bin", io.BytesIO(data), len(data))
    landed = _boto(s3_server).get_object(Bucket=bucket, Key="minio.bin")["Body"].read()
    assert landed != data and len(landed) == len(data), "SeaweedFS took the damaged body: see the docstring"

    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    for name in (".dvc/config", ".dvc/.gitignore"):
        (repo / name).write_text((REPO / name).read_text())
    (repo / "model.bin").write_bytes(data)
    run(["git", "init", "-q"], cwd=repo)
    _configure_local(repo, damaging, bucket, with_keys=True)
    dvc = tool("dvc")
    run([dvc, "add", "model.bin"], cwd=repo)
    env = tool_env(AWS_MAX_ATTEMPTS="1")  # a BadDigest is retried by default; once shows the same
    pushed = subprocess.run([dvc, "push"], cwd=repo, env=env, capture_output=True, text=True)
    assert pushed.returncode != 0 and "BadDigest" in pushed.stdout + pushed.stderr, (
        pushed.stdout + pushed.stderr
    )
    assert not _boto(s3_server).list_objects_v2(Bucket=bucket, Prefix="dvc/").get("Contents")
