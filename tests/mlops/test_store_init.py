"""`nvae store init` (the cluster's bucket job) against a real S3-API server."""

import pytest

from cli.main import main
from common.errors import StorageError
from common.s3 import ensure_bucket, s3_client_from_env


def test_creates_the_bucket_with_an_abort_rule_and_is_idempotent(s3_env, capsys):
    assert main(["store", "init", "--bucket", "fresh-store"]) == 0
    assert "bucket fresh-store created" in capsys.readouterr().out
    client = s3_client_from_env()
    (rule,) = client.get_bucket_lifecycle_configuration(Bucket="fresh-store")["Rules"]
    assert rule["Status"] == "Enabled" and rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] == 1
    assert ensure_bucket("fresh-store")[0] == "bucket fresh-store exists"
    assert len(client.get_bucket_lifecycle_configuration(Bucket="fresh-store")["Rules"]) == 1


def test_an_unreachable_store_is_a_retryable_storage_error(monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    client = s3_client_from_env(max_attempts=1)
    with pytest.raises(StorageError, match="s3://b: cannot set up the bucket") as err:
        ensure_bucket("b", client)
    assert err.value.retryable


def test_store_get_downloads_one_object_atomically(s3_env, tmp_path, capsys):
    client = s3_client_from_env()
    ensure_bucket("models-store", client)
    payload = bytes(range(256)) * 4096  # 1 MiB
    client.put_object(Bucket="models-store", Key="models/decoder.onnx", Body=payload)
    out = tmp_path / "models" / "decoder.onnx"
    assert main(["store", "get", "s3://models-store/models/decoder.onnx", "--out", str(out)]) == 0
    assert out.read_bytes() == payload and f"({len(payload)} bytes)" in capsys.readouterr().out
    # A missing object is permanent (exit 2, one line) and leaves the earlier file and no partial one.
    assert main(["store", "get", "s3://models-store/models/none.onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("s3://models-store/models/none.onnx: cannot download it: no such object")
    assert "\n" not in err and out.read_bytes() == payload
    assert [p.name for p in out.parent.iterdir()] == ["decoder.onnx"]
    # A prefix (a URI ending in /) downloads into a folder, never over a file.
    assert main(["store", "get", "s3://models-store/models/", "--out", str(out)]) == 2
    assert "decoder.onnx: not a folder" in capsys.readouterr().err and out.read_bytes() == payload


def test_store_get_from_an_unreachable_store_exits_75(monkeypatch, tmp_path, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    real = s3_client_from_env
    monkeypatch.setattr("common.s3.s3_client_from_env", lambda max_attempts=5: real(max_attempts=1))
    assert main(["store", "get", "s3://b/models/decoder.onnx", "--out", str(tmp_path / "d.onnx")]) == 75
    assert "cannot download it" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
