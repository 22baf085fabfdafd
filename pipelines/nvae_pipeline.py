"""The NVAE pipeline: validate -> prepare -> train -> evaluate / readjust BN -> export ONNX -> sample, and FID
when asked.

`build_pipeline(images)` makes the DAG with its components in `images`; `compile_pipeline` writes the spec
uploaded to Kubeflow; `run_local` executes the same DAG with `kfp.local` (in this process's Python, or every
task in its image with the docker runner); `submit` starts a run on a Kubeflow Pipelines endpoint.
"""

import inspect
import logging
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

from kfp import compiler, dsl, kubernetes

from common.errors import ConfigError, NVAEError
from components.images import DEFAULT_IMAGES, Images
from components.params import FIELDS, VALIDATED, PipelineParams
from components.steps import build as build_components

log = logging.getLogger(__name__)

PIPELINE_NAME = "nvae-pipeline"
COMPILED = Path(__file__).with_name("nvae_pipeline.yaml")
S3_SECRET = "nvae-s3-pipeline"  # k8s Secret with the store's endpoint and the pipeline's read-write keys
STORE_CLIENT_LABEL = "nvae.io/store-client"
# The store's CA for TLS (k8s/base/store/tls): the Secret is optional, and the client uses the file only when
# the mount holds it (common.s3.OPTIONAL_CA_ENV), so clusters without TLS to the store need nothing.
S3_CA_SECRET, S3_CA_DIR = "nvae-s3-ca", "/etc/nvae/s3-ca"


def _store_client(task) -> None:
    """What a step that talks to the store gets: the NetworkPolicy label, the keys, the optional CA."""
    from common.s3 import OPTIONAL_CA_ENV

    kubernetes.add_pod_label(task, STORE_CLIENT_LABEL, "true")
    kubernetes.use_secret_as_env(task, S3_SECRET, {k: k for k in S3_ENV}, optional=True)
    kubernetes.use_secret_as_volume(task, S3_CA_SECRET, mount_path=S3_CA_DIR, optional=True)
    task.set_env_variable(OPTIONAL_CA_ENV, f"{S3_CA_DIR}/ca.crt")


def _gpu_step(task, image, accelerator, gpus) -> None:
    """A step that gets `gpus` of `accelerator`, in `image` (both from validate_params' plan, as strings: the
    GPU image and "1" when it gets one), tolerating the GPU nodes' taint."""
    task.set_container_image(image)
    task.set_accelerator_type(accelerator).set_accelerator_limit(gpus)
    kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")


S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")  # the Secret's keys
_TYPES = {"int": int, "float": float, "str": str}
RUNNERS = ("subprocess", "docker")


