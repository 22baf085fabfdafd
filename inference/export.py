"""ONNX export of NVAE's generative path: noise per latent group + temperature -> images in [0, 1].

Only the decoder side is exported (learned `h`, prior heads, decoder tower, postprocess, head, and the pixel
distribution's mean or a sample), from eval mode, so the checkpoint's (readjusted) BN statistics are baked
in as constants. Every random number is a graph input, never a random op: exporters may constant-fold
random ops, and ONNX random ops cannot be seeded to match PyTorch.

Graph interface (batch dimension `batch` is dynamic; S = network side, D = data side, C = image channels):

    inputs   eps_0 .. eps_{G-1}  float32 (batch, Z, H_j, W_j)  standard-normal noise per group, coarse first
             temperature         float32 (1,)                   prior temperature (> 0); (batch, 1), one per
                                                                image, in the Triton layout (inference/triton.py)
             u_mix               float32 (batch, M, S, S)       uniform noise, decode=sample with DMoL only
             u_pix               float32 (batch, C, S, S)       uniform noise, decode=sample only
    outputs  images              float32 (batch, C, D, D)       in [0, 1], quantised like `sample_images`
             images_continuous   float32 (batch, C, D, D)       in [0, 1], before quantisation

`images` equals `model.prior_sampling.sample_images(...)` for the same noise; `images_continuous` is what parity is
measured on (quantisation turns a 1e-7 difference at a rounding boundary into one whole level).
Metadata keys are listed in `METADATA_KEYS`. The fp16 export runs the network in half precision with the
same float32 inputs and outputs (distributions and quantisation stay float32, as in PyTorch).

The CUDA parity and speed check of exported graphs is `bench/gpu_check.py` (`onnx_gpu_check`).
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.errors import CheckpointError, ConfigError, NVAEError
from common.files import atomic_path, check_writable, file_sha256
from model.config import PRESETS, NVAEConfig, get_preset
from model.network import NVAE

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
DEFAULT_OPSET = 18
EXPORTERS = ("dynamo", "torchscript")  # torch.onnx.export(dynamo=True) or the TorchScript tracer
DECODE_MODES = ("mean", "sample")
OUTPUT_NAMES = ("images", "images_continuous")
RANDOM_OPS = {
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
}
METADATA_KEYS = (
    "nvae.format_version",  # this interface's version
    "nvae.preset",  # preset the checkpoint's config equals, else `<closest>+overrides` or `custom`
    "nvae.config",  # the full NVAEConfig as JSON
    "nvae.checkpoint_sha256",  # checksum of the checkpoint file ("" for an in-memory model)
    "nvae.bn_readjust_temperature",  # temperature of BN readjustment, "" if the checkpoint was not readjusted
    "nvae.bn_readjust",  # the checkpoint's `bn_readjust` record as JSON ("null" if absent)
    "nvae.decode",  # mean | sample
    "nvae.precision",  # fp32 | fp16
    "nvae.latent_shapes",  # JSON [[Z, H, W], ...] coarse first
    "nvae.image_shape",  # JSON [C, D, D]
    "nvae.network_size",  # S
    "nvae.levels",  # quantisation levels of `images` (0: not quantised)
    "nvae.uniform_inputs",  # JSON [[name, [channels, S, S]], ...] for decode=sample
    "nvae.activation_bytes_per_image",  # upper bound of activation memory per image, for batching
    "nvae.exporter",  # e.g. "torch.onnx.export(dynamo=True) torch 2.14.1"
    "nvae.opset",
    "nvae.temperature_shape",  # JSON [1], or ["batch", 1] for a per-image temperature (the Triton layout)
)


class ExportError(NVAEError):
    """The model cannot be exported, or the exported graph fails a check."""


# --------------------------------------------------------------------------- the exported module
class GenerativePath(nn.Module):
    """The sampler as one module: `forward(temperature, eps_0, .., eps_{G-1}[, u_mix][, u_pix])`.

    temperature (1,), or (B, 1) with `batched_temperature` (one per image, so that a server may concatenate
    requests along the batch dimension); eps_j (B, Z, H_j, W_j); u_* (B, ., S, S) uniform in [0, 1). Returns
    (images, images_continuous), each (B, C, D, D) float32 in [0, 1].
    """

    def __init__(self, model: NVAE, decode: str = "mean", batched_temperature: bool = False):
        super().__init__()
        if decode not in DECODE_MODES:
            raise ConfigError(f"decode={decode!r}; choose one of: {', '.join(DECODE_MODES)}")
        self.model = model
        self.decode = decode
        self.batched_temperature = batched_temperature
        self.groups = model.num_groups
        cfg = model.cfg
        self.bits = 1 if cfg.likelihood == "bernoulli" else cfg.num_bits

    def forward(self, temperature: torch.Tensor, *noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps, uniforms = list(noise[: self.groups]), noise[self.groups :]
        if self.batched_temperature:  # (B, 1) -> (B, 1, 1, 1): scales each image's prior sigma
            temperature = temperature.reshape(-1, 1, 1, 1)
        logits = self.model.sample_logits(eps[0].shape[0], temperature, eps=eps)
        dist = self.model.output_distribution(logits)
        if self.decode == "mean":
            x = dist.mean()
        elif self.model.cfg.likelihood == "bernoulli":
            x = (uniforms[0] < torch.sigmoid(dist.logits)).float()
        else:
            x = dist.sample_from_uniform(uniforms[0], uniforms[1], 1.0)  # pixels at t=1, as the authors
        x = self.model.crop(x)
        if self.decode == "sample" or self.bits > 1:  # as model.prior_sampling.decode_images
            levels = 2**self.bits - 1
            return torch.round(x.clamp(0, 1) * levels) / levels, x
        return x, x


def uniform_shapes(cfg: NVAEConfig, decode: str) -> list[tuple[str, tuple[int, int, int]]]:
    """Names and per-image shapes of the uniform-noise inputs, in `DiscretizedLogisticMixture.sample`'s
    (and `Bernoulli.sample`'s) draw order; empty for decode=mean."""
    if decode == "mean":
        return []
    s = cfg.image_size
    if cfg.likelihood == "bernoulli":
        return [("u_pix", (cfg.in_channels, s, s))]
    return [("u_mix", (cfg.num_mix, s, s)), ("u_pix", (cfg.in_channels, s, s))]


def input_names(model: NVAE, decode: str) -> list[str]:
    return (
        ["temperature"]
        + [f"eps_{j}" for j in range(model.num_groups)]
        + [n for n, _ in uniform_shapes(model.cfg, decode)]
    )


# --------------------------------------------------------------------------- export
@dataclass
class ExportResult:
    """What `export_model` wrote: the path, the graph's interface, its metadata and how long it took."""

    path: Path
    inputs: dict[str, list[int | str]]
    outputs: dict[str, list[int | str]]
    metadata: dict[str, str]
    seconds: float
    max_abs_diff: float | None = None  # of images_continuous vs PyTorch, when verified
    config: Path | None = None  # the Triton model configuration (config.pbtxt), in the Triton layout


def export_onnx(
    checkpoint: str | Path,
    out: str | Path,
    *,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    decode: str = "mean",
    exporter: str = "dynamo",
    verify: bool = True,
    layout: str = "file",
    model_name: str = "nvae-decoder",
    max_batch_size: int = 64,
) -> ExportResult:
    """Export a checkpoint's generative path to `out` (see the module docstring for the graph interface).

    layout "file" writes the ONNX file `out`; "triton" writes a Triton model repository at `out`:
    `out/<model_name>/1/model.onnx` (temperature per image) and `out/<model_name>/config.pbtxt` derived from
    it (see inference/triton.py), with Triton's dynamic batching up to `max_batch_size` images.

    The metadata records the preset, the BN-readjustment temperature (`payload["bn_readjust"]`) and the
    checkpoint's sha256. `verify` runs onnxruntime (CPU) on a small batch and checks parity with PyTorch
    (fp32 only; onnxruntime's CPU provider has no fp16 convolutions).
    """
    from inference import triton
    from model.checkpoint import load_model

    if layout not in triton.LAYOUTS:
        raise ConfigError(f"layout={layout!r}; choose one of: {', '.join(triton.LAYOUTS)}")
    if layout == "triton":
        triton.check_settings(model_name, max_batch_size)
    check_writable(out if layout == "file" else Path(out) / model_name / "config.pbtxt")  # before the export
    checkpoint = Path(checkpoint)
    model, payload = load_model(checkpoint)
    readjust = payload.get("bn_readjust")
    if readjust is None:
        log.warning("%s has no bn_readjust record: exporting the training-time BN statistics", checkpoint)
    metadata = {
        "nvae.preset": str(payload.get("preset") or infer_preset(model.cfg)),
        "nvae.checkpoint_sha256": file_sha256(checkpoint),
        "nvae.bn_readjust_temperature": ""
        if not readjust or readjust.get("temperature") is None
        else repr(float(readjust["temperature"])),
        "nvae.bn_readjust": json.dumps(readjust, sort_keys=True, default=str),
    }
    target = triton.model_file(out, model_name) if layout == "triton" else out
    result = export_model(
        model,
        target,
        metadata=metadata,
        fp16=fp16,
        opset=opset,
        decode=decode,
        exporter=exporter,
        verify=verify,
        batched_temperature=layout == "triton",
    )
    if layout == "triton":  # after the model, so that a polling server never sees a config without it
        result.config = triton.write_config(result.path, max_batch_size=max_batch_size)
    return result


def export_model(
    model: NVAE,
    out: str | Path,
    *,
    metadata: dict[str, str] | None = None,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    decode: str = "mean",
    exporter: str = "dynamo",
    verify: bool = True,
    batched_temperature: bool = False,
) -> ExportResult:
    """Export an in-memory model (eval mode is set here; the model is not modified) and check the graph.

    `batched_temperature`: the temperature input is (batch, 1), one per image, instead of (1,)."""
    if exporter not in EXPORTERS:
        raise ConfigError(f"exporter={exporter!r}; choose one of: {', '.join(EXPORTERS)}")
    if decode not in DECODE_MODES:
        raise ConfigError(f"decode={decode!r}; choose one of: {', '.join(DECODE_MODES)}")
    if not 13 <= opset <= 23:
        raise ConfigError(f"opset={opset} is out of range; allowed 13 <= opset <= 23")
    import onnx

    start = time.perf_counter()
    model = _export_copy(model, fp16)
    wrapper = GenerativePath(model, decode, batched_temperature).eval()
    names = input_names(model, decode)
    example = _example_inputs(model, decode, batch=2, batched_temperature=batched_temperature)
    with torch.no_grad():
        proto = _run_exporter(wrapper, example, names, opset, exporter)
    check_graph(proto)

    cfg = model.cfg
    meta = {
        "nvae.format_version": FORMAT_VERSION,
        "nvae.preset": infer_preset(cfg),
        "nvae.config": cfg.to_json(),
        "nvae.checkpoint_sha256": "",
        "nvae.bn_readjust_temperature": "",
        "nvae.bn_readjust": "null",
        "nvae.decode": decode,
        "nvae.precision": "fp16" if fp16 else "fp32",
        "nvae.latent_shapes": json.dumps([list(s) for s in model.latent_shapes()]),
        "nvae.image_shape": json.dumps([cfg.in_channels, cfg.data_size, cfg.data_size]),
        "nvae.network_size": str(cfg.image_size),
        "nvae.levels": str(2**wrapper.bits - 1 if decode == "sample" or wrapper.bits > 1 else 0),
        "nvae.uniform_inputs": json.dumps([[n, list(s)] for n, s in uniform_shapes(cfg, decode)]),
        "nvae.activation_bytes_per_image": str(activation_bytes_per_image(model)),
        "nvae.exporter": f"torch.onnx.export(dynamo={exporter == 'dynamo'}) torch {torch.__version__}",
        "nvae.opset": str(opset),
        "nvae.temperature_shape": json.dumps(["batch", 1] if batched_temperature else [1]),
    }
    meta.update(metadata or {})
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = (__doc__ or "").split("\n\n    python")[0]
    proto.producer_name = "nvae-pipeline"

    out = Path(out)
    _atomic_onnx_save(proto, out)
    onnx.checker.check_model(str(out), full_check=True)
    result = ExportResult(
        path=out,
        inputs=_io_shapes(proto.graph.input),
        outputs=_io_shapes(proto.graph.output),
        metadata=meta,
        seconds=time.perf_counter() - start,
    )
    if verify and not fp16:
        result.max_abs_diff = verify_export(model, out, decode, batched_temperature=batched_temperature)
    log.info("exported %s in %.1f s (%s)", out, result.seconds, meta["nvae.exporter"])
    return result


def _export_copy(model: NVAE, fp16: bool) -> NVAE:
    """A CPU eval-mode copy without gradients (the caller's model keeps its mode, device and dtype)."""
    import copy

    model = copy.deepcopy(model).cpu().eval().requires_grad_(False)
    return model.half() if fp16 else model.float()


def _example_inputs(
    model: NVAE, decode: str, batch: int, temperature: float = 1.0, batched_temperature: bool = False
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    eps = [torch.randn((batch, *s), generator=g) for s in model.latent_shapes()]
    uni = [torch.rand((batch, *s), generator=g) for _, s in uniform_shapes(model.cfg, decode)]
    t = torch.full((batch, 1) if batched_temperature else (1,), temperature)
    return (t, *eps, *uni)


def _run_exporter(wrapper: GenerativePath, example: tuple, names: list[str], opset: int, exporter: str):
    import onnx

    try:
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=1 << 20)
            temperature = {0: batch} if example[0].dim() == 2 else None  # (B, 1) or (1,)
            dynamic = {"temperature": temperature, "noise": tuple({0: batch} for _ in example[1:])}
            program = torch.onnx.export(
                wrapper,
                example,
                dynamo=True,
                input_names=names,
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes=dynamic,
                opset_version=opset,
                external_data=False,
                optimize=True,
                verbose=False,
            )
            return program.model_proto
        buffer = io.BytesIO()
        batched = names if example[0].dim() == 2 else names[1:]  # temperature (B, 1) or (1,)
        axes = {n: {0: "batch"} for n in batched} | {n: {0: "batch"} for n in OUTPUT_NAMES}
        torch.onnx.export(
            wrapper,
            example,
            buffer,
            dynamo=False,
            input_names=names,
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
        )
        return onnx.load_from_string(buffer.getvalue())
    except ExportError:
        raise
    except Exception as exc:  # exporter internals: report which exporter failed, keep the cause chained
        raise ExportError(f"torch.onnx.export(dynamo={exporter == 'dynamo'}) failed: {exc}") from exc


def check_graph(proto) -> None:
    """Raise ExportError if the graph holds a training-mode BatchNormalization or a random op."""
    nodes = list(proto.graph.node)
    for fn in proto.functions:
        nodes.extend(fn.node)
    for node in nodes:
        if node.op_type == "BatchNormalization":
            for attr in node.attribute:
                if attr.name == "training_mode" and attr.i != 0:
                    raise ExportError(f"BatchNormalization node {node.name!r} is in training mode")
            if len(node.output) > 1:
                raise ExportError(f"BatchNormalization node {node.name!r} outputs batch statistics")
        if node.op_type in RANDOM_OPS:
            raise ExportError(
                f"random op {node.op_type} ({node.name!r}) in the graph: noise must be an input"
            )


def _io_shapes(values) -> dict[str, list[int | str]]:
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}


