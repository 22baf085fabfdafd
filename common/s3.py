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


# S3 error codes that a later attempt can get past (besides any HTTP 5xx).
RETRYABLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                   "ServiceUnavailable", "RequestLimitExceeded"}  # fmt: skip


def is_retryable(exc: Exception) -> bool:
    """Whether a boto3/botocore failure can pass on a later try: timeouts, connection errors, 5xx,
    throttling. Credentials, missing buckets or keys and bad parameters are permanent."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or err.get("Code") in RETRYABLE_CODES
    return isinstance(exc, ConnectionError | HTTPClientError)  # endpoint down, timeouts, resets


ABORT_INCOMPLETE_AFTER_DAYS = 1


def ensure_bucket(bucket: str, client=None) -> list[str]:
    """Create `bucket` if it is missing and set a lifecycle rule that aborts multipart uploads left
    incomplete (a killed upload) after a day. Idempotent; returns what it did, one line each."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = client or s3_client_from_env()
    done = []
    try:
        try:
            client.head_bucket(Bucket=bucket)
            done.append(f"bucket {bucket} exists")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise
            client.create_bucket(Bucket=bucket)
            done.append(f"bucket {bucket} created")
        rule = {
            "ID": "abort-incomplete-multipart-uploads",
            "Status": "Enabled",
            "Filter": {"Prefix": ""},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": ABORT_INCOMPLETE_AFTER_DAYS},
        }
        client.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": [rule]})
        done.append(
            f"lifecycle: incomplete multipart uploads aborted after {ABORT_INCOMPLETE_AFTER_DAYS} day"
        )
    except (ClientError, BotoCoreError) as exc:
        raise StorageError(f"s3://{bucket}: cannot set up the bucket: {exc}", is_retryable(exc)) from None
    return done