def build_pipeline(images: Images = DEFAULT_IMAGES):
    """The pipeline function (a KFP `GraphComponent`) with every step in its image from `images`."""
    comp = build_components(images)

    def nvae_pipeline(*values):
        p = SimpleNamespace(**dict(zip(FIELDS, values, strict=True)))
        check = comp.validate_params(
            **{name: getattr(p, name) for name in VALIDATED}, cpu_image=images.cpu, gpu_image=images.gpu
        ).set_display_name("validate parameters")
        check.set_caching_options(False)
        plan = check.outputs

        fingerprint = comp.fingerprint_source(source=p.source).after(check)
        fingerprint.set_display_name("fingerprint the source").set_cpu_request("1").set_memory_request("1G")
        fingerprint.set_caching_options(
            False
        )  # must look at the store every run: it is what keys prepare's cache

        prep = comp.prepare(
            dataset=p.dataset,
            source=p.source,
            source_fingerprint=fingerprint.output,
            limit=p.prepare_limit,
            gpus=p.prepare_gpus,
        )
        prep.set_display_name("prepare (DALI)").set_cpu_request("2").set_memory_request("4G")
        _gpu_step(prep, plan["prepare_image"], p.accelerator, plan["prepare_gpus"])

        fit = comp.train(
            data=prep.outputs["data"],
            preset=p.preset,
            overrides=p.overrides,
            steps=p.steps,
            batch_size=p.batch_size,
            grad_accum=p.grad_accum,
            gpus=p.gpus,
            seed=p.seed,
            nodes=p.nodes,
            accelerator=p.accelerator,
            checkpoint_store=p.checkpoint_store,
            checkpoint_every=p.checkpoint_every,
            trainjob_deadline_s=p.trainjob_deadline_s,
            trainer_api=p.trainer_api,
            import_checkpoint=p.import_checkpoint,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            image=images.gpu,
        )
        fit.set_display_name("train (torchrun / TrainJob)").set_cpu_request("4").set_memory_request(
            "16G"
        ).set_memory_limit("64G")
        # Retried on any failure (KFP cannot filter by exit status); a retry resumes from the run's
        # checkpoints, and one after a permanent failure stops at once (components.runtime).
        fit.set_accelerator_type(p.accelerator).set_accelerator_limit(plan["train_pod_gpus"]).after(check)
        fit.set_retry(3, backoff_duration="60s")
        kubernetes.add_toleration(fit, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
        kubernetes.empty_dir_mount(
            fit, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit="16Gi"
        )

        ev = comp.evaluate(
            model=fit.outputs["model"],
            data=prep.outputs["data"],
            iw_samples=p.iw_samples,
            limit=p.eval_limit,
            gpus=p.eval_gpus,
        )
        ev.set_display_name("evaluate (IW bits/dim)").set_cpu_request("2").set_memory_request("8G")
        _gpu_step(ev, plan["eval_image"], p.accelerator, plan["eval_gpus"])

        adj = comp.readjust_bn(
            model=fit.outputs["model"], temperature=p.temperature, iters=p.readjust_iters, gpus=p.eval_gpus
        )
        adj.set_display_name("readjust BN").set_cpu_request("2").set_memory_request("4G")
        _gpu_step(adj, plan["eval_image"], p.accelerator, plan["eval_gpus"])

        onnx = comp.export_onnx(model=adj.outputs["readjusted"])
        onnx.set_display_name("export ONNX").set_cpu_request("1").set_memory_request("4G")

        smp = comp.sample(
            onnx_model=onnx.outputs["onnx_model"],
            num_samples=p.num_samples,
            temperature=p.temperature,
            seed=p.seed,
            gpus=p.sample_gpus,
        )
        smp.set_display_name("sample (onnxruntime)").set_cpu_request("1").set_memory_request("2G")
        _gpu_step(smp, plan["sample_image"], p.accelerator, plan["sample_gpus"])

        with dsl.If(p.fid_samples > 0, name="fid"):
            # The plan's GPU count and the accelerator are also the steps' inputs: that brings them into the
            # condition's sub-DAG, where the pod spec reads them (a value used only in a pod spec is not
            # passed into a sub-DAG).
            stats = comp.fid_stats(
                data=prep.outputs["data"],
                inception=p.fid_inception,
                inception_sha256=p.fid_inception_sha256,
                gpus=plan["eval_gpus"],
                accelerator=p.accelerator,
            )
            score = comp.fid(
                model=adj.outputs["readjusted"],
                stats=stats.outputs["stats"],
                data=prep.outputs["data"],
                inception=p.fid_inception,
                inception_sha256=p.fid_inception_sha256,
                num_samples=p.fid_samples,
                temperature=p.temperature,
                seed=p.seed,
                gpus=plan["eval_gpus"],
                accelerator=p.accelerator,
            )
            for task, name in (
                (stats, "FID statistics (training set)"),
                (score, "FID (samples vs training set)"),
            ):
                task.set_display_name(name).set_cpu_request("2").set_memory_request("8G")
                _gpu_step(task, plan["eval_image"], p.accelerator, plan["eval_gpus"])
                _store_client(task)  # the weights may be in the store

        with dsl.If(p.registry != "", name="publish"):
            reg = comp.register(
                onnx_model=onnx.outputs["onnx_model"],
                model=adj.outputs["readjusted"],
                results=ev.outputs["results"],
                data=prep.outputs["data"],
                registry=p.registry,
                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            )
            reg.set_display_name("register (model registry)").set_cpu_request("1").set_memory_request("2G")
            reg.after(smp)  # published only once a grid was sampled from the exported decoder
            _store_client(reg)

        # The object store's NetworkPolicy admits only pods carrying this label (k8s/base/store).
        for task in (ev, adj, onnx, smp):
            kubernetes.add_pod_label(task, STORE_CLIENT_LABEL, "true")
        # prepare reads s3:// sources and train writes s3:// checkpoints with the store's endpoint and keys.
        for task in (fingerprint, prep, fit):
            _store_client(task)

    # KFP reads parameter descriptions from the docstring's Args section and shows them in the run form.
    # The run form's parameters: PipelineParams' fields, in their order, with their defaults (KFP reads the
    # signature).
    nvae_pipeline.__signature__ = inspect.Signature(
        [
            inspect.Parameter(
                name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default, annotation=_TYPES[f.type]
            )
            for name, f in FIELDS.items()
        ]
    )
    nvae_pipeline.__doc__ = "NVAE pipeline.\n\nArgs:\n" + "".join(
        f"    {name}: {text}\n" for name, text in PipelineParams.describe().items()
    )
    return dsl.pipeline(
        name=PIPELINE_NAME,
        description="NVAE: DALI preparation, training, IW evaluation, BN readjustment, ONNX export and "
        "sampling.",
    )(nvae_pipeline)


nvae_pipeline = build_pipeline()  # the committed spec's DAG (default images)


def compile_pipeline(out: str | Path = COMPILED, images: Images = DEFAULT_IMAGES) -> Path:
    """Write the pipeline spec (YAML) that is uploaded to Kubeflow, its steps in `images`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pipeline = nvae_pipeline if images == DEFAULT_IMAGES else build_pipeline(images)
    compiler.Compiler().compile(pipeline, str(out))
    return out


def run_local(
    params: PipelineParams,
    root: str | Path = "runs/pipeline",
    images: Images = DEFAULT_IMAGES,
    runner: str = "subprocess",
) -> dict[str, str]:
    """Run the same DAG on this machine with kfp.local; returns where the results are.

    runner `subprocess`: every step in this process's Python (images are ignored). `docker`: every step in
    its image with the compiled command, as on a cluster (`pipelines.container_runner`)."""
    from kfp import local

    if runner not in RUNNERS:
        raise ConfigError(f"runner={runner!r}; choose one of: {', '.join(RUNNERS)}")
    params.validate()
    root = Path(root).resolve()
    if runner == "docker":
        from pipelines.container_runner import docker_runner

        local.init(runner=docker_runner(root, env_names=S3_ENV), pipeline_root=str(root))
    else:
        from kfp.local import subprocess_task_handler

        from pipelines.local_logs import run_local_subprocess

        subprocess_task_handler.run_local_subprocess = run_local_subprocess  # folds the executor input
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    log.info(
        "local run (%s runner): Kubernetes settings (resources, GPUs, labels, secrets) do not apply", runner
    )
    with warnings.catch_warnings():
        # ... which kfp.local says once per task and setting, and the subprocess runner adds a warning per task
        # that the images are not used: known here, and 4 lines per task in the log.
        warnings.filterwarnings("ignore", message=r"Task '.*': settings \[", category=UserWarning)
        warnings.filterwarnings(
            "ignore", message="You may be attemping to run a task", category=RuntimeWarning
        )
        task = build_pipeline(images)(**params.as_arguments())
    del task
    return find_local_outputs(root)


def find_local_outputs(root: Path) -> dict[str, str]:
    """The newest local run's key artifacts under `root` (kfp.local lays out <run>/<task>/<output>)."""
    runs = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    if not runs:
        return {}
    run = runs[-1]
    found: dict[str, str] = {"run": str(run)}
    patterns = {
        "metrics": "evaluate/results/metrics.json",
        "kl_plot": "evaluate/results/kl_per_group.png",
        "kl_report": "evaluate/kl_report",
        "reconstructions": "evaluate/reconstructions",
        "curves": "train/curves",
        "onnx": "export-onnx/onnx_model",
        "checkpoint": "train/model/checkpoint.pt",
        "readjusted": "readjust-bn/readjusted/checkpoint.pt",
        "samples": "sample/samples/samples.npz",
        "fid": "fid/results/fid.json",
    }
    for key, rel in patterns.items():
        path = run / rel
        if path.exists():
            found[key] = str(path)
    grids = sorted(run.glob("sample/samples/grid_t*.png"))
    if grids:
        found["sample_grid"] = str(grids[0])
    return found


# Where a pod finds a token for the KFP API: KFP's own audience-scoped projected token first (multi-user
# Kubeflow), then the pod's service-account token.
IN_CLUSTER_TOKENS = (
    Path("/var/run/secrets/kubeflow/pipelines/token"),
    Path("/var/run/secrets/kubernetes.io/serviceaccount/token"),
)


class SubmitError(NVAEError):
    """The Kubeflow Pipelines endpoint refused or could not take the run."""


def _bearer_token(token_file: str | Path | None) -> str | None:
    if token_file is not None:
        try:
            return Path(token_file).read_text().strip()
        except OSError as exc:
            raise SubmitError(f"--token-file {token_file}: cannot read: {exc.strerror}") from None
    for path in IN_CLUSTER_TOKENS:
        if path.is_file():
            return path.read_text().strip()
    return None


def _check_endpoint(host: str, token: str | None) -> None:
    """Ask the API's health endpoint once, so a refusal is reported with its HTTP status (kfp.Client retries
    it five times and then reports only a timeout)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{host.rstrip('/')}/apis/v2beta1/healthz")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    hint = " (pass --token-file, or run where a service-account token is mounted)"
    try:
        with urllib.request.urlopen(request, timeout=30):
            pass
    except urllib.error.HTTPError as exc:
        raise SubmitError(
            f"{host}: HTTP {exc.code} {exc.reason}{hint if exc.code in (401, 403) else ''}"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SubmitError(f"{host}: cannot connect: {reason}") from None


def submit(
    host: str,
    params: PipelineParams,
    experiment: str = "nvae",
    run_name: str | None = None,
    package: str | Path = COMPILED,
    images: Images = DEFAULT_IMAGES,
    namespace: str | None = None,
    token_file: str | Path | None = None,
) -> dict[str, str]:
    """Upload-and-run on a Kubeflow Pipelines endpoint (the compiled spec, with these arguments), in
    `namespace` (a multi-user Kubeflow profile) with a bearer token from `token_file` or the pod's own.
    Returns the run id and the run's page in the KFP UI."""
    import kfp
    from kfp_server_api.exceptions import ApiException

    params.validate()
    token = _bearer_token(token_file)
    _check_endpoint(host, token)
    try:
        client = kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=token)
        with tempfile.TemporaryDirectory(prefix="nvae-spec-") as tmp:
            if images != DEFAULT_IMAGES:  # the committed spec names the default images: compile one for these
                package = compile_pipeline(Path(tmp) / "nvae_pipeline.yaml", images)
            result = client.create_run_from_pipeline_package(
                str(package),
                arguments=params.as_arguments(),
                run_name=run_name,
                experiment_name=experiment,
                namespace=namespace,
            )
    except ApiException as exc:
        hint = (
            " (pass --token-file, or run where a service-account token is mounted)"
            if exc.status == 401
            else ""
        )
        raise SubmitError(f"{host}: HTTP {exc.status} {exc.reason}{hint}") from None
    except OSError as exc:  # connection refused, DNS, TLS
        raise SubmitError(f"{host}: cannot connect: {exc}") from None
    run_id = result.run_id
    return {"run_id": run_id, "url": f"{host.rstrip('/')}/#/runs/details/{run_id}"}
