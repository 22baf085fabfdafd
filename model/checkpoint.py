"""Checkpoint format: config as JSON, weights (with SR vectors and AR masks as buffers), a version field.

Loadable with `torch.load(weights_only=True)`: nothing pickled but tensors, strings and numbers. Written
atomically (temporary file, fsync, rename), so a crash never leaves a half file under the final name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from common.errors import CheckpointError, ConfigError
from common.files import atomic_open
from model.config import NVAEConfig

FORMAT = "nvae-pipeline-checkpoint"
VERSION = 1


class _WriteErrors:
    """A file for torch.save that keeps the OSError of a failed write: torch's zip writer turns it into a
    RuntimeError ('unexpected pos ...') that no longer says the disk is full."""

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to `path` atomically (`common.files.atomic_open`: temporary file, fsync, rename). A failed
    write (a full disk) raises its OSError naming `path`, and leaves neither `path` changed nor the temporary
    file."""
    with atomic_open(path, "wb") as fh:
        writer = _WriteErrors(fh)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is None:
                raise
            raise OSError(writer.error.errno, writer.error.strerror, str(path)) from None


def save_checkpoint(path: str | Path, model, extra: dict[str, Any] | None = None) -> None:
    """Save the model's config and state dict (plus plain-data `extra`, e.g. optimizer state)."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": model.cfg.to_json(),
        "model": model.state_dict(),
    }
    if extra:
        payload.update(extra)
    atomic_torch_save(payload, path)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check the envelope of a checkpoint (weights_only: no code runs on load)."""
    payload = load_weights_only(path, map_location)
    check_envelope(payload, path)
    return payload


def load_weights_only(
    path: str | Path, map_location: str | torch.device = "cpu", allowed: tuple[type, ...] = ()
) -> Any:
    """`torch.load(weights_only=True)` with the globals in `allowed` admitted too; CheckpointError in one
    line for a missing, unreadable or refused file (never torch's advice on weights_only)."""
    import pickle

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message for a refused global: "... Unsupported global: GLOBAL os.system ..." plus advice
        found = str(exc).partition("GLOBAL ")[2].split()
        if not found:  # not a pickle torch can read at all
            raise CheckpointError(f"{path}: not a readable checkpoint (UnpicklingError)") from None
        raise CheckpointError(
            f"{path}: refused: it pickles {found[0]}, which a checkpoint never holds (only tensors, numbers, "
            "strings"
            + (f" and {', '.join(t.__module__ + '.' + t.__name__ for t in allowed)}" if allowed else "")
            + " are read)"
        ) from None
    except Exception as exc:  # truncated zip, not a torch file, ...
        first = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:160]  # torch adds advice after
        detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({detail})") from None


def check_envelope(payload: Any, path: str | Path) -> None:
    """Raise CheckpointError unless `payload` is a checkpoint of ours of the version this code reads."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an nvae-pipeline checkpoint (missing format field)")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {payload.get('version')} (this code reads {VERSION})"
        )
    from common.schema import CheckpointMeta, check

    check(CheckpointMeta, payload, str(path), CheckpointError)  # the metadata's types and ranges


def check_model_entries(payload: dict[str, Any], path: str | Path) -> None:
    """Raise CheckpointError unless the payload holds a model: named weights and a config."""
    weights = payload.get("model")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{path}: no 'model' entry of named weights")
    if not isinstance(payload.get("config"), str):
        raise CheckpointError(f"{path}: no 'config' entry (a JSON object as text)")


def config_from_checkpoint(payload: dict[str, Any]) -> NVAEConfig:
    try:
        fields = json.loads(payload["config"])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint config is invalid: {exc}") from None
    if not isinstance(fields, dict):
        raise CheckpointError(
            f"checkpoint config is invalid: a JSON object is needed, not {type(fields).__name__}"
        )
    try:
        return NVAEConfig.from_dict(fields)
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint config is invalid: {exc}") from None


def load_model(path: str | Path, map_location: str | torch.device = "cpu"):
    """Rebuild the model from a checkpoint; a config that does not match the weights is a clear error."""
    from model.network import NVAE

    payload = read_checkpoint(path, map_location)
    check_model_entries(payload, path)
    cfg = config_from_checkpoint(payload)
    model = NVAE(cfg)
    state = payload["model"]
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            k = mismatched[0]
            parts.append(
                f"{len(mismatched)} shape mismatches (first: {k} {tuple(state[k].shape)} in the file, "
                f"{tuple(own[k].shape)} for the config)"
            )
        if missing:
            parts.append(f"{len(missing)} missing weights (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected weights (first: {unexpected[0]})")
        raise CheckpointError(
            f"{path}: weights do not match the checkpoint's config ({cfg.dataset}): " + "; ".join(parts)
        )
    model.load_state_dict(state)
    return model.to(map_location), payload
