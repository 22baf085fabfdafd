"""One KFP v2 component per pipeline step. Each body only maps typed inputs/outputs to the `nvae` CLI.

(No `from __future__ import annotations` here: KFP reads the real annotation objects.)

The step functions are plain functions; `build(images)` turns them into lightweight Python components in
the project images. kfp is installed in those images, so the components are compiled with
`install_kfp_package=False`: nothing in a pod installs anything or reaches a package index.
"""

from types import SimpleNamespace

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components.images import DEFAULT_IMAGES, Images


def validate_params(
    preset: str,
    dataset: str,
    overrides: str,
    steps: int,
    gpus: int,
    iw_samples: int,
    temperature: float,
    num_samples: int,
):
    """Fail the run before any work when a parameter is out of range."""
    from components.params import validate_pipeline_args

    validate_pipeline_args(
        preset=preset,
        dataset=dataset,
        overrides=overrides,
        steps=steps,
        gpus=gpus,
        iw_samples=iw_samples,
        temperature=temperature,
        num_samples=num_samples,
    )


def prepare(dataset: str, source: str, limit: int, data: Output[Dataset]):
    """DALI dataset preparation -> uint8 arrays + manifest. `source`: a path (a mounted volume) or
    s3://bucket/prefix (endpoint and keys from the nvae-s3-credentials Secret's variables)."""
    from components.runtime import read_json, run_cli

    argv = ["prepare", "--dataset", dataset, "--source", source, "--out", data.path]
    run_cli(argv + (["--limit", str(limit)] if limit > 0 else []))
    manifest = read_json(data.path + "/manifest.json")
    data.metadata["dataset"] = dataset
    data.metadata["source"] = source
    data.metadata["source_listing_sha256"] = manifest["source"]["listing_sha256"]  # ETags for s3://


def train(
    data: Input[Dataset],
    preset: str,
    overrides: str,
    steps: int,
    batch_size: int,
    gpus: int,
    seed: int,
    model: Output[Model],
    train_metrics: Output[Metrics],
):
    """NVAE training; one process per GPU under torchrun."""
    from components.runtime import numeric_items, read_json, run_train, split_overrides

    argv = [
        "--preset",
        preset,
        "--data",
        data.path,
        "--out",
        model.path,
        "--steps",
        str(steps),
        "--seed",
        str(seed),
        *split_overrides(overrides),
    ]
    run_train(argv + (["--batch-size", str(batch_size)] if batch_size > 0 else []), nproc=gpus)
    summary = read_json(model.path + "/train_summary.json")
    for key, value in numeric_items(summary, ["steps", "skipped_steps", "last_nelbo_bpd", "last_img_per_s"]):
        train_metrics.log_metric(key, value)
    model.metadata["preset"] = preset


def evaluate(
    model: Input[Model],
    data: Input[Dataset],
    iw_samples: int,
    limit: int,
    metrics: Output[Metrics],
    report: Output[HTML],
):
    """Importance-weighted NLL in bits/dim, ELBO, active latent channels; KL-per-group plot."""
    import os

    from components.runtime import numeric_items, png_html, read_json, run_cli

    os.makedirs(os.path.dirname(metrics.path), exist_ok=True)
    out_json, plot = metrics.path + ".json", metrics.path + ".kl.png"
    argv = [
        "evaluate",
        "--checkpoint",
        model.path + "/checkpoint.pt",
        "--data",
        data.path,
        "--iw-samples",
        str(iw_samples),
        "--out",
        out_json,
        "--kl-plot",
        plot,
    ]
    run_cli(argv + (["--limit", str(limit)] if limit > 0 else []))
    values = read_json(out_json)
    for key, value in numeric_items(
        values, ["nll_bpd", "nelbo_bpd", "active_channels", "num_images", "iw_samples"]
    ):
        metrics.log_metric(key, value)
    with open(report.path, "w") as fh:
        fh.write(png_html(plot, f"KL per group ({values['active_channels']} active channels)"))


def readjust_bn(model: Input[Model], temperature: float, iters: int, readjusted: Output[Model]):
    """BN statistics re-estimated from prior samples at the sampling temperature."""
    import os

    from components.runtime import run_cli

    os.makedirs(readjusted.path, exist_ok=True)
    run_cli(
        [
            "readjust-bn",
            "--checkpoint",
            model.path + "/checkpoint.pt",
            "--temperature",
            str(temperature),
            "--iters",
            str(iters),
            "--out",
            readjusted.path + "/checkpoint.pt",
        ]
    )
    readjusted.metadata["temperature"] = temperature


def export_onnx(model: Input[Model], onnx_model: Output[Model]):
    """ONNX export of the generative path, readjusted BN baked in."""
    from components.runtime import run_cli

    run_cli(["export-onnx", "--checkpoint", model.path + "/checkpoint.pt", "--out", onnx_model.path])
    onnx_model.metadata["format"] = "onnx"


def sample(
    onnx_model: Input[Model],
    num_samples: int,
    temperature: float,
    seed: int,
    samples: Output[Dataset],
    grid: Output[HTML],
):
    """Sample a grid with the ONNX decoder (onnxruntime), the way serving does."""
    from components.runtime import png_html, run_cli

    run_cli(
        [
            "sample",
            "--onnx",
            onnx_model.path,
            "--n",
            str(num_samples),
            "--temperature",
            str(temperature),
            "--seed",
            str(seed),
            "--out",
            samples.path,
        ]
    )
    with open(grid.path, "w") as fh:
        fh.write(
            png_html(
                f"{samples.path}/grid_t{temperature:g}.png", f"{num_samples} samples at t={temperature:g}"
            )
        )


# Which image each step runs in: train takes the CUDA build of torch (it runs on CPU nodes too).
_STEPS = {
    "validate_params": (validate_params, "cpu"),
    "prepare": (prepare, "cpu"),
    "train": (train, "gpu"),
    "evaluate": (evaluate, "cpu"),
    "readjust_bn": (readjust_bn, "cpu"),
    "export_onnx": (export_onnx, "cpu"),
    "sample": (sample, "cpu"),
}


def build(images: Images = DEFAULT_IMAGES) -> SimpleNamespace:
    """The pipeline's components, each in its image from `images`, with kfp taken from the image."""
    return SimpleNamespace(
        **{
            name: dsl.component(fn, base_image=images.ref(kind), install_kfp_package=False)
            for name, (fn, kind) in _STEPS.items()
        }
    )
