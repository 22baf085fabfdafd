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
    client = s3_client_from_env()
    client.meta.config.retries = {"max_attempts": 1}
    with pytest.raises(StorageError, match="s3://b: cannot set up the bucket") as err:
        ensure_bucket("b", client)
    assert err.value.retryable
