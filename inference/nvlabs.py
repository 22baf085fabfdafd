"""`nvae import-nvlabs` and `nvae export-nvlabs` on files: the authors' checkpoint format (`model.nvlabs`)
read from a path or the object store and written as ours, and ours written as theirs. Atomic writes; nothing
is written when anything is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model.nvlabs import export_nvlabs, import_nvlabs, load_nvlabs_file, ours_only


def import_nvlabs_file(
    source: str | Path, out: str | Path, data: str | Path | None = None, weights_only: bool = False
) -> dict[str, Any]:
    """Read an authors' checkpoint (a path, or s3://bucket/key with the endpoint and keys of the
    environment) and write it as ours (atomically; nothing is written on any error). With `data` (a folder
    from `nvae prepare`), the model must be for the dataset prepared there. A file with their optimizer
    gives ours its training state too (`nvae train --continue-from` goes on with their run), unless
    `weights_only`. Returns what was imported: dataset, parameters, tensors, epoch, global step, the BN
    naming found, whether the training state came along."""
    import tempfile

    from common.files import check_writable, file_sha256
    from model.checkpoint import FORMAT, VERSION, atomic_torch_save

    out = Path(out)
    check_writable(out)  # before the download and the mapping
    if str(source).startswith("s3://"):
        from common.s3 import download_object

        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / Path(str(source)).name
            download_object(str(source), local)
            done = import_nvlabs_file(local, out, data, weights_only)
        return {**done, "source": str(source)}
    source = Path(source)
    imported = import_nvlabs(load_nvlabs_file(source), str(source), training=not weights_only)
    if data is not None:
        from common.errors import DataError
        from data.loaders import read_manifest

        prepared = read_manifest(data)["dataset"]
        if prepared != imported.config.dataset:
            raise DataError(
                f"{source}: the model is for {imported.config.dataset!r}, but {data} holds {prepared!r}"
            )
    sha = file_sha256(source)
    training = imported.training
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": imported.config.to_json(),
        "model": imported.state,
        "step": imported.global_step or 0,
        **(training or {}),
        "imported_from": {"format": "nvlabs", "file": source.name, "sha256": sha,
                          "epoch": imported.epoch, "global_step": imported.global_step},
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(payload, out)
    params = sum(v.numel() for k, v in imported.state.items() if not ours_only(k) and "running_" not in k
                 and not k.endswith("num_batches_tracked"))  # fmt: skip
    return {"dataset": imported.config.dataset, "parameters": params, "tensors": len(imported.state),
            "epoch": imported.epoch, "global_step": imported.global_step, "bn_form": imported.bn_form,
            "training_state": training is not None, "sha256": sha, "out": str(out),
            "source": str(source)}  # fmt: skip


def export_nvlabs_file(checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """Write our checkpoint in the authors' format (atomically). Returns dataset, args dataset, tensors."""
    from common.files import check_writable
    from model.checkpoint import (
        atomic_torch_save,
        check_model_entries,
        config_from_checkpoint,
        read_checkpoint,
    )

    check_writable(out)
    payload = read_checkpoint(checkpoint)
    check_model_entries(payload, checkpoint)
    cfg = config_from_checkpoint(payload)
    step = int(payload.get("step", 0))
    theirs = export_nvlabs(cfg, payload["model"], step=step, epoch=int(payload.get("epoch", 0)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(theirs, out)
    return {"dataset": theirs["args"].dataset, "tensors": len(theirs["state_dict"]), "global_step": step,
            "out": str(out)}  # fmt: skip