def _atomic_onnx_save(proto, path: Path) -> None:
    import onnx

    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))  # one file: every preset's weights are far below protobuf's 2 GB


def verify_export(
    model: NVAE, path: str | Path, decode: str = "mean", batch: int = 2, batched_temperature: bool = False
) -> float:
    """Max |onnxruntime - PyTorch| of `images_continuous` on a seeded batch at temperature 0.7 (CPU)."""
    import onnxruntime as ort

    model = _export_copy(model, fp16=False)
    wrapper = GenerativePath(model, decode, batched_temperature)
    example = _example_inputs(model, decode, batch, 0.7, batched_temperature)
    with torch.no_grad():
        ref = wrapper(*example)[1].numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = dict(zip(input_names(model, decode), (t.numpy() for t in example), strict=True))
    got = session.run(["images_continuous"], feeds)[0]
    diff = float(np.abs(got - ref).max())
    if not diff <= 1e-3:  # the tests hold 1e-4; this only catches a broken graph at export time
        raise ExportError(f"exported graph disagrees with PyTorch: max |diff| = {diff:.3g}")
    return diff


# --------------------------------------------------------------------------- metadata helpers
def infer_preset(cfg: NVAEConfig) -> str:
    """The preset `cfg` equals; else `<preset>+overrides` for the closest preset of the same dataset."""
    values = cfg.to_dict()
    best, best_diff = None, None
    for name in PRESETS:
        preset = get_preset(name).to_dict()
        diff = sum(values[k] != preset[k] for k in values)
        if diff == 0:
            return name
        if preset["dataset"] == values["dataset"] and (best_diff is None or diff < best_diff):
            best, best_diff = name, diff
    return f"{best}+overrides" if best else "custom"


