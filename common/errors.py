"""Exceptions raised by the library; the CLI turns them into one line and exit code 2.

Shared by every layer, so it imports nothing of the project."""


class NVAEError(Exception):
    """Base class of every error the product raises on purpose."""


class ConfigError(NVAEError, ValueError):
    """A configuration field is unknown or out of its allowed range."""


class CheckpointError(NVAEError):
    """A checkpoint cannot be read, or does not match its configuration."""


class DataError(NVAEError):
    """Input data is missing, corrupt, or not what was asked for."""


class StorageError(NVAEError):
    """An object store (S3 API) or a checkpoint store cannot be reached, read or written.

    `retryable`: the same call can succeed later (timeouts, connection errors, 5xx, throttling); bad
    credentials, a missing bucket, a checksum mismatch or a bad URI are permanent."""

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable
