"""The S3-API client (MinIO, SeaweedFS, AWS), configured from the environment only.

Endpoint and credentials come from AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3), AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY and AWS_DEFAULT_REGION, the variables the store's Secrets provide (`nvae-s3-credentials`
for the bucket job, `nvae-s3-pipeline` and `nvae-s3-sampler` for the workloads). An `https://` endpoint signed
by a private CA needs AWS_CA_BUNDLE, the path of that CA's PEM bundle.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from common.errors import StorageError


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ('bucket', 'some/prefix'); the prefix may be empty."""
    if not uri.startswith("s3://"):
        raise StorageError(f"{uri!r} is not an s3://bucket/prefix URI")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket; expected s3://bucket/prefix")
    return bucket, prefix.strip("/")


def endpoint_from_env() -> str | None:
    """The store's URL (AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL); None means AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def region_from_env() -> str:
    return os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"


# Where the pipeline's step pods mount the store's CA (the Secret nvae-s3-ca, optional): used when present.
OPTIONAL_CA_ENV = "NVAE_S3_CA_IF_PRESENT"


def ca_bundle_from_env() -> str | None:
    """AWS_CA_BUNDLE, the PEM file of the CA that signed an https:// store's certificate, if set; a path that
    is not a file is an error here rather than an obscure TLS failure at the first request. Else
    NVAE_S3_CA_IF_PRESENT, a path used only when the file exists (a mount of an optional Secret: clusters
    without TLS to the store have none)."""
    path = os.environ.get("AWS_CA_BUNDLE") or None
    if path is not None and not os.path.isfile(path):
        raise StorageError(f"AWS_CA_BUNDLE={path}: no such file (the store's CA bundle, PEM)")
    optional = os.environ.get(OPTIONAL_CA_ENV) or None
    if path is None and optional is not None and os.path.isfile(optional):
        return optional
    return path


def s3_client_from_env(max_attempts: int = 5):
    """A boto3 S3 client configured only from the environment (path-style addressing, for MinIO), trusting
    the CA bundle AWS_CA_BUNDLE names for an https:// endpoint. `max_attempts` counts the first try."""
    try:
        import boto3
        from botocore.config import Config
    except ModuleNotFoundError as exc:  # the `train` extra
        raise StorageError(f"s3:// URIs need boto3 (pip install 'nvae-pipeline[train]'): {exc}") from None
    config = Config(
        s3={"addressing_style": "path"}, retries={"max_attempts": max_attempts, "mode": "standard"}
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint_from_env(),
        region_name=region_from_env(),
        config=config,
        verify=ca_bundle_from_env(),  # None: botocore's default trust store
    )


# S3 error codes that a later attempt can get past (besides any HTTP 5xx).
RETRYABLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                   "ServiceUnavailable", "RequestLimitExceeded"}  # fmt: skip


def is_retryable(exc: Exception) -> bool:
    """Whether a boto3/botocore failure can pass on a later try: timeouts, connection errors, 5xx,
    throttling. Credentials, missing buckets or keys, bad parameters and an untrusted TLS certificate are
    permanent."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if is_untrusted_certificate(exc):
        return False
    if isinstance(exc, S3UploadFailedError):  # boto3's upload_file raises it in place of the ClientError
        return isinstance(exc.__context__, Exception) and is_retryable(exc.__context__)
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or err.get("Code") in RETRYABLE_CODES
    return isinstance(exc, ConnectionError | HTTPClientError)  # endpoint down, timeouts, resets


def is_untrusted_certificate(exc: BaseException) -> bool:
    """Whether a failure (botocore, urllib3 or ssl) is a TLS certificate the client does not trust."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(exc):
            return True
        reason = getattr(exc, "reason", None)  # urllib3's MaxRetryError wraps the failure it gave up on
        exc = reason if isinstance(reason, BaseException) else exc.__cause__ or exc.__context__
    return False


UNTRUSTED_HINT = "the store's TLS certificate is not trusted: set AWS_CA_BUNDLE to the PEM bundle of its CA"


def one_line(text: str) -> str:
    """Collapses whitespace and newlines, so an error from a server (XML, JSON) prints on one line."""
    return " ".join(str(text).split())


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
        hint = f" ({UNTRUSTED_HINT})" if is_untrusted_certificate(exc) else ""
        raise StorageError(
            one_line(f"s3://{bucket}: cannot set up the bucket: {exc}{hint}"), is_retryable(exc)
        ) from None
    return done


def download_object(uri: str, dest: str | Path, client=None) -> int:
    """Download the object at `uri` (s3://bucket/key) to the file `dest`, atomically: a temporary file in
    the same folder, renamed only when complete, so a failed download never leaves a file that looks whole.
    Returns the size in bytes; StorageError (retryable or not) names the URI."""
    from botocore.exceptions import BotoCoreError, ClientError

    from common.files import atomic_open

    bucket, key = parse_s3_uri(uri)
    if not key or uri.endswith("/"):
        raise StorageError(f"{uri!r} names no object; expected s3://bucket/path/to/file")
    dest = Path(dest)
    client = client or s3_client_from_env()
    try:
        with atomic_open(dest, "wb", suffix=".part") as fh:
            client.download_fileobj(bucket, key, fh)
    except (ClientError, BotoCoreError) as exc:
        missing = isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in (
            "404",
            "NoSuchKey",
        )
        cause = "no such object" if missing else str(exc)
        raise StorageError(one_line(f"{uri}: cannot download it: {cause}"), is_retryable(exc)) from None
    return dest.stat().st_size


def _storage_error(uri: str, action: str, exc: Exception) -> StorageError:
    hint = f" ({UNTRUSTED_HINT})" if is_untrusted_certificate(exc) else ""
    return StorageError(one_line(f"{uri}: cannot {action}: {exc}{hint}"), is_retryable(exc))


def put_json(uri: str, value: dict, client=None) -> None:
    """Write `value` as the JSON object at `uri` (one PUT: readers see the old or the new one)."""
    import json

    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = parse_s3_uri(uri)
    try:
        (client or s3_client_from_env()).put_object(
            Bucket=bucket, Key=key, Body=json.dumps(value).encode(), ContentType="application/json"
        )
    except (BotoCoreError, ClientError) as exc:
        raise _storage_error(uri, "write it", exc) from None


def get_json(uri: str, client=None) -> dict | None:
    """The JSON object at `uri`, or None when there is none."""
    import json

    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = parse_s3_uri(uri)
    try:
        body = (client or s3_client_from_env()).get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise _storage_error(uri, "read it", exc) from None
    except BotoCoreError as exc:
        raise _storage_error(uri, "read it", exc) from None
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise StorageError(f"{uri}: not JSON: {exc}") from None
