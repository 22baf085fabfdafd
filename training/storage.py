"""Where training checkpoints live: a local directory or an S3-API bucket (MinIO, SeaweedFS, AWS).

Both stores guarantee that a crash or preemption mid-write never replaces the last good checkpoint:

- local: `DIR/checkpoint.pt`, written to a temporary file, fsynced, then renamed over the old one;
- S3 (`s3://bucket/prefix`): each checkpoint is a new object `prefix/checkpoint-<step>.pt` (an S3 upload,
  multipart included, becomes visible only when complete), then the small pointer `prefix/latest.json`
  naming it (with its SHA-256) is written last; readers follow the pointer. Older checkpoint objects
  beyond `keep` are deleted after the pointer moved.

S3 endpoint and credentials come from the environment only (AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), never from code or config files.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch

from common.errors import StorageError  # noqa: F401  (re-exported: callers catch it from here)
from common.files import file_sha256
from common.s3 import is_retryable, parse_s3_uri, s3_client_from_env
from model.checkpoint import atomic_torch_save, read_checkpoint

log = logging.getLogger(__name__)

LOCAL_NAME = "checkpoint.pt"
LATEST_NAME = "latest.json"


class CheckpointStore(Protocol):
    """Somewhere to save a checkpoint payload and to find the newest one again."""

    @property
    def location(self) -> str: ...

    def save(self, payload: dict[str, Any], step: int) -> str:
        """Store `payload` (a plain-data dict) for `step`; returns where it went."""
        ...

    def load_latest(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        """The newest complete checkpoint's payload, or None when the store holds none."""
        ...


class LocalCheckpointStore:
    """`DIR/checkpoint.pt`, replaced atomically (temporary file, fsync, rename)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    @property
    def location(self) -> str:
        return str(self.directory / LOCAL_NAME)

    def save(self, payload: dict[str, Any], step: int) -> str:
        atomic_torch_save(payload, self.directory / LOCAL_NAME)
        return self.location

    def load_latest(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        """The checkpoint, if any; first removes temporary files a killed save left behind (a run starts
        by loading, so leftovers of an earlier kill never pile up)."""
        for leftover in self.directory.glob(f".{LOCAL_NAME}.*.tmp"):
            log.info("removing %s, left by an interrupted save", leftover)
            leftover.unlink(missing_ok=True)
        path = self.directory / LOCAL_NAME
        return read_checkpoint(path, map_location) if path.is_file() else None


class S3CheckpointStore:
    """Checkpoint objects under `s3://bucket/prefix/`, found through a `latest.json` pointer written last."""

    def __init__(self, uri: str, client=None, keep: int = 2):
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.client = client or s3_client_from_env()
        self.keep = max(1, keep)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self._key('')}"

    def save(self, payload: dict[str, Any], step: int) -> str:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        key = self._key(f"checkpoint-{step:010d}.pt")
        with tempfile.TemporaryDirectory(prefix="nvae-ckpt-") as tmp:
            path = Path(tmp) / "checkpoint.pt"
            torch.save(payload, path)
            pointer = {"key": key, "step": step, "sha256": file_sha256(path), "bytes": path.stat().st_size}
            try:
                self.client.upload_file(str(path), self.bucket, key)  # visible only once complete
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=self._key(LATEST_NAME),
                    Body=json.dumps(pointer).encode(),
                    ContentType="application/json",
                )
            except (
                BotoCoreError,
                ClientError,
                S3UploadFailedError,
            ) as exc:  # boto3 wraps an upload's ClientError
                raise StorageError(
                    f"cannot write checkpoint to s3://{self.bucket}/{key}: {exc}", is_retryable(exc)
                ) from None
        self._prune(keep_key=key)
        return f"s3://{self.bucket}/{key}"

    def _prune(self, keep_key: str) -> None:
        """Delete all but the newest `keep` checkpoint objects (never the one the pointer names)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key("checkpoint-")
            )
            keys = sorted(
                o["Key"] for page in pages for o in page.get("Contents", []) if o["Key"].endswith(".pt")
            )
            old = [k for k in keys[: -self.keep] if k != keep_key]
            for k in old:
                self.client.delete_object(Bucket=self.bucket, Key=k)
        except (BotoCoreError, ClientError) as exc:  # pruning is housekeeping: never fail a run for it
            log.warning("could not prune old checkpoints under %s: %s", self.location, exc)

    def latest_pointer(self) -> dict[str, Any] | None:
        """The parsed `latest.json`, or None when the prefix holds no checkpoint yet."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(LATEST_NAME))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise StorageError(
                f"cannot read {self.location}{LATEST_NAME}: {exc}", is_retryable(exc)
            ) from None
        except BotoCoreError as exc:
            raise StorageError(
                f"cannot read {self.location}{LATEST_NAME}: {exc}", is_retryable(exc)
            ) from None
        try:
            pointer = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StorageError(f"{self.location}{LATEST_NAME} is not JSON: {exc}") from None
        from common.schema import CheckpointPointer, check

        where = f"{self.location}{LATEST_NAME}"
        checked = check(CheckpointPointer, pointer, where, StorageError)
        if not checked.key.startswith(self._key("checkpoint-")):  # never an object outside this store
            raise StorageError(f"{where}: key: expected a checkpoint under {self.location}, got {checked.key!r}")
        return pointer

    def download_latest(self, dest: str | Path) -> dict[str, Any] | None:
        """Download the checkpoint `latest.json` names to `dest`, checked against the SHA-256 it records;
        returns the pointer, or None when the prefix holds no checkpoint yet. A mismatching file is removed."""
        from botocore.exceptions import BotoCoreError, ClientError

        pointer = self.latest_pointer()
        if pointer is None:
            return None
        dest = Path(dest)
        try:
            self.client.download_file(self.bucket, pointer["key"], str(dest))  # boto3: temporary file, rename
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(
                f"cannot download s3://{self.bucket}/{pointer['key']}: {exc}", is_retryable(exc)
            ) from None
        if file_sha256(dest) != pointer.get("sha256"):
            dest.unlink()
            raise StorageError(
                f"s3://{self.bucket}/{pointer['key']} does not match its SHA-256 in {self.location}{LATEST_NAME}"
            )
        return pointer

    def load_latest(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        with tempfile.TemporaryDirectory(prefix="nvae-ckpt-") as tmp:
            path = Path(tmp) / "checkpoint.pt"
            if self.download_latest(path) is None:
                return None
            return read_checkpoint(path, map_location)


def open_store(uri: str | Path) -> CheckpointStore:
    """A store for `uri`: `s3://bucket/prefix` or a local directory."""
    text = str(uri)
    if text.startswith("s3://"):
        return S3CheckpointStore(text)
    if "://" in text:
        raise StorageError(f"{text!r}: checkpoints go to a local directory or an s3://bucket/prefix URI")
    return LocalCheckpointStore(text)


__all__ = [
    "CheckpointStore",
    "LocalCheckpointStore",
    "S3CheckpointStore",
    "StorageError",
    "open_store",
    "parse_s3_uri",
    "s3_client_from_env",
]
