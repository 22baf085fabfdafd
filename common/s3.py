"""The S3-API client (MinIO, SeaweedFS, AWS), configured from the environment only.

Endpoint and credentials come from AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3), AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY and AWS_DEFAULT_REGION, the variables the `nvae-s3-credentials` Secret provides.
"""

from __future__ import annotations

import os

from common.errors import StorageError


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ('bucket', 'some/prefix'); the prefix may be empty."""
    if not uri.startswith("s3://"):
        raise StorageError(f"{uri!r} is not an s3://bucket/prefix URI")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket; expected s3://bucket/prefix")
    return bucket, prefix.strip("/")


def s3_client_from_env():
    """A boto3 S3 client configured only from the environment (path-style addressing, for MinIO)."""
    try:
        import boto3
        from botocore.config import Config
    except ModuleNotFoundError as exc:  # the `train` extra
        raise StorageError(f"s3:// URIs need boto3 (pip install 'nvae-pipeline[train]'): {exc}") from None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    config = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5, "mode": "standard"})
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, config=config)
