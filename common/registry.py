"""A model registry in the object store: published versions of a model, content-addressed and written once.

Layout under a registry URI `s3://bucket/models/<name>`:

    <version>/decoder.onnx, checkpoint.pt, metrics.json, ...   the files, uploaded first
    <version>/manifest.json   name, version, each file's sha256 and size, the model card; written LAST, so a
                              version without it is an interrupted publish and is never listed or pulled
    latest                    {"version": ...}: one PUT, so readers see the old or the new version, never half

The version is the first 16 hex digits of the sha256 over the files' names and digests: publishing the same
files again finds the version already there and writes nothing; other files can never overwrite it. `pull`
checks every file's sha256 and refuses a mismatch, so a sampler never starts on a model it could not verify.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from common.errors import StorageError
from common.files import atomic_write_text, file_sha256
from common.s3 import download_object, is_retryable, one_line, parse_s3_uri, s3_client_from_env
from common.schema import LatestPointer, RegistryManifest, check

MANIFEST = "manifest.json"
LATEST = "latest"
VERSION_CHARS = set("0123456789abcdef")


def content_version(digests: dict[str, str]) -> str:
    """The version of a set of files: sha256 over "name digest" lines in name order, 16 hex digits."""
    text = "".join(f"{name} {digest}\n" for name, digest in sorted(digests.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Registry:
    """The registry at `uri` (s3://bucket/models/<name>); `client`: a boto3 S3 client (default: from env)."""

    def __init__(self, uri: str, client=None):
        self.bucket, self.prefix = parse_s3_uri(uri.rstrip("/"))
        if not self.prefix:
            raise StorageError(f"{uri!r} names no model; expected s3://bucket/models/<name>")
        self.uri = f"s3://{self.bucket}/{self.prefix}"
        self.name = self.prefix.rsplit("/", 1)[-1]
        self.client = client or s3_client_from_env()

    # ------------------------------------------------------------------ low level
    def _key(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts])

    def _call(self, what: str, fn, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(what) from None
            raise StorageError(one_line(f"{what}: {exc}"), is_retryable(exc)) from None
        except BotoCoreError as exc:
            raise StorageError(one_line(f"{what}: {exc}"), is_retryable(exc)) from None

    def _get_json(self, key: str) -> Any:
        where = f"s3://{self.bucket}/{key}"
        body = self._call(where, self.client.get_object, Bucket=self.bucket, Key=key)["Body"].read()
        try:
            return json.loads(body)
        except ValueError:
            raise StorageError(f"{where}: not valid JSON") from None

    def _put_json(self, key: str, value: Any) -> None:
        body = json.dumps(value, indent=2, sort_keys=True).encode()
        self._call(
            f"s3://{self.bucket}/{key}", self.client.put_object, Bucket=self.bucket, Key=key, Body=body
        )

    # ------------------------------------------------------------------ reading
    def resolve(self, version: str = LATEST) -> str:
        """A version name, or `latest` resolved through the pointer."""
        if version != LATEST:
            if not (len(version) == 16 and set(version) <= VERSION_CHARS):
                raise StorageError(f"{version!r} is not a model version (16 hex digits) or 'latest'")
            return version
        key = self._key(LATEST)
        try:
            pointer = self._get_json(key)
        except FileNotFoundError:
            raise StorageError(f"{self.uri}: nothing published yet (no {LATEST} pointer)") from None
        return check(LatestPointer, pointer, f"s3://{self.bucket}/{key}", StorageError).version

    def manifest(self, version: str = LATEST) -> dict[str, Any]:
        """The manifest of a published version; StorageError naming the object when there is none."""
        version = self.resolve(version)
        key = self._key(version, MANIFEST)
        try:
            return self._checked_manifest(version)
        except FileNotFoundError:
            known = ", ".join(m["version"] for m in self.list()) or "none"
            raise StorageError(
                f"s3://{self.bucket}/{key}: no such model version {version!r} (published: {known})"
            ) from None

    def _checked_manifest(self, version: str) -> dict[str, Any]:
        """The manifest of `version` as stored, checked: its fields (`common.schema.RegistryManifest`: plain
        file names, 64-hex digests), and its version, which must be its folder's and its files' content
        version; FileNotFoundError when there is none."""
        key = self._key(version, MANIFEST)
        where = f"s3://{self.bucket}/{key}"
        manifest = self._get_json(key)
        checked = check(RegistryManifest, manifest, where, StorageError)
        if MANIFEST in checked.files or LATEST in checked.files:
            raise StorageError(f"{where}: files: {MANIFEST!r} and {LATEST!r} cannot be files of a version")
        of_files = content_version({name: meta.sha256 for name, meta in checked.files.items()})
        if checked.version != version or of_files != version:
            raise StorageError(
                f"{where}: version {checked.version!r} does not match its folder ({version!r}) or its files "
                f"(content version {of_files!r}): the manifest was altered"
            )
        return manifest

    def list(self) -> list[dict[str, Any]]:
        """Every complete version (manifest written), oldest first."""
        found, token = [], None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": self.prefix + "/", "Delimiter": "/"}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call(self.uri, self.client.list_objects_v2, **kwargs)
            for common in page.get("CommonPrefixes", []):
                version = common["Prefix"][len(self.prefix) + 1 :].strip("/")
                if not (len(version) == 16 and set(version) <= VERSION_CHARS):
                    continue  # not a version folder
                try:
                    found.append(self._checked_manifest(version))
                except FileNotFoundError:
                    continue  # an interrupted publish: files without a manifest
            token = page.get("NextContinuationToken")
            if not token:
                break
        return sorted(found, key=lambda m: m.get("created", ""))

    # ------------------------------------------------------------------ writing
    def publish(self, files: dict[str, str | Path], card: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Publish `files` ({name in the version: local path}) with a model card; point `latest` at it.
        Returns (manifest, created): created is False when the same files were published before."""
        if not files:
            raise StorageError("nothing to publish")
        for name, path in files.items():
            if "/" in name or name in (MANIFEST, LATEST) or not name:
                raise StorageError(f"{name!r} cannot be a file name in a model version")
            if not Path(path).is_file():
                raise StorageError(f"{path}: not a file (to be published as {name})")
        digests = {name: file_sha256(path) for name, path in files.items()}
        version = content_version(digests)
        try:
            existing = self._checked_manifest(version)
        except FileNotFoundError:
            existing = None
        if existing is None:
            for name, path in files.items():
                key = self._key(version, name)
                self._call(f"s3://{self.bucket}/{key}", self.client.upload_file,
                           Filename=str(path), Bucket=self.bucket, Key=key)  # fmt: skip
            manifest = {
                "name": self.name,
                "version": version,
                "created": _now(),
                "files": {
                    n: {"sha256": d, "size": Path(files[n]).stat().st_size} for n, d in digests.items()
                },
                "card": card,
            }
            self._put_json(self._key(version, MANIFEST), manifest)  # last: the version is now complete
        else:
            manifest = existing
        self._put_json(self._key(LATEST), {"version": version})
        return manifest, existing is None

    def pull(self, dest: str | Path, version: str = LATEST) -> dict[str, Any]:
        """Download a version's files and manifest into `dest`, each checked against its sha256.

        The files land in a staging folder inside `dest` (the same filesystem, and the one place a read-only
        container lets us write: `dest` is often a mounted volume) and move into `dest` only when every one
        has passed, the manifest last. A failure leaves `dest` as it was (a `dest` this call made is removed):
        nothing half-fetched or unverified. A mismatch raises StorageError naming the object (permanent:
        retrying reads the same)."""
        import os
        import shutil
        import tempfile

        manifest = self.manifest(version)
        dest = Path(dest)
        made = not dest.exists()
        try:
            dest.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".pull-", dir=dest))
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(dest)) from None
        done = False
        try:
            for name, meta in sorted(manifest["files"].items()):
                key = self._key(manifest["version"], name)
                uri = f"s3://{self.bucket}/{key}"
                try:
                    download_object(uri, staging / name, self.client)
                except StorageError as exc:
                    if "no such object" in str(exc):
                        raise StorageError(f"{uri}: listed in the manifest but missing from the store") from None
                    raise
                got = file_sha256(staging / name)
                if got != meta["sha256"]:
                    raise StorageError(
                        f"{uri}: checksum mismatch (sha256 {got[:12]}..., manifest {meta['sha256'][:12]}...)"
                    )
            # Last, and whole: its presence says every file beside it was verified.
            atomic_write_text(staging / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
            for name in [*sorted(manifest["files"]), MANIFEST]:
                os.replace(staging / name, dest / name)
            done = True
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if made and not done:
                shutil.rmtree(dest, ignore_errors=True)
        return manifest

    def verify(self, version: str = LATEST) -> dict[str, Any]:
        """The manifest of a version, after reading every file it lists from the store and checking its size
        and sha256 (streamed: nothing is written); StorageError naming the first object that fails."""
        manifest = self.manifest(version)
        for name, meta in sorted(manifest["files"].items()):
            key = self._key(manifest["version"], name)
            uri = f"s3://{self.bucket}/{key}"
            sink = _HashingSink()
            try:
                self._call(uri, self.client.download_fileobj, Bucket=self.bucket, Key=key, Fileobj=sink)
            except FileNotFoundError:
                raise StorageError(f"{uri}: listed in the manifest but missing from the store") from None
            got = sink.hash.hexdigest()
            if sink.size != meta.get("size", sink.size) or got != meta["sha256"]:
                raise StorageError(
                    f"{uri}: checksum mismatch (sha256 {got[:12]}..., {sink.size} bytes; manifest "
                    f"{meta['sha256'][:12]}..., {meta.get('size')} bytes)"
                )
        return manifest


def _now() -> str:
    """UTC, ISO 8601 to the millisecond: versions published within one second still list in order."""
    import datetime

    now = datetime.datetime.now(datetime.UTC)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _HashingSink:
    """A write-only, non-seekable file object that hashes what it is given (boto3 then writes in order)."""

    def __init__(self):
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return len(data)

    def seekable(self) -> bool:
        return False
