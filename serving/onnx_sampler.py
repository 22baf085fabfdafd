"""Fast batch sampling from an exported decoder (`inference.export`) with onnxruntime.

The noise is drawn exactly as the PyTorch backend draws it (`model.prior_sampling.draw_noise`: NumPy's generator
seeded with `seed`, float32 standard normals per group coarse first; for decode=sample the uniforms of
`decode_images`, per block of `SAMPLE_NOISE_BLOCK` images seeded `seed + offset`), so `--checkpoint` and
`--onnx` with the same seed give the same images. Nothing here imports torch.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.cpu import cpu_flags_line
from common.errors import CheckpointError, ConfigError
from common.files import atomic_path

log = logging.getLogger(__name__)

# `model.prior_sampling.sample_images` decodes in chunks of its `batch_size` (default 64) and seeds the pixel noise
# of each chunk with `seed + offset`; decode=sample matches it at that default.
SAMPLE_NOISE_BLOCK = 64
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of activations per run on CPU
CUDA_MEMORY_BUDGET = 8 << 30
MAX_AUTO_BATCH = 256
MAX_SEED = 2**63 - 1


class OnnxModelError(CheckpointError):
    """The file is not an exported NVAE decoder, or onnxruntime cannot load it."""


def resolve_providers(providers: str | Sequence | None) -> list:
    """None / "auto": CUDA when this onnxruntime build has it, then CPU. "cpu" / "cuda": that one (CUDA with
    CPU fallback). A list is passed through. Which ones load is only known after the session is created."""
    import onnxruntime as ort

    if providers is None or providers == "auto":
        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return [p for p in wanted if p in ort.get_available_providers()] or ["CPUExecutionProvider"]
    if providers == "cpu":
        return ["CPUExecutionProvider"]
    if providers == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if isinstance(providers, str):
        raise ConfigError(f"providers={providers!r}; choose auto, cpu, cuda or a list of provider names")
    return list(providers)


def cpu_limit(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: the container's CPU quota (cgroup v2 `cpu.max`, or v1
    `cpu.cfs_quota_us / cpu.cfs_period_us`), rounded up, within the CPUs of its affinity mask. A pod limited
    to 2 CPUs on a 64-core node gets 2 threads, not 64 that the quota would then throttle."""
    cores = len(os.sched_getaffinity(0))
    quota = period = None
    try:
        fields = (cgroup / "cpu.max").read_text().split()
        if fields and fields[0] != "max":
            quota, period = int(fields[0]), int(fields[1])
    except (OSError, ValueError, IndexError):
        try:
            quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
            period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            pass
    if quota and period and quota > 0:
        return max(1, min(cores, math.ceil(quota / period)))
    return cores


