"""Checkpoint stores: local atomic file, S3-API bucket with a `latest.json` pointer written last."""

import json

import pytest
import torch

from training.storage import LocalCheckpointStore, S3CheckpointStore, StorageError, open_store, parse_s3_uri
from training.train import TrainOptions, train


def _payload(step: int) -> dict:
    return {
        "format": "nvae-pipeline-checkpoint",
        "version": 1,
        "step": step,
        "w": torch.full((3,), float(step)),
    }


def test_s3_uri_parsing_and_store_choice(tmp_path):
    assert parse_s3_uri("s3://bucket/runs/a/") == ("bucket", "runs/a")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    with pytest.raises(StorageError, match="names no bucket"):
        parse_s3_uri("s3:///x")
    with pytest.raises(StorageError, match="local directory or an s3://"):
        open_store("gs://bucket/x")
    assert isinstance(open_store(tmp_path), LocalCheckpointStore)


def test_local_store_round_trip(tmp_path):
    store = LocalCheckpointStore(tmp_path / "run")
    assert store.load_latest() is None
    store.save(_payload(3), 3)
    assert store.load_latest()["step"] == 3 and (tmp_path / "run" / "checkpoint.pt").is_file()


def test_s3_store_follows_the_pointer_and_prunes(s3_env):
    bucket = s3_env["make_bucket"]("ckpt-pointer")
    store = open_store(f"s3://{bucket}/runs/one")
    assert isinstance(store, S3CheckpointStore) and store.load_latest() is None
    for step in (2, 4, 6):
        assert store.save(_payload(step), step) == f"s3://{bucket}/runs/one/checkpoint-{step:010d}.pt"
    got = store.load_latest()
    assert got["step"] == 6 and torch.equal(got["w"], torch.full((3,), 6.0))
    keys = [o["Key"] for o in store.client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert sorted(keys) == [
        "runs/one/checkpoint-0000000004.pt",
        "runs/one/checkpoint-0000000006.pt",
        "runs/one/latest.json",
    ]


def test_failed_s3_upload_keeps_the_last_good_checkpoint(s3_env, monkeypatch):
    from botocore.exceptions import EndpointConnectionError

    bucket = s3_env["make_bucket"]("ckpt-failure")
    store = open_store(f"s3://{bucket}/run")
    store.save(_payload(2), 2)

    def broken_upload(*args, **kwargs):
        raise EndpointConnectionError(endpoint_url=s3_env["endpoint_url"])

    monkeypatch.setattr(store.client, "upload_file", broken_upload)
    with pytest.raises(StorageError, match="cannot write checkpoint"):
        store.save(_payload(4), 4)
    assert store.load_latest()["step"] == 2  # the pointer never moved


def test_s3_upload_refused_by_the_store_is_a_storage_error(s3_env, monkeypatch):
    """boto3's upload_file wraps the store's refusal (here: the pipeline's key writing outside its bucket) in
    S3UploadFailedError: it becomes a StorageError that says whether a retry can pass (a 503 can, a refusal
    cannot)."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError

    access, secret = s3_env["keys"]["pipeline"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    store = open_store("s3://no-such-bucket-here/run")
    with pytest.raises(StorageError, match="cannot write checkpoint") as info:
        store.save(_payload(2), 2)
    assert not info.value.retryable

    def busy_upload(*args, **kwargs):
        try:
            raise ClientError(
                {"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "Put"
            )
        except ClientError as exc:
            raise S3UploadFailedError(f"Failed to upload: {exc}")  # noqa: B904 - as boto3 raises it

    monkeypatch.setattr(store.client, "upload_file", busy_upload)
    with pytest.raises(StorageError) as info:
        store.save(_payload(2), 2)
    assert info.value.retryable


def test_corrupt_s3_object_is_refused(s3_env):
    bucket = s3_env["make_bucket"]("ckpt-corrupt")
    store = open_store(f"s3://{bucket}/run")
    store.save(_payload(2), 2)
    store.client.put_object(Bucket=bucket, Key="run/checkpoint-0000000002.pt", Body=b"truncated")
    with pytest.raises(StorageError, match="SHA-256"):
        store.load_latest()


def test_training_resumes_exactly_from_s3(tmp_path, s3_env, tiny_cfg):
    bucket = s3_env["make_bucket"]("ckpt-train")

    def batches(epoch, start, kill_at=None):
        for i in range(start, 3):
            if epoch * 3 + i == kill_at:
                raise KeyboardInterrupt  # the pod dies while fetching batch 3
            g = torch.Generator().manual_seed(1000 * epoch + i)
            yield torch.randint(0, 256, (4, 1, 12, 12), generator=g).float() / 255

    def opts(out, steps, ckpt=None):
        return TrainOptions(
            steps=steps,
            batches_per_epoch=3,
            out=out,
            checkpoint_every=2,
            checkpoint_dir=ckpt,
            progress=False,
            dvclive=False,
            sample_count=0,
        )

    torch.set_num_threads(1)
    train(tiny_cfg, batches, opts(tmp_path / "local", 5))
    uri = f"s3://{bucket}/run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg, lambda e, s: batches(e, s, kill_at=3), opts(tmp_path / "s3", 5, uri))
    assert open_store(uri).load_latest()["step"] == 2
    summary = train(tiny_cfg, batches, opts(tmp_path / "s3", 5, uri))  # resumed from S3
    assert summary["checkpoint"] == f"{uri}/checkpoint-0000000005.pt"
    assert not (tmp_path / "s3" / "checkpoint.pt").exists()
    a = torch.load(tmp_path / "local" / "checkpoint.pt", weights_only=True)["model"]
    b = open_store(uri).load_latest()["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("pointer", "says"),
    [
        ({"key": "runs/p/checkpoint-0000000002.pt", "step": "2"}, 'latest.json: step: expected an integer >= 0, got "2"'),
        ({"key": "elsewhere/secret.pt"}, "latest.json: key: expected a checkpoint under s3://"),
        ({"sha256": "abc"}, 'latest.json: sha256: expected 64 hex digits, got "abc"'),
    ],
    ids=["step-string", "key-outside", "short-hash"],
)  # fmt: skip
def test_a_pointer_of_the_wrong_shape_is_refused_before_any_download(s3_env, pointer, says):
    """`latest.json` is what another step (a TrainJob node, the next pipeline step) hands us: checked against
    its schema, and its key must lie in this store, before anything is fetched."""
    bucket = s3_env["make_bucket"]("ckpt-bad-pointer")
    store = open_store(f"s3://{bucket}/runs/p")
    store.save(_payload(2), 2)
    good = json.loads(store.client.get_object(Bucket=bucket, Key="runs/p/latest.json")["Body"].read())
    store.client.put_object(Bucket=bucket, Key="runs/p/latest.json", Body=json.dumps({**good, **pointer}).encode())
    with pytest.raises(StorageError, match=says.replace(".", r"\.")):
        store.load_latest()
