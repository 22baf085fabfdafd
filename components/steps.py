"""One KFP v2 component per pipeline step. Each body only maps typed inputs/outputs to the `nvae` CLI.

(No `from __future__ import annotations` here: KFP reads the real annotation objects.)

The step functions are plain functions; `build(images)` turns them into lightweight Python components in
the project images. kfp is installed in those images, so the components are compiled with
`install_kfp_package=False`: nothing in a pod installs anything or reaches a package index.
"""

from types import SimpleNamespace
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.images import DEFAULT_IMAGES, Images


def validate_params(
    dataset: str,
    prepare_limit: int,
    preset: str,
    overrides: str,
    steps: int,
    batch_size: int,
    grad_accum: int,
    gpus: int,
    nodes: int,
    trainjob_deadline_s: int,
    trainer_api: str,
    checkpoint_store: str,
    checkpoint_every: int,
    prepare_gpus: int,
    eval_gpus: int,
    sample_gpus: int,
    iw_samples: int,
    eval_limit: int,
    temperature: float,
    readjust_iters: int,
    num_samples: int,
    fid_samples: int,
    fid_inception: str,
    fid_inception_sha256: str,
    import_checkpoint: str,
    cpu_image: str,
    gpu_image: str,
) -> NamedTuple(
    "Plan",
    [
        ("prepare_image", str),
        ("eval_image", str),
        ("sample_image", str),
        ("prepare_gpus", str),
        ("eval_gpus", str),
        ("sample_gpus", str),
        ("train_pod_gpus", str),
    ],
):
    """Fail the run before any work when a parameter is out of range (the log names it and its range).
    Returns what the steps' pod specs take at run time: the image of each step (the GPU image where the step
    gets a GPU), the GPU count of each step, and the GPUs of the train pod (none when it only launches a
    multi-node TrainJob). Every one is a string: the KFP driver reads a pod spec's run-time value as a string
    parameter (a number would read as empty, and the pod would get no GPU limit)."""
    from collections import namedtuple

    from components.params import VALIDATED, validate_pipeline_args

    given = dict(locals())  # KFP calls the step with its inputs by name: these are the parameters to check
    validate_pipeline_args(**{name: given[name] for name in VALIDATED})
    image = {0: cpu_image, 1: gpu_image}
    plan = namedtuple(
        "Plan",
        [
            "prepare_image",
            "eval_image",
            "sample_image",
            "prepare_gpus",
            "eval_gpus",
            "sample_gpus",
            "train_pod_gpus",
        ],
    )
    train_pod_gpus = 0 if nodes > 1 or import_checkpoint else gpus  # a TrainJob's nodes, or an import: none
    counts = [str(n) for n in (prepare_gpus, eval_gpus, sample_gpus, train_pod_gpus)]
    return plan(image[prepare_gpus], image[eval_gpus], image[sample_gpus], *counts)


def fingerprint_source(source: str) -> str:
    """What the source holds now (data.remote.source_fingerprint: keys, sizes and ETags), so prepare's cache
    entry is reused only while the source's content is unchanged, not merely its URI. Never cached itself."""
    from data.remote import source_fingerprint

    fingerprint = source_fingerprint(source)
    print(f"{source}: fingerprint {fingerprint}")
    return fingerprint


def prepare(dataset: str, source: str, source_fingerprint: str, limit: int, gpus: int, data: Output[Dataset]):
    """DALI dataset preparation -> uint8 arrays + manifest, on the GPU when the step has one. `source`: a
    path (a mounted volume) or s3://bucket/prefix (endpoint and keys from the nvae-s3-pipeline Secret);
    `source_fingerprint` keys KFP's cache to the source's content."""
    from components.runtime import read_json, run_cli

    argv = ["prepare", "--dataset", dataset, "--source", source, "--out", data.path]
    argv += ["--device", "gpu" if gpus else "cpu"]
    run_cli(argv + (["--limit", str(limit)] if limit > 0 else []))
    manifest = read_json(data.path + "/manifest.json")
    data.metadata["dataset"] = dataset
    data.metadata["source"] = source
    data.metadata["source_fingerprint"] = source_fingerprint
    data.metadata["source_listing_sha256"] = manifest["source"]["listing_sha256"]  # ETags for s3://


