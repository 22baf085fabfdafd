"""FID (Heusel et al., 2017) of NVAE samples against a prepared dataset, as the authors' `evaluate.py
--eval_mode=evaluate_fid` computes it: the 2048-d pool features of the FID Inception network (pytorch-fid's
port of the TensorFlow graph) for N decoded samples (the pixel distribution's mean, in [0, 1]; gray images
repeated to three channels; resized to 299 x 299 inside the network), and the Frechet distance of their mean
and covariance to the training set's.

The network, the resizing and the distance are pytorch-fid's own (`pytorch_fid.inception.InceptionV3`,
`pytorch_fid.fid_score.calculate_frechet_distance`); this module feeds them batches and checks what they
read. The weights are never downloaded: they come from a path or an s3:// URI the user gives, checked by
SHA-256 (pytorch-fid's file by default). Reference statistics carry the dataset they were computed from (the
SHA-256 of its split files), the Inception weights' SHA-256 and the image count, so statistics of another
dataset or another network are refused, and a second request for the same statistics reuses the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import ConfigError, DataError

log = logging.getLogger(__name__)

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
DIMS = 2048  # the final average pool: the features FID is defined on
STATS_FORMAT = "nvae-fid-statistics"
STATS_VERSION = 1
DEFAULT_MAX_IMAGES = 50_000  # the authors' reference set and sample count
# The authors' reference statistics use the training split, and for these also their validation loader's
# images (scripts/precompute_fid_statistics.py chains the two): CelebA HQ's 3k held out and OMNIGLOT's test
# data, our `test` split of both.
WITH_HELD_OUT = frozenset({"celebahq256", "omniglot"})


def cache_dir() -> Path:
    """Where statistics and downloaded weights are kept: $XDG_CACHE_HOME/nvae/fid (~/.cache/nvae/fid)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nvae" / "fid"


def _pytorch_fid():
    try:
        import pytorch_fid.fid_score
        import pytorch_fid.inception
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"FID needs pytorch-fid ({exc.name} is missing): pip install 'nvae-pipeline[fid]'"
        ) from None
    return pytorch_fid


# ------------------------------------------------------------------------------------------ the network
@dataclass
class Inception:
    """The FID Inception network (pool features), its weights' SHA-256 and the device it runs on."""

    net: torch.nn.Module
    sha256: str
    device: torch.device


def _missing_weights(where: str) -> ConfigError:
    return ConfigError(
        f"{where}: no such file; FID needs pytorch-fid's Inception weights {WEIGHTS_NAME} (95.6 MB, sha256 "
        f"{WEIGHTS_SHA256[:16]}...), from {WEIGHTS_URL}: give its path or an s3:// URI with --inception"
    )


def fetch_weights(weights: str | Path, sha256: str = WEIGHTS_SHA256) -> Path:
    """A local path to the weights `weights` (a path, or s3://bucket/key downloaded once into `cache_dir()`
    under its SHA-256), checked against `sha256`. ConfigError for a missing file or another SHA-256."""
    from common.files import file_sha256

    if not (isinstance(sha256, str) and len(sha256) == 64 and all(c in "0123456789abcdef" for c in sha256)):
        raise ConfigError(f"--inception-sha256 {sha256!r}: expected 64 lowercase hex digits")
    if str(weights).startswith("s3://"):
        from common.s3 import download_object

        local = cache_dir() / "weights" / f"{sha256}.pth"
        if not (local.is_file() and file_sha256(local) == sha256):
            local.parent.mkdir(parents=True, exist_ok=True)
            download_object(str(weights), local)
        path = local
    else:
        path = Path(weights)
        if not path.is_file():
            raise _missing_weights(str(weights) or "--inception (empty)")
    actual = file_sha256(path)
    if actual != sha256:
        hint = (
            f"pytorch-fid's {WEIGHTS_NAME} has {WEIGHTS_SHA256[:16]}...; " if sha256 == WEIGHTS_SHA256 else ""
        )
        raise ConfigError(
            f"{weights}: sha256 {actual[:16]}... is not the expected {sha256[:16]}... ({hint}to use this file "
            f"on purpose, pass --inception-sha256 {actual})"
        )
    return path


