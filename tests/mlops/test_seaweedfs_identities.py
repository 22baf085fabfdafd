"""The SeaweedFS overlay's identities, enforced by the real SeaweedFS server (the `s3_server` fixture loads
k8s/overlays/seaweedfs/s3-identities.json): the pipeline's key reads and writes bucket nvae and makes no
bucket; the sampler's key reads models/ and is refused everywhere else."""

from __future__ import annotations

import pytest

boto3 = pytest.importorskip("boto3")
from botocore.exceptions import ClientError  # noqa: E402


def _client(s3_server, user: str):
    access, secret = s3_server["keys"][user]
    return boto3.client(
        "s3",
        endpoint_url=s3_server["endpoint_url"],
        aws_access_key_id=access,
        aws_secret_access_key=secret,
        region_name=s3_server["region"],
    )


def _refused(call) -> str:
    with pytest.raises(ClientError) as info:
        call()
    return info.value.response["Error"]["Code"]


def test_the_pipeline_key_writes_in_its_bucket_and_makes_no_bucket(s3_server):
    s3_server["make_bucket"]("nvae")
    pipeline = _client(s3_server, "pipeline")
    pipeline.put_object(Bucket="nvae", Key="runs/r1/checkpoints/latest.json", Body=b"{}")
    assert pipeline.get_object(Bucket="nvae", Key="runs/r1/checkpoints/latest.json")["Body"].read() == b"{}"
    assert _refused(lambda: pipeline.create_bucket(Bucket="nvae-other")) == "AccessDenied"


def test_the_sampler_key_reads_models_and_nothing_else(s3_server):
    s3_server["make_bucket"]("nvae")
    root = _client(s3_server, "root")
    root.put_object(Bucket="nvae", Key="models/m/v1/decoder.onnx", Body=b"onnx")
    root.put_object(Bucket="nvae", Key="raw/fashion-mnist/train.idx", Body=b"data")
    sampler = _client(s3_server, "sampler")
    assert sampler.get_object(Bucket="nvae", Key="models/m/v1/decoder.onnx")["Body"].read() == b"onnx"
    assert (
        _refused(lambda: sampler.get_object(Bucket="nvae", Key="raw/fashion-mnist/train.idx"))
        == "AccessDenied"
    )
    assert _refused(lambda: sampler.put_object(Bucket="nvae", Key="models/m/v2/decoder.onnx", Body=b"x")) == (
        "AccessDenied"
    )