def activation_bytes_per_image(model: NVAE) -> int:
    """Sum of every module output of one sampled image (an upper bound of live activation memory).

    Runs on the meta device: shapes and dtypes only, no arithmetic."""
    import copy

    total = 0

    def hook(_module, _inputs, output):
        nonlocal total
        for t in output if isinstance(output, tuple) else (output,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    meta = copy.deepcopy(model).to("meta")
    for m in meta.modules():
        if not list(m.children()):
            m.register_forward_hook(hook)
    with torch.no_grad():
        eps = [torch.zeros((1, *s), device="meta") for s in meta.latent_shapes()]
        meta.sample_logits(1, 1.0, eps=eps)
    return int(total)


def metadata_of(path: str | Path) -> dict[str, str]:
    """The `nvae.*` metadata of an exported file."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def check_exported_from(onnx_path: str | Path, checkpoint: str | Path) -> None:
    """CheckpointError unless the decoder at `onnx_path` was exported from the file `checkpoint`: its
    `nvae.checkpoint_sha256` metadata, written at export, must be that file's sha256."""
    try:
        recorded = metadata_of(onnx_path).get("nvae.checkpoint_sha256", "")
    except Exception as exc:  # not a file, not ONNX
        raise CheckpointError(f"{onnx_path}: not an ONNX model ({type(exc).__name__})") from None
    if not recorded:
        raise CheckpointError(
            f"{onnx_path}: records no checkpoint it was exported from (nvae.checkpoint_sha256); export it "
            f"with `nvae export-onnx --checkpoint {checkpoint}`"
        )
    actual = file_sha256(checkpoint)
    if recorded != actual:
        raise CheckpointError(
            f"{onnx_path} was exported from a checkpoint with sha256 {recorded[:12]}..., but {checkpoint} is "
            f"{actual[:12]}...: publish the checkpoint it was exported from, or export this one"
        )


# --------------------------------------------------------------------------- GPU day
def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Give every BN layer non-trivial affine parameters and running statistics (for parity checks)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))


__all__ = [
    "DECODE_MODES",
    "DEFAULT_OPSET",
    "EXPORTERS",
    "METADATA_KEYS",
    "ExportError",
    "ExportResult",
    "GenerativePath",
    "check_graph",
    "export_model",
    "export_onnx",
    "file_sha256",
    "infer_preset",
    "metadata_of",
    "randomize_bn",
    "verify_export",
]