def load_inception(
    weights: str | Path, sha256: str = WEIGHTS_SHA256, device: str | torch.device = "cpu"
) -> Inception:
    """pytorch-fid's `InceptionV3` returning the 2048-d pool features, with the weights of `weights` (checked
    by `fetch_weights`) instead of the file pytorch-fid would download."""
    from unittest import mock

    pytorch_fid = _pytorch_fid()
    path = fetch_weights(weights, sha256)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input
        raise ConfigError(f"{weights}: not a readable PyTorch state dict ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{weights}: holds a {type(state).__name__}, not a state dict")
    # pytorch-fid builds the network and loads the file it downloads through this one name; hand it ours.
    module = pytorch_fid.inception
    if not hasattr(module, "load_state_dict_from_url"):
        raise ConfigError("this pytorch-fid has no load_state_dict_from_url; install pytorch-fid 0.3")
    try:
        with mock.patch.object(module, "load_state_dict_from_url", lambda *a, **k: state):
            net = module.InceptionV3([module.InceptionV3.BLOCK_INDEX_BY_DIM[DIMS]])
    except RuntimeError as exc:  # load_state_dict: missing or unexpected keys, other shapes
        first = str(exc).splitlines()[0]
        raise ConfigError(f"{weights}: not the FID Inception network's weights ({first})") from None
    device = torch.device(device)
    return Inception(net.eval().to(device), sha256, device)