def train(
    data: Input[Dataset],
    preset: str,
    overrides: str,
    steps: int,
    batch_size: int,
    grad_accum: int,
    gpus: int,
    seed: int,
    nodes: int,
    accelerator: str,
    checkpoint_store: str,
    checkpoint_every: int,
    trainjob_deadline_s: int,
    trainer_api: str,
    import_checkpoint: str,
    run_id: str,
    image: str,
    model: Output[Model],
    train_metrics: Output[Metrics],
    curves: Output[HTML],
):
    """NVAE training: one process per GPU under torchrun, or with `nodes` > 1 a Kubeflow TrainJob of that
    many nodes. With a checkpoint store, checkpoints go to <store>/<run id>/checkpoints and a retried pod
    resumes from them. Outputs the checkpoint (with the DVCLive run), throughput and step counts as metrics,
    and the training curves as a page. With `import_checkpoint` set, nothing is trained: the authors'
    checkpoint it names is imported (`nvae import-nvlabs`) and checked against the prepared dataset."""
    from components.runtime import (
        curves_html,
        fetch_checkpoint,
        numeric_items,
        read_json,
        run_dir,
        run_train,
        split_overrides,
        write_text,
    )

    if import_checkpoint:
        from components.runtime import import_instead_of_training

        summary = import_instead_of_training(import_checkpoint, data.path, model.path, curves.path)
        for key, value in numeric_items(summary, ["parameters", "global_step", "epoch"]):
            train_metrics.log_metric(key, value)
        model.metadata["imported_from"] = import_checkpoint
        return
    run = run_dir(checkpoint_store, run_id)
    argv = ["--preset", preset, "--steps", str(steps), "--seed", str(seed), *split_overrides(overrides)]
    argv += ["--grad-accum", str(grad_accum), "--checkpoint-every", str(checkpoint_every)]
    argv += ["--batch-size", str(batch_size)] if batch_size > 0 else []
    if nodes > 1:
        from components.runtime import run_cli
        from components.trainjob import in_cluster_api, job_name, run_trainjob, trainjob_body

        run_cli(["store", "put", data.path, run + "/data/"])
        body = trainjob_body(
            name=job_name(run_id),
            image=image,
            nodes=nodes,
            gpus_per_node=gpus,
            accelerator=accelerator,
            run=run,
            train_args=argv,
            store_secret="nvae-s3-pipeline",
            deadline_s=trainjob_deadline_s,
            trainer_api=trainer_api,
        )
        api, namespace = in_cluster_api()
        run_trainjob(api, namespace, body, deadline_s=trainjob_deadline_s)
        run_cli(["store", "get", run + "/out/", "--out", model.path])
    else:
        run_train(["--data", data.path, "--out", model.path, *argv], nproc=gpus, run=run)
    if run:
        fetch_checkpoint(run, model.path)
    summary = read_json(model.path + "/train_summary.json")
    for key, value in numeric_items(summary, ["steps", "skipped_steps", "last_nelbo_bpd", "last_img_per_s"]):
        train_metrics.log_metric(key, value)
    write_text(curves.path, curves_html(model.path + "/train_metrics.jsonl"))
    model.metadata["preset"] = preset


def evaluate(
    model: Input[Model],
    data: Input[Dataset],
    iw_samples: int,
    limit: int,
    gpus: int,
    metrics: Output[Metrics],
    results: Output[Artifact],
    kl_report: Output[HTML],
    reconstructions: Output[HTML],
):
    """Importance-weighted NLL in bits/dim, -ELBO, KL, active latent channels (metrics, and all of it in
    results/metrics.json with the KL-per-group plot), the KL plot and test reconstructions as pages."""
    import os
    import tempfile

    from components.runtime import numeric_items, png_html, read_json, run_cli, write_text

    os.makedirs(results.path, exist_ok=True)
    out_json, plot = results.path + "/metrics.json", results.path + "/kl_per_group.png"
    argv = ["evaluate", "--checkpoint", model.path + "/checkpoint.pt", "--data", data.path]
    argv += ["--iw-samples", str(iw_samples), "--out", out_json, "--kl-plot", plot]
    device = ["--device", "cuda" if gpus else "cpu"]
    run_cli(argv + device + (["--limit", str(limit)] if limit > 0 else []))
    values = read_json(out_json)
    keys = ["nll_bpd", "nelbo_bpd", "kl_nats", "active_channels", "num_images", "iw_samples"]
    for key, value in numeric_items(values, keys):
        metrics.log_metric(key, value)
    write_text(kl_report.path, png_html(plot, f"KL per group ({values['active_channels']} active channels)"))
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["sample", "--checkpoint", model.path + "/checkpoint.pt", "--reconstruct", "--data", data.path]
        run_cli(argv + device + ["--n", "16", "--temperature", "1", "--nrow", "8", "--out", tmp])
        page = png_html(tmp + "/reconstructions.png", "Test images (odd rows) and their reconstructions")
        write_text(reconstructions.path, page)


def readjust_bn(model: Input[Model], temperature: float, iters: int, gpus: int, readjusted: Output[Model]):
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
            "--device",
            "cuda" if gpus else "cpu",
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
    gpus: int,
    samples: Output[Dataset],
    grid: Output[HTML],
):
    """Sample a grid with the ONNX decoder (onnxruntime, its CUDA provider when the step has a GPU), the way
    serving does."""
    from components.runtime import png_html, run_cli, write_text

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
            "--device",
            "cuda" if gpus else "cpu",
        ]
    )
    page = png_html(
        f"{samples.path}/grid_t{temperature:g}.png", f"{num_samples} samples at t={temperature:g}"
    )
    write_text(grid.path, page)


