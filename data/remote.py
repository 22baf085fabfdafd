"""Raw datasets in an S3-API store (MinIO on a cluster): upload a source directory, fetch it back for
`prepare`. Endpoint and keys come from the environment (`common.s3`), as the cluster's Secret provides them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from common.errors import DataError, StorageError
from common.s3 import is_retryable, parse_s3_uri, s3_client_from_env

log = logging.getLogger(__name__)


def is_s3_uri(source: str | Path) -> bool:
    return str(source).startswith("s3://")


def _cause(exc: Exception) -> str:
    """A short, human cause for a boto3/botocore failure."""
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = err.get("Code", "?")
        hints = {
            "NoSuchBucket": "the bucket does not exist",
            "InvalidAccessKeyId": "the access key is not known to the store (check AWS_ACCESS_KEY_ID)",
            "SignatureDoesNotMatch": "the secret key is wrong (check AWS_SECRET_ACCESS_KEY)",
            "AccessDenied": "access denied by the store",
            "403": "access denied by the store (check the credentials)",
            "404": "not found",
        }
        return hints.get(code, f"{code}: {err.get('Message', exc)}")
    return f"{type(exc).__name__}: {exc}"


def list_objects(uri: str, client=None) -> list[dict[str, Any]]:
    """Every object under `s3://bucket/prefix/`: [{'key', 'path' (relative to the prefix), 'etag', 'bytes'}],
    sorted by key. Raises DataError naming the URI when the store, bucket or prefix cannot be read."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = parse_s3_uri(uri)
    client = client or s3_client_from_env()
    base = f"{prefix}/" if prefix else ""
    objects = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/"):
                    continue  # folder marker
                objects.append(
                    {
                        "key": obj["Key"],
                        "path": obj["Key"][len(base) :],
                        "etag": obj["ETag"].strip('"'),
                        "bytes": int(obj["Size"]),
                    }
                )
    except (ClientError, BotoCoreError) as exc:
        raise DataError(f"{uri}: cannot list the source: {_cause(exc)}") from None
    if not objects:
        raise DataError(f"{uri}: no objects under this prefix (upload one with `nvae data upload`)")
    return sorted(objects, key=lambda o: o["key"])


def fetch_source(uri: str, dest: str | Path, client=None) -> list[dict[str, Any]]:
    """Download every object under `uri` into `dest` (same relative layout); returns the listing with ETags
    and sizes (what the prepare manifest records, so a changed source gives a different manifest)."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = client or s3_client_from_env()
    objects = list_objects(uri, client)
    bucket, _ = parse_s3_uri(uri)
    dest = Path(dest)
    for obj in objects:
        target = (dest / obj["path"]).resolve()
        if not target.is_relative_to(dest.resolve()):
            raise DataError(f"{uri}: object key {obj['key']!r} escapes the source prefix")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            client.download_file(bucket, obj["key"], str(target))
        except (ClientError, BotoCoreError) as exc:
            raise DataError(f"s3://{bucket}/{obj['key']}: cannot download: {_cause(exc)}") from None
    log.info("fetched %d objects (%d bytes) from %s", len(objects), sum(o["bytes"] for o in objects), uri)
    return objects


def upload_source(source: str | Path, uri: str, client=None) -> list[dict[str, Any]]:
    """Upload every regular file under the directory `source` to `uri` (keys: prefix/relative path); returns
    the uploaded objects' listing. Symbolic links are not followed out of `source`."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    source = Path(source)
    if not source.is_dir():
        raise DataError(f"{source}: not a directory")
    bucket, prefix = parse_s3_uri(uri)
    client = client or s3_client_from_env()
    root = source.resolve()
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.resolve().is_relative_to(root))
    if not files:
        raise DataError(f"{source}: no files to upload")
    for path in files:
        key = "/".join(filter(None, [prefix, path.relative_to(source).as_posix()]))
        try:
            client.upload_file(str(path), bucket, key)
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(
                f"s3://{bucket}/{key}: cannot upload: {_cause(exc)}", is_retryable(exc)
            ) from None
        except S3UploadFailedError as exc:  # boto3's transfer wraps the ClientError in its message
            raise StorageError(f"s3://{bucket}/{key}: cannot upload: {exc}", is_retryable(exc)) from None
    return list_objects(uri, client)


def source_fingerprint(source: str | Path) -> str:
    """A SHA-256 over what a source holds now: for s3:// each object's key, size and ETag; for a folder each
    file's relative path, size and modification time. It changes when an object is replaced under the same
    URI, which the URI alone does not show (the pipeline keys prepare's cache on it)."""
    import hashlib

    if is_s3_uri(source):
        lines = [f"{o['etag']} {o['bytes']} {o['path']}" for o in list_objects(str(source))]
    else:
        root = Path(source)
        if not root.exists():
            raise DataError(f"{source}: no such file or folder")
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        lines = [f"{p.stat().st_mtime_ns} {p.stat().st_size} {p.relative_to(root).as_posix()}" for p in files]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()
