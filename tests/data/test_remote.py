"""Raw datasets in an S3-API store: `nvae data upload`, then `prepare --source s3://...` as a pod does it."""

import json
from pathlib import Path

import numpy as np
import pytest

from cli.main import main
from common.errors import DataError
from data.prepare import prepare
from data.remote import _cause, fetch_source, list_objects, upload_source

from .conftest import real_idx_images, write_idx


@pytest.fixture
def raw_fmnist(tmp_path) -> Path:
    root = tmp_path / "raw"
    root.mkdir()
    write_idx(root / "train-images-idx3-ubyte", real_idx_images("train-images-idx3-ubyte.gz", 24))
    write_idx(root / "t10k-images-idx3-ubyte", real_idx_images("t10k-images-idx3-ubyte.gz", 8))
    return root


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def test_upload_then_prepare_from_s3_equals_prepare_from_disk(tmp_path, s3_env, raw_fmnist, capsys):
    bucket = s3_env["make_bucket"]("raw-equal")
    uri = f"s3://{bucket}/datasets/fmnist"
    argv = ["data", "upload", "--dataset", "fashion-mnist", "--source", str(raw_fmnist), "--to", uri]
    assert main(argv) == 0
    assert "uploaded 2 files" in capsys.readouterr().out
    local = prepare("fashion-mnist", raw_fmnist, tmp_path / "local", device="cpu")
    remote = prepare("fashion-mnist", uri, tmp_path / "remote", device="cpu")
    for split in ("train", "test"):
        a = np.load(tmp_path / "local" / f"{split}.npy")
        b = np.load(tmp_path / "remote" / f"{split}.npy")
        assert a.shape[0] > 0 and np.array_equal(a, b)
    assert remote["source"]["listing_sha256"] == local["source"]["listing_sha256"]
    objects = remote["source"]["objects"]
    assert remote["source"]["uri"] == uri
    assert [o["key"] for o in objects] == [
        "datasets/fmnist/t10k-images-idx3-ubyte.gz",
        "datasets/fmnist/train-images-idx3-ubyte.gz",
    ]
    assert all(o["etag"] and o["bytes"] > 0 for o in objects)
    on_disk = json.loads((tmp_path / "remote" / "manifest.json").read_text())
    assert on_disk["source"]["objects"] == objects
    assert _leftovers(tmp_path) == ["local", "raw", "remote"]  # the fetched copy is gone


def test_a_changed_source_object_changes_the_manifest(tmp_path, s3_env, raw_fmnist):
    bucket = s3_env["make_bucket"]("raw-changed")
    uri = f"s3://{bucket}/fmnist"
    upload_source(raw_fmnist, uri)
    first = prepare("fashion-mnist", uri, tmp_path / "a", device="cpu")["source"]
    write_idx(raw_fmnist / "t10k-images-idx3-ubyte", real_idx_images("t10k-images-idx3-ubyte.gz", 9))
    upload_source(raw_fmnist, uri)
    second = prepare("fashion-mnist", uri, tmp_path / "b", device="cpu")["source"]
    etags = [{o["key"]: o["etag"] for o in s["objects"]} for s in (first, second)]
    assert etags[0]["fmnist/t10k-images-idx3-ubyte.gz"] != etags[1]["fmnist/t10k-images-idx3-ubyte.gz"]
    assert etags[0]["fmnist/train-images-idx3-ubyte.gz"] == etags[1]["fmnist/train-images-idx3-ubyte.gz"]
    assert first["listing_sha256"] != second["listing_sha256"]


@pytest.mark.parametrize(
    "where, cause",
    [
        ("s3://no-such-bucket-here/fmnist", "the bucket does not exist"),
        ("s3://{bucket}/nothing/here", "no objects under this prefix"),
    ],
)
def test_a_missing_source_is_one_line_and_leaves_no_data(tmp_path, s3_env, capsys, where, cause):
    uri = where.format(bucket=s3_env["make_bucket"]("raw-empty"))
    out = tmp_path / "pipeline" / "prepare" / "data"
    argv = ["prepare", "--dataset", "fashion-mnist", "--source", uri, "--out", str(out), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and uri in err and cause in err
    assert not out.exists() and _leftovers(out.parent) == []


def test_an_unreachable_store_names_the_uri(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    from common.s3 import s3_client_from_env

    client = s3_client_from_env()
    client.meta.config.retries = {"max_attempts": 1}
    with pytest.raises(DataError, match=rf"s3://b/p: cannot list the source: .*{port}"):
        list_objects("s3://b/p", client)


def test_credential_errors_are_named():
    from botocore.exceptions import ClientError

    def error(code):
        return ClientError({"Error": {"Code": code, "Message": "m"}}, "ListObjectsV2")

    assert "AWS_ACCESS_KEY_ID" in _cause(error("InvalidAccessKeyId"))
    assert "AWS_SECRET_ACCESS_KEY" in _cause(error("SignatureDoesNotMatch"))
    assert "access denied" in _cause(error("AccessDenied"))


def test_object_keys_cannot_escape_the_download_folder(tmp_path):
    class Client:
        def get_paginator(self, name):
            class P:
                def paginate(self, **kw):
                    yield {"Contents": [{"Key": "p/../../evil", "ETag": '"e"', "Size": 1}]}

            return P()

    with pytest.raises(DataError, match="escapes"):
        fetch_source("s3://b/p", tmp_path / "dest", Client())


def test_upload_checks_the_source_first(tmp_path, s3_env, capsys):
    bucket = s3_env["make_bucket"]("raw-bad")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("not a dataset")
    argv = ["data", "upload", "--dataset", "fashion-mnist", "--source", str(tmp_path / "junk")]
    assert main([*argv, "--to", f"s3://{bucket}/x"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    with pytest.raises(DataError, match="no objects"):
        list_objects(f"s3://{bucket}/x")
