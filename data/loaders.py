"""Training and evaluation loaders over prepared arrays: a torch DataLoader on CPU, a DALI iterator on GPU.

What a batch contains is a pure function of (seed, epoch, rank, world_size, batch index), never of timing or
worker count, so a resumed run sees exactly the batches it would have seen (`start_batch` skips into an
epoch). Per-sample randomness is keyed by the sample's index in the split:

- order: a permutation of the split drawn from (seed, epoch) when training, the stored order otherwise;
- sharding: rank r takes positions r, r + W, r + 2W, ... of that order, so ranks are disjoint each epoch;
- flips (training only): one coin per sample from (seed, epoch);
- crops (training only, in a split stored whole along the longer side, `data.strips`): one uniform offset per
  sample from (seed, epoch), as `RandomCrop`;
- binarization: `x > u` with u ~ U[0, 1) per pixel, drawn from (seed, epoch, sample) when training and from
  (EVAL_BINARIZE_SEED, sample) otherwise, so every evaluation sees the same binarized test set.

Batches are float32 (B, C, H, W) in [0, 1]: stored value k / (2**bits - 1), e.g. k / 31 for 5-bit data.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import DataError
from data.prepare import MANIFEST_NAME
from data.strips import StripSplit, check_strips

EVAL_BINARIZE_SEED = 20200708  # fixed: binarized test sets are identical across runs and seeds
_FLIP_STREAM, _NOISE_STREAM, _ORDER_STREAM, _CROP_STREAM = 1, 2, 3, 4


def read_manifest(prepared_dir: str | Path) -> dict[str, Any]:
    """The manifest of a prepared directory; DataError if it is missing or unreadable."""
    path = Path(prepared_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no manifest; is {prepared_dir} the output of `nvae prepare`?") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None
    except OSError as exc:
        raise DataError(f"{path}: unreadable manifest: {exc.strerror or exc}") from None
    check_manifest(manifest, path)
    return manifest


def check_manifest(manifest: Any, path: str | Path) -> None:
    """The manifest's fields that readers rely on (`common.schema.DataManifest`), checked for type before value
    (no boolean for a number, no string for a mapping); DataError naming `path` and the field. Each entry's
    sha256 is checked where its file is read (`verify_split`), naming the file."""
    from common.schema import DataManifest, check

    check(DataManifest, manifest, str(path), DataError)


def load_split(
    prepared_dir: str | Path,
    split: str,
    *,
    manifest: dict[str, Any] | None = None,
    verify: bool | None = None,
) -> np.ndarray | StripSplit:
    """Memory-map one prepared split as uint8 (N, H, W, C), checked against the manifest: its file inside the
    prepared folder, its bytes against the recorded SHA-256 (`verify_split`; `verify` None: unless
    NVAE_NO_VERIFY=1, which `--no-verify` sets), its dtype and shape. A split stored whole along the longer
    side (an `index` in its entry) comes as a `StripSplit`, its index file checked the same way."""
    manifest = manifest or read_manifest(prepared_dir)
    splits = manifest["splits"]
    if not isinstance(splits, dict) or split not in splits:
        names = ", ".join(splits) if isinstance(splits, dict) else "none (splits is not a mapping)"
        raise DataError(f"{prepared_dir}: no split {split!r}; it has: {names}")
    entry = splits[split]
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        raise DataError(
            f"{Path(prepared_dir) / MANIFEST_NAME}: splits.{split} must be a mapping with a 'file' name"
        )
    path = _inside(Path(prepared_dir), entry["file"], f"splits.{split}.file")
    verify = verify if verify is not None else os.environ.get(NO_VERIFY_ENV) != "1"
    if verify:
        verify_split(path, entry.get("sha256"), f"splits.{split}")
    array = _load_npy(path)
    if entry.get("index") is not None:
        index_path = _inside(Path(prepared_dir), entry["index"], f"splits.{split}.index")
        if verify:
            verify_split(index_path, entry.get("index_sha256"), f"splits.{split}.index")
        index = np.array(_load_npy(index_path))
        side, _, channels = manifest["shape"]
        check_strips(array, index, entry["count"], side, channels, index_path)
        return StripSplit(array, index, side, channels)
    expected = (splits[split]["count"], *manifest["shape"])
    if array.dtype != np.uint8 or array.shape != expected:
        raise DataError(f"{path}: holds {array.dtype} {array.shape}; the manifest says uint8 {expected}")
    return array


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: split file is missing") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npy array: {exc}") from None


NO_VERIFY_ENV = "NVAE_NO_VERIFY"  # "1": read prepared splits without checking their SHA-256


@contextlib.contextmanager
def unverified(enabled: bool = True) -> Iterator[None]:
    """Within the block, and in the processes started in it (they inherit NVAE_NO_VERIFY=1), prepared splits
    are read without checking their SHA-256 when `enabled` (a command's `--no-verify`); the variable is put back
    as it was afterwards, so later work in this process checks again."""
    if not enabled:
        yield
        return
    before = os.environ.get(NO_VERIFY_ENV)
    os.environ[NO_VERIFY_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(NO_VERIFY_ENV, None)
        else:
            os.environ[NO_VERIFY_ENV] = before


_VERIFIED: dict[tuple, bool] = {}  # (path, size, mtime_ns, sha256) checked in this process


def _inside(root: Path, name: str, field: str) -> Path:
    """`root / name`, refused unless it stays in `root` (no absolute path, no `..`, no link out)."""
    candidate = root / name
    if (
        Path(name).is_absolute()
        or ".." in Path(name).parts
        or not candidate.resolve().is_relative_to(root.resolve())
    ):
        raise DataError(f"{root / MANIFEST_NAME}: {field}={name!r} leaves the prepared folder {root}")
    return candidate


def verify_split(path: Path, expected: Any, field: str) -> None:
    """Check `path`'s SHA-256 against the manifest's; DataError naming the file on a mismatch or a missing
    hash. A verified (size, mtime, hash) is remembered in this process and in a small cache file
    (~/.cache/nvae/verified-splits.json, when writable), so a restarted run does not hash its data again."""
    if not (
        isinstance(expected, str) and len(expected) == 64 and all(c in "0123456789abcdef" for c in expected)
    ):
        raise DataError(
            f"{path}: the manifest records no valid sha256 for {field}; prepare it again, or pass --no-verify"
        )
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataError(f"{path}: split file is missing") from None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, expected)
    if _VERIFIED.get(key) or _cached(key):
        return
    from common.files import file_sha256

    actual = file_sha256(path)
    if actual != expected:
        raise DataError(
            f"{path}: sha256 {actual[:16]}... differs from the manifest's {expected[:16]}... ({field}): the file "
            "changed after `nvae prepare`; prepare it again, or pass --no-verify"
        )
    _VERIFIED[key] = True
    _remember(key)


def _cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nvae" / "verified-splits.json"


def _cached(key: tuple) -> bool:
    try:
        return "|".join(map(str, key)) in json.loads(_cache_file().read_text())
    except (OSError, ValueError, TypeError):
        return False


def _remember(key: tuple) -> None:
    """Add `key` to the cache file (the newest 256 entries), atomically; a cache that cannot be written
    only costs the next run one hash."""
    from common.files import atomic_write_json

    path = _cache_file()
    try:
        known = json.loads(path.read_text())
        known = known if isinstance(known, list) else []
    except (OSError, ValueError):
        known = []
    entry = "|".join(map(str, key))
    known = [k for k in known if k != entry][-255:] + [entry]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, known)
    except OSError:
        pass


class PreparedDataset:
    """One split of a prepared directory: `ds[i]` is uint8 (H, W, C); `len(ds)` images."""

    def __init__(self, prepared_dir: str | Path, split: str):
        self.root = Path(prepared_dir)
        self.split = split
        self.manifest = read_manifest(self.root)
        self.images = load_split(self.root, split, manifest=self.manifest)

    @property
    def dataset(self) -> str:
        return self.manifest["dataset"]

    @property
    def bits(self) -> int:
        return int(self.manifest["bits"])

    @property
    def max_value(self) -> int:
        return 2**self.bits - 1

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        return tuple(self.manifest["shape"])

    @property
    def flip(self) -> bool:
        """The recipe's default for horizontal-flip augmentation."""
        return bool(self.manifest.get("flip", False))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> np.ndarray:
        return np.asarray(self.images[index])


# ------------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class EpochPlan:
    """Which samples each batch of one rank's epoch holds, and how each sample is augmented."""

    indices: np.ndarray  # (n,) sample indices this rank sees this epoch, in order
    flips: np.ndarray | None  # (N,) bool over the whole split, or None
    crops: np.ndarray | None  # (N,) float in [0, 1) over the whole split: where each square sits, or None
    batch_size: int
    num_batches: int
    train: bool
    seed: int
    epoch: int
    binarize: bool

    def batch_indices(self, b: int) -> np.ndarray:
        return self.indices[b * self.batch_size : (b + 1) * self.batch_size]


def epoch_plan(
    num_samples: int,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = True,
    flip: bool = False,
    binarize: bool = False,
    crop: bool = False,
) -> EpochPlan:
    """The order, sharding and augmentation coins of one epoch for one rank (see the module docstring)."""
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} must be positive")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
    if train:
        order = np.random.default_rng([seed, epoch, _ORDER_STREAM]).permutation(num_samples)
    else:
        order = np.arange(num_samples)
    if drop_last:  # every rank gets the same number of samples: drop the tail of the epoch's order
        order = order[: num_samples // world_size * world_size]
    indices = order[rank::world_size]
    num_batches = len(indices) // batch_size if drop_last else math.ceil(len(indices) / batch_size)
    flips = None
    if train and flip:
        flips = np.random.default_rng([seed, epoch, _FLIP_STREAM]).random(num_samples) < 0.5
    crops = np.random.default_rng([seed, epoch, _CROP_STREAM]).random(num_samples) if train and crop else None
    return EpochPlan(indices, flips, crops, batch_size, num_batches, train, seed, epoch, binarize)


def binarize_noise(plan: EpochPlan, indices: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform noise float32 (B, *shape) for the samples `indices`, keyed by each sample's index."""
    noise = np.empty((len(indices), *shape), np.float32)
    for row, i in enumerate(indices):
        key = [plan.seed, plan.epoch, int(i), _NOISE_STREAM] if plan.train else [EVAL_BINARIZE_SEED, int(i)]
        noise[row] = np.random.default_rng(key).random(shape, dtype=np.float32)
    return noise


def gather(
    images: np.ndarray | StripSplit, plan: EpochPlan, b: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Batch b as uint8 (B, H, W, C), its flip flags (B,) and binarization noise (B, H, W, C) or None."""
    idx = plan.batch_indices(b)
    order = np.argsort(idx, kind="stable")  # sorted reads are kinder to a memory map
    batch = np.empty((len(idx), *images.shape[1:]), np.uint8)
    if isinstance(images, StripSplit):
        crops = plan.crops[idx[order]] if plan.crops is not None else None
        batch[order] = images.crop(idx[order], crops)
    else:
        batch[order] = images[idx[order]]
    flags = plan.flips[idx] if plan.flips is not None else np.zeros(len(idx), bool)
    noise = binarize_noise(plan, idx, images.shape[1:]) if plan.binarize else None
    return batch, flags, noise


def make_batch(images: np.ndarray, plan: EpochPlan, b: int, max_value: int) -> torch.Tensor:
    """Batch b as float32 (B, C, H, W) in [0, 1], flipped and binarized per the plan (numpy path)."""
    batch, flags, noise = gather(images, plan, b)
    if flags.any():
        batch[flags] = batch[flags][:, :, ::-1]
    x = batch.astype(np.float32) / np.float32(max_value)
    if noise is not None:
        x = (x > noise).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


# ------------------------------------------------------------------------------------------ loaders


class _BatchDataset(torch.utils.data.Dataset):
    """Map-style dataset whose item b is the whole batch b of an epoch plan."""

    def __init__(self, dataset: PreparedDataset, plan: EpochPlan):
        self.dataset, self.plan = dataset, plan

    def __len__(self) -> int:
        return self.plan.num_batches

    def __getitem__(self, b: int) -> torch.Tensor:
        return make_batch(self.dataset.images, self.plan, b, self.dataset.max_value)


class PreparedLoader:
    """Iterable over one epoch's batches, float32 (B, C, H, W) in [0, 1]; `len()` = batches per epoch.

    Iteration starts at `start_batch` (for exact resume), so it yields `len(self) - start_batch` batches.
    Iterating again replays the same epoch; build a new loader (or call `set_epoch`) for the next one.
    """

    def __init__(
        self,
        dataset: PreparedDataset,
        plan: EpochPlan,
        *,
        start_batch: int,
        device: str,
        backend: str,
        num_workers: int,
        pin_memory: bool,
        plan_args: dict[str, Any],
    ):
        self.dataset, self.plan = dataset, plan
        self.start_batch = start_batch
        self.device, self.backend = device, backend
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._plan_args = plan_args

    def __len__(self) -> int:
        return self.plan.num_batches

    @property
    def epoch(self) -> int:
        return self.plan.epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Switch to another epoch (fresh order and coins), starting at batch `start_batch`."""
        self.plan = epoch_plan(len(self.dataset), **{**self._plan_args, "epoch": epoch})
        self.start_batch = _check_start(start_batch, self.plan.num_batches)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.backend == "dali":
            yield from _dali_batches(self)
            return
        loader = torch.utils.data.DataLoader(
            _BatchDataset(self.dataset, self.plan),
            batch_size=None,
            sampler=range(self.start_batch, self.plan.num_batches),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )
        for batch in loader:
            yield batch.to(self.device, non_blocking=self.pin_memory) if self.device != "cpu" else batch


def _check_start(start_batch: int, num_batches: int) -> int:
    if not 0 <= start_batch <= num_batches:
        raise DataError(f"start_batch={start_batch} is outside the epoch's {num_batches} batches")
    return start_batch


def make_loader(
    prepared_dir: str | Path,
    split: str,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    binarize: bool = False,
    flip: bool | None = None,
    device: str = "cpu",
    drop_last: bool = True,
    backend: str | None = None,
    num_workers: int = 0,
) -> PreparedLoader:
    """A deterministic loader over `prepared_dir`'s `split`, yielding float32 (B, C, H, W) in [0, 1].

    flip: None = the recipe's default from the manifest; flips apply only when `train`. binarize: dynamic
    binarization (fixed-seed when not `train`). device: 'cpu' or a CUDA device. backend: 'torch' (a
    DataLoader) or 'dali' (a DALI iterator); default 'dali' for CUDA devices, 'torch' for CPU.
    """
    dataset = PreparedDataset(prepared_dir, split)
    device = str(device)
    if device == "gpu":
        device = "cuda"
    is_cuda = device.startswith("cuda")
    if not (is_cuda or device == "cpu"):
        raise DataError(f"device={device!r}: use 'cpu' or 'cuda[:N]'")
    if is_cuda and not torch.cuda.is_available():
        raise DataError(f"device={device!r} requested but no CUDA device is available")
    backend = backend or ("dali" if is_cuda else "torch")
    if backend not in ("torch", "dali"):
        raise DataError(f"backend={backend!r}: use 'torch' or 'dali'")
    plan_args = {
        "batch_size": batch_size,
        "train": train,
        "seed": seed,
        "rank": rank,
        "world_size": world_size,
        "drop_last": drop_last,
        "flip": dataset.flip if flip is None else flip,
        "binarize": binarize,
        "crop": isinstance(dataset.images, StripSplit),
    }
    plan = epoch_plan(len(dataset), epoch=epoch, **plan_args)
    return PreparedLoader(
        dataset,
        plan,
        start_batch=_check_start(start_batch, plan.num_batches),
        device=device,
        backend=backend,
        num_workers=num_workers,
        pin_memory=is_cuda and backend == "torch",
        plan_args=plan_args,
    )


# --------------------------------------------------------------------------------------------- DALI


def _dali_batches(loader: PreparedLoader) -> Iterator[torch.Tensor]:
    """The same batches as the torch path, with flips, scaling and binarization run by a DALI pipeline.

    The flip coins and binarization noise come from the epoch plan (fed as inputs), so both paths agree
    exactly. On a CUDA device the pipeline runs on that GPU and batches arrive as CUDA tensors.
    """
    from nvidia.dali import Pipeline, fn, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    from data.dali_ops import cpu_threads

    plan, dataset = loader.plan, loader.dataset
    on_gpu = loader.device.startswith("cuda")
    device_id = (torch.device(loader.device).index or 0) if on_gpu else None
    batches = iter(range(loader.start_batch, plan.num_batches))

    def feed():
        try:
            b = next(batches)
        except StopIteration:
            raise StopIteration from None
        batch, flags, noise = gather(dataset.images, plan, b)
        out = [batch, flags.astype(np.int32)]
        if plan.binarize:
            out.append(noise)
        return tuple(out)

    pipe = Pipeline(
        batch_size=plan.batch_size,
        num_threads=min(cpu_threads(), 4),
        device_id=device_id,
        prefetch_queue_depth=2,
        seed=plan.seed,
    )
    with pipe:
        inputs = fn.external_source(
            source=feed,
            num_outputs=3 if plan.binarize else 2,
            batch=True,
            layout=["HWC", ""] + (["HWC"] if plan.binarize else []),
        )
        images, flags = inputs[0], inputs[1]
        if on_gpu:
            images = images.gpu()
        images = fn.flip(images, horizontal=flags)
        x = fn.cast(images, dtype=types.FLOAT) / float(dataset.max_value)
        if plan.binarize:
            noise = inputs[2].gpu() if on_gpu else inputs[2]
            x = fn.cast(x > noise, dtype=types.FLOAT)
        pipe.set_outputs(fn.transpose(x, perm=[2, 0, 1], output_layout="CHW"))
    pipe.build()
    if plan.num_batches - loader.start_batch <= 0:
        return
    iterator = DALIGenericIterator([pipe], ["x"], auto_reset=False)
    for out in iterator:
        yield out[0]["x"]