def session_options(threads: int | None = None, optimize: bool = True):
    """Throughput settings: all graph optimisations (none for a graph that is already optimised), one
    sequential stream using every core we may use, denormals flushed (NVAE's small activations otherwise
    stall the CPU kernels)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    level = ort.GraphOptimizationLevel
    so.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads or cpu_limit()
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.set_denormal_as_zero", "1")
    so.log_severity_level = 3  # errors only: fp16 graphs log a warning per node it cannot fold on CPU
    return so


class OnnxSampler:
    """n images at a temperature from an exported decoder.

    `providers`: None or "auto" (CUDA if onnxruntime-gpu finds a GPU, else CPU), "cpu", "cuda", or a list.
    With "cuda", a CUDA provider that does not load is an error unless `allow_cpu_fallback`.
    `.providers` holds the providers the session actually uses; `.metadata` the file's `nvae.*` metadata.
    `cache_dir`: keep onnxruntime's optimised graph there between starts (`_open_session`). `io_binding`:
    run through onnxruntime's IO binding (default: on CUDA only).
    """

    def __init__(
        self,
        path: str | Path,
        providers: str | Sequence | None = None,
        *,
        threads: int | None = None,
        memory_budget: int | None = None,
        allow_cpu_fallback: bool = False,
        cache_dir: str | Path | None = None,
        io_binding: bool | None = None,
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise OnnxModelError(f"ONNX file not found: {self.path}")
        wanted = resolve_providers(providers)
        self.session, self.cached = _open_session(self.path, wanted, threads, cache_dir)
        self.providers: list[str] = self.session.get_providers()
        # IO binding (None: on CUDA only): on CUDA the output stays on the device until one copy; on CPU it
        # saves one output copy (bench/ort_session.py compares it with a plain run).
        self.io_binding = self.device == "cuda" if io_binding is None else io_binding
        if "CUDAExecutionProvider" in wanted and "CUDAExecutionProvider" not in self.providers:
            if providers == "cuda" and not allow_cpu_fallback:
                raise OnnxModelError(
                    f"{self.path}: the CUDA provider did not load (onnxruntime runs on {self.providers}); "
                    "fix the GPU setup or pass --allow-cpu-fallback"
                )
            log.warning("CUDAExecutionProvider is listed but did not load; running on %s", self.providers)
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.registry_version = registry_version(self.path)
        if "nvae.latent_shapes" not in self.metadata:
            raise OnnxModelError(f"{self.path}: no nvae.* metadata; export it with `nvae export-onnx`")
        self.latent_shapes = [tuple(s) for s in json.loads(self.metadata["nvae.latent_shapes"])]
        self.image_shape = tuple(json.loads(self.metadata["nvae.image_shape"]))
        self.decode = self.metadata["nvae.decode"]
        self.uniforms = [(n, tuple(s)) for n, s in json.loads(self.metadata.get("nvae.uniform_inputs", "[]"))]
        # [1]: one temperature per call; ["batch", 1]: one per image (the Triton layout's model.onnx)
        self.temperature_per_image = json.loads(self.metadata.get("nvae.temperature_shape", "[1]")) != [1]
        on_cuda = self.providers[0] == "CUDAExecutionProvider"
        budget = memory_budget or (CUDA_MEMORY_BUDGET if on_cuda else DEFAULT_MEMORY_BUDGET)
        per_image = max(1, int(self.metadata.get("nvae.activation_bytes_per_image", "0")) or 1 << 20)
        self.auto_batch_size = int(min(MAX_AUTO_BATCH, max(1, budget // per_image)))
        log.info(
            "onnx sampler %s on %s (batches of %d)", self.path.name, self.providers, self.auto_batch_size
        )

    @property
    def device(self) -> str:
        return "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"

    def noise(self, n: int, seed: int) -> dict[str, np.ndarray]:
        """Every random input of the graph for n images, drawn as the PyTorch backend draws them."""
        rng = np.random.default_rng(seed)
        feeds = {
            f"eps_{j}": rng.standard_normal((n, *s), dtype=np.float32)
            for j, s in enumerate(self.latent_shapes)
        }
        if self.uniforms:
            blocks: dict[str, list[np.ndarray]] = {name: [] for name, _ in self.uniforms}
            for i in range(0, n, SAMPLE_NOISE_BLOCK):
                b = min(SAMPLE_NOISE_BLOCK, n - i)
                rng = np.random.default_rng(seed + i)
                for name, shape in self.uniforms:
                    blocks[name].append(rng.random((b, *shape), dtype=np.float32))
            feeds.update({name: np.concatenate(parts) for name, parts in blocks.items()})
        return feeds

    def sample(
        self,
        n: int,
        temperature: float,
        seed: int = 0,
        batch_size: int | None = None,
        *,
        run_options=None,
        output: str = "images",
    ) -> np.ndarray:
        """n images (n, C, D, D) float32 in [0, 1]; equal to `sample_images(model, n, temperature, seed,
        decode=<the export's decode>)` of the checkpoint it was exported from. `batch_size`: images per
        onnxruntime run (None: as many as `memory_budget` allows). `run_options` (an `ort.RunOptions`) lets
        another thread stop the work by setting `terminate`."""
        n, temperature, seed = validate_request(n, temperature, seed)
        return self._run(self.noise(n, seed), n, temperature, batch_size, run_options, output)

    def sample_many(
        self,
        requests: Sequence[tuple[int, int]],
        temperature: float,
        batch_size: int | None = None,
        *,
        run_options=None,
    ) -> list[np.ndarray]:
        """Several requests (n, seed) at one temperature in shared onnxruntime runs (request batching):
        each gets the images `sample(n, temperature, seed)` gives it alone (the same noise; the network
        treats every image on its own), up to floating-point rounding of the larger batch."""
        checked = [validate_request(n, temperature, seed) for n, seed in requests]
        if not checked:
            return []
        parts = [self.noise(n, seed) for n, _, seed in checked]
        feeds = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        sizes = [n for n, _, _ in checked]
        out = self._run(feeds, sum(sizes), checked[0][1], batch_size, run_options, "images")
        return np.split(out, np.cumsum(sizes)[:-1])

    def _run(self, feeds, n, temperature, batch_size, run_options, output) -> np.ndarray:
        if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) < 1):
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        batch = int(batch_size or self.auto_batch_size)
        temp = np.array([temperature], dtype=np.float32)
        out = np.empty((n, *self.image_shape), dtype=np.float32)
        for i in range(0, n, batch):
            if run_options is not None and run_options.terminate:
                raise TimeoutError("sampling was stopped")
            chunk = {k: v[i : i + batch] for k, v in feeds.items()}
            rows = len(next(iter(chunk.values())))
            chunk["temperature"] = (
                np.full((rows, 1), temperature, np.float32) if self.temperature_per_image else temp
            )
            if self.io_binding:
                self._run_bound(chunk, output, out[i : i + batch], run_options)
            else:
                out[i : i + batch] = self.session.run([output], chunk, run_options)[0]
        return out

    def _run_bound(self, chunk: dict[str, np.ndarray], output: str, dest: np.ndarray, run_options) -> None:
        """One run through onnxruntime's IO binding: on CPU the images are written straight into `dest` (no
        output copy); on CUDA the output stays on the device until one copy into `dest`."""
        binding = self.session.io_binding()
        for name, value in chunk.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        if self.device == "cpu":
            binding.bind_output(output, "cpu", 0, np.float32, list(dest.shape), dest.ctypes.data)
            self.session.run_with_iobinding(binding, run_options)
        else:
            binding.bind_output(output, "cuda")
            self.session.run_with_iobinding(binding, run_options)
            dest[...] = binding.copy_outputs_to_cpu()[0]


def _open_session(path: Path, providers: list, threads: int | None, cache_dir: str | Path | None):
    """An onnxruntime session for `path`; with `cache_dir`, through a cache of the optimised graph.

    Graph optimisation at the highest level takes most of a session's start (fusions, layout changes for the
    CPU's kernels). Its result depends on the graph, the providers, the onnxruntime version and the CPU, so
    the cached file is named by all of them; the first start writes it (atomically), later ones load it with
    optimisation off. A cached file onnxruntime cannot load is rebuilt. Returns (session, cached: bool)."""
    import onnxruntime as ort

    def create(model: Path, optimize: bool, save_to: Path | None = None):
        so = session_options(threads, optimize=optimize)
        if save_to is not None:
            so.optimized_model_filepath = str(save_to)
        return ort.InferenceSession(str(model), so, providers=providers)

    try:
        if cache_dir is not None:
            cached = _from_cache(path, providers, cache_dir, create)
            if cached is not None:
                return cached
        return create(path, True), False
    except Exception as exc:  # onnxruntime raises its own (Fail, InvalidGraph, ...) for bad files
        raise OnnxModelError(f"{path}: onnxruntime cannot load it ({type(exc).__name__}: {exc})") from None


def _from_cache(path: Path, providers: list, cache_dir: str | Path, create):
    """(session, cached) through the cache, or None when the cache cannot be used (a full or read-only
    disk, a file onnxruntime cannot write): serving then starts without it, as it would with no cache."""
    import hashlib
    import platform

    import onnxruntime as ort

    key = hashlib.sha256(path.read_bytes())
    key.update(json.dumps([providers, ort.__version__, platform.machine(), cpu_flags_line()]).encode())
    cached = Path(cache_dir) / f"{path.stem}-{key.hexdigest()[:16]}.optimized.onnx"
    if cached.is_file():
        try:
            return create(cached, False), True
        except Exception as exc:  # a damaged entry: rebuild it
            log.warning("optimised-graph cache %s unusable (%s); rebuilding it", cached, exc)
            cached.unlink(missing_ok=True)
    try:
        with atomic_path(cached) as tmp:  # onnxruntime writes the optimised graph to `tmp` as it starts
            session = create(path, True, save_to=tmp)
            if tmp.stat().st_size == 0:
                raise OSError(f"onnxruntime wrote no optimised graph to {tmp}")
    except Exception as exc:
        log.warning("cannot cache the optimised graph in %s (%s); starting without the cache", cache_dir, exc)
        return None
    log.info("optimised graph cached in %s", cached)
    return session, False


def registry_version(onnx_path: Path) -> str | None:
    """`name/version` when the file was pulled from the model registry (`nvae model pull` writes
    manifest.json beside it, after checking every file's sha256), else None."""
    manifest = onnx_path.parent / "manifest.json"
    try:
        data = json.loads(manifest.read_text())
        return f"{data['name']}/{data['version']}"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def validate_request(n, temperature, seed) -> tuple[int, float, int]:
    """Check n >= 1, a finite temperature > 0 and 0 <= seed < 2**63; ConfigError naming the field."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ConfigError(f"n={n!r} must be an integer >= 1")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float | np.number):
        raise ConfigError(f"temperature={temperature!r} must be a number")
    if not math.isfinite(float(temperature)) or float(temperature) <= 0:
        raise ConfigError(f"temperature={temperature!r} must be finite and > 0")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed={seed!r} must be an integer in [0, 2**63 - 1]")
    return int(n), float(temperature), int(seed)