def fid_stats(
    data: Input[Dataset],
    inception: str,
    inception_sha256: str,
    gpus: str,
    accelerator: str,
    stats: Output[Artifact],
):
    """FID reference statistics of the prepared training set (pytorch-fid's Inception features; the authors'
    splits, up to 50,000 images). Its inputs are the prepared data and the weights: KFP's cache keeps one per
    dataset, and the statistics record both SHA-256s, so FID refuses any other pairing. `gpus` (the plan's
    count, a string) and `accelerator` are also the pod's resources."""
    from components.runtime import run_cli

    print(f"FID statistics on {f'{gpus} x {accelerator}' if int(gpus) else 'the CPU'}")
    argv = ["fid-stats", "--data", data.path, "--inception", inception, "--out", stats.path]
    argv += ["--inception-sha256", inception_sha256] if inception_sha256 else []
    run_cli(argv + ["--device", "cuda" if int(gpus) else "cpu"])  # the plan's count, a string


def fid(
    model: Input[Model],
    stats: Input[Artifact],
    data: Input[Dataset],
    inception: str,
    inception_sha256: str,
    num_samples: int,
    temperature: float,
    seed: int,
    gpus: str,
    accelerator: str,
    metrics: Output[Metrics],
    results: Output[Artifact],
):
    """FID of `num_samples` mean images from the BN-readjusted model at `temperature` (as the authors'
    evaluate_fid) against the training set's statistics: metrics, and results/fid.json with the settings."""
    import os

    from components.runtime import numeric_items, read_json, run_cli

    print(f"FID on {f'{gpus} x {accelerator}' if int(gpus) else 'the CPU'}")
    os.makedirs(results.path, exist_ok=True)
    out_json = results.path + "/fid.json"
    argv = ["fid", "--checkpoint", model.path + "/checkpoint.pt", "--stats", stats.path, "--data", data.path]
    argv += ["--inception", inception, "--n", str(num_samples), "--temperature", str(temperature)]
    argv += ["--inception-sha256", inception_sha256] if inception_sha256 else []
    device = "cuda" if int(gpus) else "cpu"  # the plan's count, a string
    run_cli(argv + ["--seed", str(seed), "--device", device, "--out", out_json])
    values = read_json(out_json)
    for key, value in numeric_items(values, ["fid", "fid_samples", "fid_temperature"]):
        metrics.log_metric(key, value)
    metrics.log_metric("fid_bn_readjusted", float(bool(values.get("fid_bn_readjusted"))))


def register(
    onnx_model: Input[Model],
    model: Input[Model],
    results: Input[Artifact],
    data: Input[Dataset],
    registry: str,
    run_id: str,
    published: Output[Artifact],
):
    """Publish the ONNX decoder, the BN-readjusted checkpoint and the metrics as a registry version (content-
    addressed, written once; `latest` moves to it) with a model card naming this run."""
    import tempfile

    from components.runtime import read_json, run_cli, write_text

    argv = ["model", "publish", "--registry", registry, "--onnx", onnx_model.path, "--checkpoint"]
    argv += [model.path + "/checkpoint.pt", "--metrics", results.path + "/metrics.json", "--run-id", run_id]
    with tempfile.TemporaryDirectory() as tmp:
        run_cli(
            argv + ["--data-manifest", data.path + "/manifest.json", "--manifest-out", tmp + "/manifest.json"]
        )
        version = read_json(tmp + "/manifest.json")["version"]
    published.metadata.update(registry=registry, version=version)
    write_text(published.path, f"{registry}/{version}\n")


# Each step's image at compile time: train takes the CUDA build of torch (it runs on CPU nodes too). The
# pipeline sets the image of prepare, evaluate, readjust-bn and sample at run time (validate_params' plan):
# the GPU image when the step gets a GPU. export-onnx traces the network on the CPU (a GPU would buy nothing).
_STEPS = {
    "validate_params": (validate_params, "cpu"),
    "fingerprint_source": (fingerprint_source, "cpu"),
    "prepare": (prepare, "cpu"),
    "train": (train, "gpu"),
    "evaluate": (evaluate, "cpu"),
    "readjust_bn": (readjust_bn, "cpu"),
    "export_onnx": (export_onnx, "cpu"),
    "sample": (sample, "cpu"),
    "fid_stats": (fid_stats, "cpu"),
    "fid": (fid, "cpu"),
    "register": (register, "cpu"),
}


def build(images: Images = DEFAULT_IMAGES) -> SimpleNamespace:
    """The pipeline's components, each in its image from `images`, with kfp taken from the image."""
    return SimpleNamespace(
        **{
            name: dsl.component(fn, base_image=images.ref(kind), install_kfp_package=False)
            for name, (fn, kind) in _STEPS.items()
        }
    )