def write_random_weights(path: str | Path, seed: int = 0) -> str:
    """A state dict of pytorch-fid's FID Inception architecture with random He-scaled conv weights (so features
    neither vanish nor explode), written to `path`; returns its SHA-256. The real network's cost with
    meaningless values: for tests and benchmarks where the real file is not at hand."""
    from unittest import mock

    from common.files import file_sha256
    from model.checkpoint import atomic_torch_save

    module = _pytorch_fid().inception
    built: dict = {}

    def keep(self, state, *args, **kwargs):  # pytorch-fid loads its download through this
        built["net"] = self

    with (
        mock.patch.object(module, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(torch.nn.Module, "load_state_dict", keep),
    ):
        module.fid_inception_v3()
    g = torch.Generator().manual_seed(seed)
    state = built["net"].state_dict()
    for name, value in state.items():
        if name.endswith("conv.weight"):
            state[name] = torch.randn(value.shape, generator=g) * (2.0 / value[0].numel()) ** 0.5
    atomic_torch_save(state, path)
    return file_sha256(path)


@torch.no_grad()
def features(inception: Inception, images: torch.Tensor) -> np.ndarray:
    """(B, 2048) float32 pool features of images (B, C, H, W) in [0, 1]; gray images are repeated to three
    channels, as pytorch-fid's file reader (PIL's RGB conversion) and the authors' loop do."""
    x = torch.as_tensor(images).to(inception.device, torch.float32)
    if x.size(1) == 1:
        x = x.repeat(1, 3, 1, 1)
    pred = inception.net(x)[0]
    return pred.squeeze(3).squeeze(2).cpu().numpy()


def statistics(activations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (2048,) and covariance (2048, 2048) of (N, 2048) features, as pytorch-fid computes them."""
    if activations.shape[0] < 2:
        raise ConfigError(f"FID needs at least 2 images; got {activations.shape[0]}")
    return np.mean(activations, axis=0), np.cov(activations, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid's Frechet distance between two Gaussians."""
    return float(_pytorch_fid().fid_score.calculate_frechet_distance(mu1, sigma1, mu2, sigma2))


def activations_of(
    batches: Iterable[torch.Tensor | np.ndarray], inception: Inception, total: int, desc: str
) -> np.ndarray:
    """Features of every image the batches hold, with a progress line counted in images."""
    from common.progress import progress

    out = np.empty((total, DIMS), dtype=np.float32)
    done = 0
    with progress(total=total, desc=desc, unit="img") as bar:
        for batch in batches:
            f = features(inception, torch.as_tensor(batch))
            out[done : done + len(f)] = f
            done += len(f)
            bar.update(len(f))
    if done != total:
        raise RuntimeError(f"{desc}: {done} images where {total} were expected")
    return out


# -------------------------------------------------------------------------------- reference statistics
@dataclass
class Reference:
    """Statistics of a dataset's images: mean, covariance and what they were computed from."""

    mu: np.ndarray
    sigma: np.ndarray
    meta: dict[str, Any]
    path: Path | None = None
    reused: bool = False

    def describe(self) -> str:
        m = self.meta
        return f"{m['dataset']} {'+'.join(m['splits'])} ({m['images']} images)"


def reference_splits(manifest: dict) -> list[str]:
    """The splits the authors' reference statistics use: train, and test too for celebahq256 and omniglot."""
    splits = ["train"] if "train" in manifest["splits"] else []
    if manifest["dataset"] in WITH_HELD_OUT and "test" in manifest["splits"]:
        splits.append("test")
    if not splits:
        raise DataError(
            f"prepared {manifest['dataset']} has no train split ({', '.join(manifest['splits'])})"
        )
    return splits


def reference_meta(manifest: dict, inception_sha256: str, images: int) -> dict[str, Any]:
    """What identifies a dataset's statistics: its name, shape, bits, splits with their SHA-256, the count of
    images and the Inception weights."""
    splits = reference_splits(manifest)
    available = sum(int(manifest["splits"][s]["count"]) for s in splits)
    return {
        "format": STATS_FORMAT,
        "version": STATS_VERSION,
        "dataset": manifest["dataset"],
        "shape": list(manifest["shape"]),
        "bits": int(manifest["bits"]),
        "splits": {s: manifest["splits"][s].get("sha256") for s in splits},
        "images": min(images, available),
        "inception_sha256": inception_sha256,
    }


def _stats_name(meta: dict) -> str:
    digest = "-".join(str(v)[:12] for v in meta["splits"].values())
    return f"{meta['dataset']}-{digest}-{meta['inception_sha256'][:12]}-{meta['images']}.npz"


def read_reference(path: str | Path) -> Reference:
    """Statistics written by `dataset_statistics`; DataError naming the file when it is not one."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            mu, sigma, meta = npz["mu"], npz["sigma"], json.loads(str(npz["meta"]))
    except FileNotFoundError:
        raise DataError(f"{path}: no such statistics file; write it with `nvae fid-stats`") from None
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: not FID statistics from `nvae fid-stats` ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != STATS_FORMAT:
        raise DataError(f"{path}: not FID statistics from `nvae fid-stats` (no {STATS_FORMAT!r} record)")
    if meta.get("version") != STATS_VERSION:
        raise DataError(f"{path}: statistics version {meta.get('version')!r}; this reads {STATS_VERSION}")
    if (
        mu.shape != (DIMS,)
        or sigma.shape != (DIMS, DIMS)
        or not (np.isfinite(mu).all() and np.isfinite(sigma).all())
    ):
        raise DataError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not finite 2048-d statistics")
    return Reference(mu, sigma, meta, path)


def write_reference(ref: Reference, path: str | Path) -> Path:
    from common.files import atomic_open

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as fh:
        np.savez(fh, mu=ref.mu, sigma=ref.sigma, meta=np.array(json.dumps(ref.meta, sort_keys=True)))
    ref.path = path
    return path


def _reference_images(
    data: str | Path, splits: list[str], count: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(split array, indices into it) of the images statistics are computed on: every image of `splits` when
    they hold `count`, else `count` of them chosen by `seed` (the authors take the first of a shuffled
    loader), in stored order."""
    from data.loaders import load_split

    arrays = [load_split(data, s) for s in splits]
    sizes = [len(a) for a in arrays]
    total = sum(sizes)
    chosen = np.arange(total)
    if count < total:
        chosen = np.sort(np.random.default_rng(seed).choice(total, count, replace=False))
    offsets = np.cumsum([0, *sizes])
    for i, a in enumerate(arrays):
        local = chosen[(chosen >= offsets[i]) & (chosen < offsets[i + 1])] - offsets[i]
        yield a, local


def dataset_statistics(
    data: str | Path,
    inception: Inception,
    *,
    out: str | Path | None = None,
    max_images: int = DEFAULT_MAX_IMAGES,
    batch_size: int = 50,
    seed: int = 0,
) -> Reference:
    """Reference statistics of prepared `data` (`reference_splits`, up to `max_images` images, not binarized:
    the authors compute FID on the gray values) at `out`, default `cache_dir()/<dataset>-<hashes>.npz`.
    A file there for the same dataset, network and count is reused, not recomputed."""
    from common.files import check_writable
    from data.loaders import read_manifest

    manifest = read_manifest(data)
    meta = reference_meta(manifest, inception.sha256, max_images)
    if meta["images"] < sum(int(manifest["splits"][s]["count"]) for s in meta["splits"]):
        meta["subset_seed"] = seed  # a subset: which one is part of what the statistics are
    path = Path(out) if out else cache_dir() / _stats_name(meta)
    if path.is_file():
        try:
            found = read_reference(path)
        except DataError:
            found = None
        if found is not None and found.meta == meta:
            found.reused = True
            return found
    check_writable(path)  # before the work, not after it
    max_value = 2 ** int(manifest["bits"]) - 1

    def batches():
        for array, indices in _reference_images(data, list(meta["splits"]), meta["images"], seed):
            for i in range(0, len(indices), batch_size):
                x = np.asarray(array[indices[i : i + batch_size]], dtype=np.float32) / max_value
                yield torch.from_numpy(x).permute(0, 3, 1, 2)

    act = activations_of(batches(), inception, meta["images"], f"fid-stats {meta['dataset']}")
    mu, sigma = statistics(act)
    ref = Reference(mu, sigma, meta)
    write_reference(ref, path)
    return ref


def check_reference(ref: Reference, *, dataset: str, image_shape: tuple[int, ...], inception_sha256: str,
                    data_meta: dict | None = None) -> None:  # fmt: skip
    """ConfigError unless `ref` holds statistics of `dataset` at `image_shape` (C, H, W), made with the same
    Inception weights (and, with `data_meta`, of the same prepared files)."""
    where = ref.path or "the reference statistics"
    m = ref.meta
    if m.get("dataset") != dataset:
        raise ConfigError(f"{where}: statistics of {m.get('dataset')!r}, but the model is for {dataset!r}")
    h, w, c = m["shape"]
    if (c, h, w) != tuple(image_shape):
        raise ConfigError(
            f"{where}: statistics of {(c, h, w)} images, but the model makes {tuple(image_shape)}"
        )
    if m.get("inception_sha256") != inception_sha256:
        raise ConfigError(
            f"{where}: computed with Inception weights {str(m.get('inception_sha256'))[:16]}..., not "
            f"{inception_sha256[:16]}...; compute them again with `nvae fid-stats` and these weights"
        )
    if data_meta is not None and data_meta["splits"] != m["splits"]:
        raise ConfigError(f"{where}: computed from other {dataset} files than the prepared data given")


# ----------------------------------------------------------------------------------------------- samples
def batch_seed(seed: int, index: int) -> int:
    """The sampling seed of batch `index` of a run seeded `seed` (distinct across seeds and batches)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


@dataclass
class Samples:
    """A source of decoded samples: `draw(n, seed)` gives (n, C, H, W) float images in [0, 1]."""

    draw: Callable[[int, int], torch.Tensor | np.ndarray]
    dataset: str
    image_shape: tuple[int, ...]
    source: str  # "checkpoint" or "onnx"
    bn: dict[str, Any] = field(default_factory=dict)  # bn_readjusted, bn_temperature
    # Work before the first draw (BN readjustment), after the checks.
    prepare: Callable[[], None] = lambda: None


def checkpoint_samples(
    checkpoint: str | Path,
    temperature: float,
    *,
    readjust: bool = False,
    readjust_iters: int = 500,
    readjust_batch: int = 2,
    device: str | None = None,
    seed: int = 0,
) -> Samples:
    """Samples of a checkpoint at `temperature`: the decoder's mean image, as the authors' FID loop takes. With
    `readjust`, the BN statistics are first re-estimated at `temperature` (`inference.readjust`; the authors'
    FID mode uses 500 passes of 2 samples)."""
    from inference.checkpoints import default_device, load_for_inference
    from inference.readjust import readjust_bn
    from model.prior_sampling import sample_images

    model, payload = load_for_inference(checkpoint, default_device(device))
    done = payload.get("bn_readjust") or {}
    if readjust:
        bn = {"bn_readjusted": True, "bn_temperature": temperature}
    elif done.get("temperature") is not None:
        bn = {"bn_readjusted": True, "bn_temperature": float(done["temperature"])}
    else:
        bn = {"bn_readjusted": False, "bn_temperature": None}
    if bn["bn_readjusted"] and abs(bn["bn_temperature"] - temperature) > 1e-6:
        log.warning("BN was readjusted at t=%g but FID samples at t=%g", bn["bn_temperature"], temperature)

    def draw(n: int, s: int) -> torch.Tensor:
        return sample_images(model, n, temperature, s, decode="mean", batch_size=n)

    def prepare() -> None:
        if readjust:
            readjust_bn(model, temperature, readjust_iters, readjust_batch, seed)

    cfg = model.cfg
    shape = (cfg.in_channels, cfg.data_size, cfg.data_size)
    return Samples(draw, cfg.dataset, shape, "checkpoint", bn, prepare)


def onnx_samples(sampler, temperature: float, *, readjust: bool = False) -> Samples:
    """Samples of an ONNX decoder (`serving.onnx_sampler.OnnxSampler` or alike) at `temperature`; its BN
    statistics are the ones baked in at export."""
    if readjust:
        raise ConfigError("an ONNX decoder carries its BN statistics; readjust the checkpoint before export")
    if sampler.decode != "mean":
        raise ConfigError(
            f"{sampler.path}: exported with decode={sampler.decode}; FID is computed on the mean image "
            "(re-export with --decode mean)"
        )
    cfg = json.loads(sampler.metadata.get("nvae.config", "{}"))
    baked = sampler.metadata.get("nvae.bn_readjust_temperature", "")
    bn = {"bn_readjusted": bool(baked), "bn_temperature": float(baked) if baked else None}
    return Samples(
        lambda n, s: sampler.sample(n, temperature, s), cfg.get("dataset", ""), tuple(sampler.image_shape),
        "onnx", bn,
    )  # fmt: skip


def sample_fid(
    samples: Samples,
    reference: Reference,
    inception: Inception,
    *,
    n: int = DEFAULT_MAX_IMAGES,
    temperature: float,
    batch_size: int = 100,
    seed: int = 0,
    data_meta: dict | None = None,
) -> dict[str, Any]:
    """FID of `n` samples against `reference`, after checking that the reference fits the samples. Returns the
    metrics: fid, fid_samples, fid_temperature, fid_bn_readjusted, fid_bn_temperature, the reference, time."""
    check_reference(reference, dataset=samples.dataset, image_shape=samples.image_shape,
                    inception_sha256=inception.sha256, data_meta=data_meta)  # fmt: skip
    if n < 2:
        raise ConfigError(f"--n {n}: FID needs at least 2 samples")
    samples.prepare()
    t0 = time.perf_counter()
    sizes = [min(batch_size, n - i) for i in range(0, n, batch_size)]

    def batches():
        for b, size in enumerate(sizes):
            x = samples.draw(size, batch_seed(seed, b))
            if not bool(np.isfinite(np.asarray(x)).all()):
                raise ConfigError(
                    f"--temperature {temperature:g}: the decoder's output is not finite; sample at a lower one"
                )
            yield x

    act = activations_of(batches(), inception, n, "fid")
    mu, sigma = statistics(act)
    fid = frechet_distance(mu, sigma, reference.mu, reference.sigma)
    seconds = time.perf_counter() - t0
    if not math.isfinite(fid):
        raise ConfigError(f"FID is not finite ({fid}); more samples give a better-conditioned covariance")
    return {
        "fid": fid,
        "fid_samples": n,
        "fid_temperature": temperature,
        "fid_bn_readjusted": samples.bn["bn_readjusted"],
        "fid_bn_temperature": samples.bn["bn_temperature"],
        "fid_source": samples.source,
        "fid_reference": {k: reference.meta[k] for k in ("dataset", "splits", "images", "inception_sha256")},
        "fid_seconds": seconds,
        "fid_images_per_s": n / seconds,
    }


def fid_to_file(
    out: str | Path,
    *,
    inception: str | Path,
    inception_sha256: str = WEIGHTS_SHA256,
    checkpoint: str | Path | None = None,
    onnx: str | Path | None = None,
    open_onnx: Callable[[str | Path, str], Any] | None = None,
    stats: str | Path | None = None,
    data: str | Path | None = None,
    n: int = DEFAULT_MAX_IMAGES,
    temperature: float = 1.0,
    readjust: bool = False,
    readjust_iters: int = 500,
    readjust_batch: int = 2,
    batch_size: int = 100,
    seed: int = 0,
    device: str | None = None,
) -> dict[str, Any]:
    """`nvae fid`: FID of `n` samples of `checkpoint` or of the ONNX decoder `onnx` (exactly one; `open_onnx`
    opens it, as in `inference.sample.sample_to_dir`) against `stats` (from `nvae fid-stats`) or the
    statistics of prepared `data` (computed once, then reused from `cache_dir()`); with both, `stats` must be
    of `data`'s files. Writes the metrics JSON `out` atomically and returns it. Every input is checked before
    the first sample. `n` 0 writes {"fid": null, "fid_samples": 0} and computes nothing."""
    from common.files import atomic_write_json, check_writable
    from inference.checkpoints import default_device

    if bool(checkpoint) == bool(onnx):
        raise ConfigError("give exactly one of --checkpoint or --onnx")
    if n == 0:  # off (the DVC stage's default): a record that says so, for `dvc metrics show`
        metrics = {"fid": None, "fid_samples": 0, "fid_temperature": temperature}
        atomic_write_json(out, metrics)
        return metrics
    if not (stats or data):
        raise ConfigError("give --stats (from `nvae fid-stats`) or --data (a prepared dataset)")
    check_writable(out)
    dev = default_device(device)
    net = load_inception(inception, inception_sha256, dev)
    data_meta = None
    if data is not None:
        from data.loaders import read_manifest

        data_meta = reference_meta(read_manifest(data), net.sha256, DEFAULT_MAX_IMAGES)
    if onnx:
        sampler = open_onnx(onnx, {"cuda": "cuda", "cpu": "cpu"}.get(device or "", "auto"))
        source = onnx_samples(sampler, temperature, readjust=readjust)
    else:
        source = checkpoint_samples(checkpoint, temperature, readjust=readjust, readjust_iters=readjust_iters,
                                    readjust_batch=readjust_batch, device=device, seed=seed)  # fmt: skip
    if data is not None:  # before hours of statistics of the wrong images
        h, w, c = data_meta["shape"]
        if data_meta["dataset"] != source.dataset or (c, h, w) != tuple(source.image_shape):
            raise ConfigError(
                f"{data} holds {data_meta['dataset']!r} {(c, h, w)} images, but the model makes "
                f"{source.dataset!r} {tuple(source.image_shape)}"
            )
    if stats:
        reference = read_reference(stats)
    else:
        reference = dataset_statistics(data, net, batch_size=min(batch_size, 100), seed=seed)
        log.info("reference statistics %s: %s", "reused" if reference.reused else "written", reference.path)
    metrics = sample_fid(source, reference, net, n=n, temperature=temperature, batch_size=batch_size,
                         seed=seed, data_meta=data_meta)  # fmt: skip
    metrics["fid_reference"]["path"] = str(reference.path) if reference.path else None
    atomic_write_json(out, metrics)
    return metrics
