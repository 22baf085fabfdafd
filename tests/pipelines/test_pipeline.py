import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml

from cli.main import main
from common.errors import ConfigError
from components.images import DEFAULT_IMAGES
from components.params import LOCAL_SOURCE, STORE_SOURCE, VALIDATED, PipelineParams
from pipelines.nvae_pipeline import COMPILED, compile_pipeline, find_local_outputs

TASKS = {
    "validate-params",
    "fingerprint-source",
    "prepare",
    "train",
    "evaluate",
    "readjust-bn",
    "export-onnx",
    "sample",
}


def _docs(path):
    return list(yaml.safe_load_all(Path(path).read_text()))


def test_committed_spec_is_up_to_date(tmp_path):
    fresh = compile_pipeline(tmp_path / "p.yaml")
    assert fresh.read_text() == COMPILED.read_text(), "run `nvae pipeline compile` and commit the result"


def test_spec_loads_back_with_kfp_and_has_the_dag(tmp_path):
    from kfp import components

    loaded = components.load_component_from_file(str(COMPILED))
    assert loaded.name == "nvae-pipeline"
    spec, platform = _docs(COMPILED)
    tasks = spec["root"]["dag"]["tasks"]
    conditions = {  # the register step inside `if registry != ""`, the FID steps inside `if fid_samples > 0`
        set(spec["components"][tasks[c]["componentRef"]["name"]]["dag"]["tasks"]) == {"register"}: c
        for c in set(tasks) - TASKS
    }
    assert set(conditions) == {True, False}
    condition, fid = conditions[True], conditions[False]
    assert "registry" in tasks[condition]["triggerPolicy"]["condition"]
    assert "fid_samples" in tasks[fid]["triggerPolicy"]["condition"]
    inner = spec["components"][tasks[condition]["componentRef"]["name"]]["dag"]["tasks"]
    assert {"export-onnx", "readjust-bn", "evaluate", "prepare", "sample"} <= set(
        tasks[condition].get("dependentTasks", [])
    ) | {a["taskOutputArtifact"]["producerTask"] for a in inner["register"]["inputs"]["artifacts"].values()
         if "taskOutputArtifact" in a}  # fmt: skip
    deps = {name: set(t.get("dependentTasks", [])) for name, t in tasks.items()}
    # validate-params also feeds the image (and train's GPU count) of the steps that can get a GPU.
    assert deps["fingerprint-source"] == {"validate-params"}
    assert deps["prepare"] == {"validate-params", "fingerprint-source"}
    assert deps["train"] == {"prepare", "validate-params"}
    assert deps["evaluate"] == {"train", "prepare", "validate-params"}
    assert deps["readjust-bn"] == {"train", "validate-params"} and deps["export-onnx"] == {"readjust-bn"}
    assert deps["sample"] == {"export-onnx", "validate-params"}
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["preset"]["defaultValue"] == "fmnist-cpu" and params["gpus"]["defaultValue"] == 0
    # A cluster run reads the dataset from the store (`nvae data upload`), not from this machine's disk.
    assert params["source"]["defaultValue"] == STORE_SOURCE
    assert set(params) == set(PipelineParams().as_arguments())


def test_every_parameter_has_its_description_in_the_run_form():
    spec, _ = _docs(COMPILED)
    params = spec["root"]["inputDefinitions"]["parameters"]
    described = PipelineParams.describe()
    assert set(described) == set(PipelineParams().as_arguments())
    for name, text in described.items():
        assert " ".join(params[name]["description"].split()) == text, name


@pytest.mark.parametrize(
    "setting, message",
    [
        ("prepare_limit=-1", "prepare_limit=-1 is out of range; allowed prepare_limit >= 0"),
        ("batch_size=-2", "batch_size=-2 is out of range; allowed batch_size >= 0"),
        ("eval_limit=-1", "eval_limit=-1 is out of range; allowed eval_limit >= 0"),
        ("readjust_iters=0", "readjust_iters=0 is out of range; allowed readjust_iters >= 1"),
        ("eval_gpus=2", "eval_gpus=2 is out of range; allowed 0 <= eval_gpus <= 1"),
        ("prepare_gpus=-1", "prepare_gpus=-1 is out of range; allowed 0 <= prepare_gpus <= 1"),
        ("nodes=0", "nodes=0 is out of range; allowed nodes >= 1"),
        ("grad_accum=0", "grad_accum=0 is out of range; allowed grad_accum >= 1"),
        ("checkpoint_every=-1", "checkpoint_every=-1 is out of range; allowed checkpoint_every >= 0"),
        ("checkpoint_store=/data/runs", "checkpoint_store='/data/runs': expected s3://bucket/prefix"),
        (
            "import_checkpoint=models/ffhq.pt",
            "import_checkpoint='models/ffhq.pt': expected s3://bucket/key, an",
        ),
        ("import_checkpoint=s3://nvae/nvlabs/", "import_checkpoint='s3://nvae/nvlabs/' names no object"),
        ("fid_samples=-1", "fid_samples=-1 is out of range; allowed fid_samples >= 0"),
        ("fid_samples=100", "fid_samples=100 needs fid_inception: pytorch-fid's Inception weights as"),
        ("fid_inception=weights.pth", "fid_inception='weights.pth': expected s3://bucket/key, an absolute"),
        ("fid_inception_sha256=abc", "fid_inception_sha256='abc': expected 64 hex digits, or empty"),
    ],
)
def test_the_validate_step_names_the_parameter_and_its_range(setting, message):
    from components.steps import validate_params

    values = {**PipelineParams().as_arguments(), **dict([setting.split("=")])}
    args = {k: type(getattr(PipelineParams(), k))(v) for k, v in values.items() if k in _VALIDATE_ARGS}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate_params(**args, cpu_image="c", gpu_image="g")


_VALIDATE_ARGS = VALIDATED


def test_the_validate_step_takes_exactly_the_checked_parameters():
    """validate-params' signature (KFP needs it written out) lists the parameters PipelineParams marks as
    checked, in their order: a parameter added to one and not the other fails here."""
    import inspect

    from components.steps import validate_params

    assert list(inspect.signature(validate_params).parameters) == [*VALIDATED, "cpu_image", "gpu_image"]


def test_the_run_form_lists_the_parameters_in_their_order_with_their_defaults():
    from pipelines.nvae_pipeline import nvae_pipeline

    inputs = nvae_pipeline.component_spec.inputs
    assert list(inputs) == list(PipelineParams().as_arguments())
    assert {name: spec.default for name, spec in inputs.items()} == PipelineParams().as_arguments()


def test_train_task_resources_and_kubernetes_settings():
    spec, platform = _docs(COMPILED)
    train_exec = spec["deploymentSpec"]["executors"]["exec-train"]["container"]
    assert train_exec["image"] == DEFAULT_IMAGES.gpu
    res = train_exec["resources"]
    assert res["memoryRequest"] == 16.0 and res["cpuRequest"] == 4.0
    assert "accelerator" in res  # type and count come from pipeline parameters
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    assert k8s["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert k8s["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
    assert k8s["secretAsEnv"][0]["secretName"] == "nvae-s3-pipeline"
    prep = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-prepare"]
    assert prep["secretAsEnv"][0]["secretName"] == "nvae-s3-pipeline"  # s3:// sources, the read-write user
    # The store's CA (TLS component): an optional Secret mounted where NVAE_S3_CA_IF_PRESENT points.
    from common.s3 import OPTIONAL_CA_ENV

    executors = spec["deploymentSpec"]["executors"]
    for name in ("exec-prepare", "exec-train", "exec-register"):
        (ca,) = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][name]["secretAsVolume"]
        assert (ca["secretName"], ca["optional"]) == ("nvae-s3-ca", True)
        env = {e["name"]: e["value"] for e in executors[name]["container"].get("env", [])}
        assert env[OPTIONAL_CA_ENV] == ca["mountPath"] + "/ca.crt", name
    assert spec["root"]["dag"]["tasks"]["train"]["retryPolicy"]["maxRetryCount"] == 3
    for name, ex in spec["deploymentSpec"]["executors"].items():
        if name not in _RUN_TIME_IMAGES and name not in _FID_EXECUTORS:
            assert ex["container"]["image"] in (DEFAULT_IMAGES.cpu, DEFAULT_IMAGES.gpu), name


# Steps whose image validate-params chooses at run time (GPU image when the step gets a GPU), and the plan
# output and pipeline parameter behind each.
_FID_EXECUTORS = ("exec-fid-stats", "exec-fid")  # run-time images too, inside their condition (own test)
_RUN_TIME_IMAGES = {
    "exec-prepare": ("prepare_image", "prepare_gpus"),
    "exec-evaluate": ("eval_image", "eval_gpus"),
    "exec-readjust-bn": ("eval_image", "eval_gpus"),
    "exec-sample": ("sample_image", "sample_gpus"),
}


def test_steps_get_gpus_and_their_image_from_pipeline_parameters():
    spec, platform = _docs(COMPILED)
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    tasks = spec["root"]["dag"]["tasks"]
    for executor, (plan_key, param) in _RUN_TIME_IMAGES.items():
        container = executors[executor]["container"]
        channel = f"pipelinechannel--validate-params-{plan_key}"
        assert container["image"] == f"{{{{$.inputs.parameters['{channel}']}}}}", executor
        task = tasks[executor.removeprefix("exec-")]
        source = task["inputs"]["parameters"][channel]["taskOutputParameter"]
        assert source == {"producerTask": "validate-params", "outputParameterKey": plan_key}
        accelerator = container["resources"]["accelerator"]
        count = f"pipelinechannel--validate-params-{param}"  # the plan's count: a string (the driver's rule)
        assert accelerator["resourceCount"] == f"{{{{$.inputs.parameters['{count}']}}}}"
        assert task["inputs"]["parameters"][count]["taskOutputParameter"]["outputParameterKey"] == param
        assert accelerator["resourceType"] == "{{$.inputs.parameters['pipelinechannel--accelerator']}}"
        assert k8s[executor]["tolerations"][0]["key"] == "nvidia.com/gpu", executor
    # export-onnx stays on the CPU image with no accelerator.
    assert executors["exec-export-onnx"]["container"]["image"] == DEFAULT_IMAGES.cpu
    assert "accelerator" not in executors["exec-export-onnx"]["container"].get("resources", {})
    # The train pod holds the GPUs only when it trains itself (nodes == 1).
    train = executors["exec-train"]["container"]["resources"]["accelerator"]
    assert (
        train["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--validate-params-train_pod_gpus']}}"
    )


def test_the_fid_steps_are_off_by_default_and_get_the_evaluation_image_and_gpus():
    """Inside their condition's sub-DAG, the FID steps read the plan's image and GPU count from inputs that the
    condition passes down from validate-params (the KFP driver resolves a pod spec only from the task's own
    inputs), and reach the store for the weights."""
    spec, platform = _docs(COMPILED)
    tasks = spec["root"]["dag"]["tasks"]
    (fid,) = [t for t in tasks.values() if "fid_samples" in t.get("triggerPolicy", {}).get("condition", "")]
    assert (
        fid["triggerPolicy"]["condition"]
        == "int(inputs.parameter_values['pipelinechannel--fid_samples']) > 0"
    )
    assert spec["root"]["inputDefinitions"]["parameters"]["fid_samples"]["defaultValue"] == 0
    component = spec["components"][fid["componentRef"]["name"]]
    assert set(component["dag"]["tasks"]) == {"fid-stats", "fid"}
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert fid["inputs"]["parameters"]["pipelinechannel--accelerator"] == {
        "componentInputParameter": "accelerator"
    }
    for key in ("eval_image", "eval_gpus"):
        channel = f"pipelinechannel--validate-params-{key}"
        source = fid["inputs"]["parameters"][channel]["taskOutputParameter"]
        assert source == {"producerTask": "validate-params", "outputParameterKey": key}
    for channel in ("pipelinechannel--validate-params-eval_image", "pipelinechannel--validate-params-eval_gpus",
                    "pipelinechannel--accelerator"):  # fmt: skip
        assert channel in component["inputDefinitions"]["parameters"]
        for name, task in component["dag"]["tasks"].items():
            assert task["inputs"]["parameters"][channel] == {"componentInputParameter": channel}, name
    for executor in _FID_EXECUTORS:
        container = spec["deploymentSpec"]["executors"][executor]["container"]
        assert container["image"] == "{{$.inputs.parameters['pipelinechannel--validate-params-eval_image']}}"
        count = container["resources"]["accelerator"]["resourceCount"]
        assert count == "{{$.inputs.parameters['pipelinechannel--validate-params-eval_gpus']}}"
        assert k8s[executor]["podMetadata"]["labels"] == {"nvae.io/store-client": "true"}
        assert k8s[executor]["secretAsEnv"][0]["secretName"] == "nvae-s3-pipeline"
    stats_in = component["dag"]["tasks"]["fid"]["inputs"]["artifacts"]["stats"]["taskOutputArtifact"]
    assert stats_in == {"producerTask": "fid-stats", "outputArtifactKey": "stats"}


@pytest.mark.parametrize(
    "settings, plan",
    [
        ({}, ("cpu", "cpu", "cpu", "0", "0", "0", "0")),
        ({"prepare_gpus": 1, "gpus": 2}, ("gpu", "cpu", "cpu", "1", "0", "0", "2")),
        ({"eval_gpus": 1, "sample_gpus": 1, "gpus": 1}, ("cpu", "gpu", "gpu", "0", "1", "1", "1")),
        (
            {"nodes": 2, "gpus": 4},
            ("cpu", "cpu", "cpu", "0", "0", "0", "0"),
        ),  # a TrainJob's nodes hold the GPUs
    ],
)
def test_the_validate_step_plans_images_and_train_pod_gpus(settings, plan):
    from components.steps import validate_params

    values = {**PipelineParams().as_arguments(), **settings}
    args = {k: v for k, v in values.items() if k in _VALIDATE_ARGS}
    out = validate_params(**args, cpu_image="cpu", gpu_image="gpu")
    assert tuple(out) == plan


def test_prepare_is_cached_on_the_source_content_not_only_its_uri():
    spec, _ = _docs(COMPILED)
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["fingerprint-source"]["cachingOptions"] == {}  # enableCache absent: never cached
    assert tasks["prepare"]["cachingOptions"] == {"enableCache": True}
    fed = tasks["prepare"]["inputs"]["parameters"]["source_fingerprint"]["taskOutputParameter"]
    assert fed == {"producerTask": "fingerprint-source", "outputParameterKey": "Output"}


def test_the_source_fingerprint_changes_when_an_object_is_replaced_under_the_same_uri(s3_env, tmp_path):
    import boto3

    from data.remote import source_fingerprint

    client = boto3.client("s3")
    s3_env["make_bucket"]("fingerprints")
    client.put_object(Bucket="fingerprints", Key="raw/a.idx", Body=b"one")
    client.put_object(Bucket="fingerprints", Key="raw/b.idx", Body=b"two")
    first = source_fingerprint("s3://fingerprints/raw")
    assert source_fingerprint("s3://fingerprints/raw") == first
    client.put_object(Bucket="fingerprints", Key="raw/b.idx", Body=b"TWO")
    assert source_fingerprint("s3://fingerprints/raw") != first
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "a.idx").write_bytes(b"one")
    local = source_fingerprint(folder)
    (folder / "a.idx").write_bytes(b"one, longer")
    assert source_fingerprint(folder) != local


def test_multi_node_training_needs_a_checkpoint_store():
    with pytest.raises(ConfigError, match="nodes=2 needs a checkpoint_store"):
        PipelineParams.from_overrides({"nodes": "2", "checkpoint_store": ""})


def _executors(spec_path):
    spec, _ = _docs(spec_path)
    return spec["deploymentSpec"]["executors"]


def test_no_executor_installs_anything_at_run_time():
    """kfp comes from the image: nothing in a pod runs pip or reaches a package index."""
    for name, ex in _executors(COMPILED).items():
        command = " ".join(ex["container"].get("command", []) + ex["container"].get("args", []))
        assert "kfp.dsl.executor_main" in command, name
        for word in ("pip install", "pip3 install", "ensurepip", "--index-url", "apt-get", "uv pip"):
            assert word not in command, f"{name}: {word}"


def test_image_registry_and_tag_are_chosen_at_compile_time(tmp_path):
    out = tmp_path / "spec.yaml"
    argv = ["pipeline", "compile", "--out", str(out), "--image-registry", "registry.example:5000/team"]
    assert main([*argv, "--image-tag", "v7"]) == 0
    images = {
        ex["container"]["image"]
        for name, ex in _executors(out).items()
        if name not in _RUN_TIME_IMAGES and name not in _FID_EXECUTORS
    }
    assert images == {"registry.example:5000/team/nvae-cpu:v7", "registry.example:5000/team/nvae-gpu:v7"}
    assert _executors(out)["exec-train"]["container"]["image"].endswith("/nvae-gpu:v7")
    # ... and so are the images validate-params chooses from at run time.
    spec, _ = _docs(out)
    constants = spec["root"]["dag"]["tasks"]["validate-params"]["inputs"]["parameters"]
    assert constants["cpu_image"]["runtimeValue"]["constant"] == "registry.example:5000/team/nvae-cpu:v7"
    assert constants["gpu_image"]["runtimeValue"]["constant"] == "registry.example:5000/team/nvae-gpu:v7"


def test_compiling_with_the_default_images_says_in_one_line_where_images_come_from(tmp_path, capsys):
    assert main(["pipeline", "compile", "--out", str(tmp_path / "a.yaml")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and DEFAULT_IMAGES.cpu in err[0]
        and "--image-registry" in err[0]
        and "release" in err[0]
    )
    argv = [
        "pipeline",
        "compile",
        "--out",
        str(tmp_path / "b.yaml"),
        "--image-registry",
        "registry.example/t",
    ]
    assert main(argv) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "flag, value", [("--image-registry", "https://ghcr.io/x"), ("--image-tag", "bad tag")]
)
def test_a_bad_image_name_is_one_line_naming_it(tmp_path, capsys, flag, value):
    assert main(["pipeline", "compile", "--out", str(tmp_path / "s.yaml"), flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and value in err and "image" in err
    assert not (tmp_path / "s.yaml").exists()


def test_parameters_are_validated_before_anything_runs(capsys):
    with pytest.raises(ConfigError, match="gpus=-1 is out of range"):
        PipelineParams.from_overrides({"gpus": "-1"})
    with pytest.raises(ConfigError, match="steps=0 is out of range"):
        PipelineParams.from_overrides({"steps": "0"})
    with pytest.raises(ConfigError, match="dataset='svhn' is not known"):
        PipelineParams.from_overrides({"dataset": "svhn"})
    with pytest.raises(ConfigError, match="num_scales=0 is out of range"):
        PipelineParams.from_overrides({"overrides": "num_scales=0"})
    assert main(["pipeline", "run", "--local", "--set", "temperature=0"]) == 2
    assert "temperature=0.0 is out of range" in capsys.readouterr().err


class _KfpStub(BaseHTTPRequestHandler):
    """Just enough of the KFP v2beta1 REST API for kfp.Client to create a run."""

    requests: list = []
    headers_seen: list = []
    status = 200

    def log_message(self, *args):
        pass

    def _reply(self, body: dict):
        self.headers_seen.append(self.headers.get("Authorization"))
        data = json.dumps(body if self.status == 200 else {"error": "denied", "code": 16}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.requests.append(("GET", self.path, None))
        if "healthz" in self.path:
            self._reply({"multi_user": False})
        elif self.path.startswith("/apis/v2beta1/experiments"):
            self._reply({"experiments": [], "total_size": 0})
        else:
            self._reply({})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self.requests.append(("POST", self.path, body))
        if self.path.startswith("/apis/v2beta1/experiments"):
            self._reply({"experiment_id": "exp-1", "display_name": body.get("display_name")})
        elif self.path.startswith("/apis/v2beta1/runs"):
            self._reply({"run_id": "run-1", "display_name": body.get("display_name"), "state": "PENDING"})
        else:
            self._reply({})


def _serve_stub(status=200):
    _KfpStub.requests, _KfpStub.headers_seen, _KfpStub.status = [], [], status
    server = ThreadingHTTPServer(("127.0.0.1", 0), _KfpStub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}"


def test_submit_builds_the_run_request(capsys):
    server, host = _serve_stub()
    try:
        assert (
            main(
                [
                    "pipeline",
                    "submit",
                    "--host",
                    host,
                    "--experiment",
                    "exp",
                    "--set",
                    "steps=1000",
                    "--set",
                    "gpus=4",
                ]
            )
            == 0
        )
    finally:
        server.shutdown()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["run_id"] == "run-1"
    runs = [r for r in _KfpStub.requests if r[0] == "POST" and r[1].startswith("/apis/v2beta1/runs")]
    assert len(runs) == 1
    body = runs[0][2]
    assert body["experiment_id"] == "exp-1"
    assert body["runtime_config"]["parameters"]["steps"] == 1000
    assert body["runtime_config"]["parameters"]["gpus"] == 4
    spec = body["pipeline_spec"]
    spec = spec.get("pipeline_spec", spec)  # the client may wrap spec + platform spec
    assert spec["pipelineInfo"]["name"] == "nvae-pipeline"


def test_submit_into_a_namespace_with_a_token_prints_the_run_page(tmp_path, capsys):
    token = tmp_path / "token"
    token.write_text("secret-token\n")
    server, host = _serve_stub()
    try:
        argv = ["pipeline", "submit", "--host", host, "--namespace", "team-a", "--token-file", str(token)]
        assert main([*argv, "--experiment", "exp", "--run-name", "my run"]) == 0
    finally:
        server.shutdown()
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["url"] == f"{host}/#/runs/details/run-1" and result["namespace"] == "team-a"
    assert f"{host}/#/runs/details/run-1" in err
    assert set(_KfpStub.headers_seen) == {"Bearer secret-token"}
    (exp,) = [r for r in _KfpStub.requests if r[0] == "POST" and r[1].startswith("/apis/v2beta1/experiments")]
    assert exp[2]["namespace"] == "team-a" and exp[2]["display_name"] == "exp"
    (run,) = [r for r in _KfpStub.requests if r[0] == "POST" and r[1].startswith("/apis/v2beta1/runs")]
    assert run[2]["display_name"] == "my run"


def test_submit_uses_the_in_cluster_token_when_mounted(tmp_path, monkeypatch):
    from pipelines import nvae_pipeline

    sa = tmp_path / "sa-token"
    sa.write_text("pod-token")
    monkeypatch.setattr(nvae_pipeline, "IN_CLUSTER_TOKENS", (tmp_path / "absent", sa))
    server, host = _serve_stub()
    try:
        assert main(["pipeline", "submit", "--host", host]) == 0
    finally:
        server.shutdown()
    assert set(_KfpStub.headers_seen) == {"Bearer pod-token"}


def test_a_refused_submission_is_one_line_naming_host_and_status(tmp_path, capsys):
    server, host = _serve_stub(status=401)
    try:
        assert main(["pipeline", "submit", "--host", host]) == 2
    finally:
        server.shutdown()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and host in err and "401" in err and "--token-file" in err
    assert main(["pipeline", "submit", "--host", host, "--token-file", str(tmp_path / "none")]) == 2
    assert "--token-file" in capsys.readouterr().err


def test_submit_with_other_images_sends_a_spec_naming_them():
    server, host = _serve_stub()
    try:
        argv = [
            "pipeline",
            "submit",
            "--host",
            host,
            "--image-registry",
            "localhost/team",
            "--image-tag",
            "t1",
        ]
        assert main(argv) == 0
    finally:
        server.shutdown()
    (run,) = [r for r in _KfpStub.requests if r[0] == "POST" and r[1].startswith("/apis/v2beta1/runs")]
    spec = run[2]["pipeline_spec"]
    spec = spec.get("pipeline_spec", spec)
    executors = spec["deploymentSpec"]["executors"]
    images = {
        ex["container"]["image"]
        for name, ex in executors.items()
        if name not in _RUN_TIME_IMAGES and name not in _FID_EXECUTORS
    }
    assert images == {"localhost/team/nvae-cpu:t1", "localhost/team/nvae-gpu:t1"}


TINY = "channels=8 z_channels=4 groups=2 cells_enc=1 cells_dec=1 pre_cells=1 post_cells=1 num_mix=3"


def test_local_pipeline_end_to_end(tmp_path, capsys):
    """The README's main job, tiny: every step runs with kfp.local and leaves its artifact."""
    pytest.importorskip("inference.export", reason="needs inference.export")
    args = [
        "pipeline",
        "run",
        "--local",
        "--root",
        str(tmp_path / "runs"),
        "--set",
        "prepare_limit=200",
        "--set",
        f"overrides={TINY}",
        "--set",
        "steps=8",
        "--set",
        "iw_samples=2",
        "--set",
        "eval_limit=8",
        "--set",
        "readjust_iters=2",
        "--set",
        "num_samples=4",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "local pipeline run finished" in out and f"source: {LOCAL_SOURCE}" in out
    found = find_local_outputs(tmp_path / "runs")
    metrics = json.loads(Path(found["metrics"]).read_text())
    assert metrics["num_images"] == 8 and np.isfinite(metrics["nll_bpd"])
    assert Path(found["onnx"]).stat().st_size > 0
    assert Path(found["sample_grid"]).read_bytes()[:4] == b"\x89PNG"
    with np.load(found["samples"]) as z:
        assert z["images_t0.8"].shape == (4, 28, 28, 1)
    # Every declared output of every step is an artifact of its own with content (what a cluster keeps).
    spec, _ = _docs(COMPILED)
    run = Path(found["run"])
    checked = []
    for task, t in spec["root"]["dag"]["tasks"].items():
        outputs = spec["components"][t["componentRef"]["name"]].get("outputDefinitions", {})
        for name, art in outputs.get("artifacts", {}).items():
            path = run / task / name
            if art["artifactType"]["schemaTitle"] == "system.Metrics":
                assert _logged_metrics(run / task, name), f"{task}/{name}: no metrics logged"
            else:
                files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
                assert files and all(f.stat().st_size > 0 for f in files), f"{task}/{name} is empty"
                if art["artifactType"]["schemaTitle"] == "system.HTML":
                    assert b"data:image/png;base64," in path.read_bytes(), f"{task}/{name}"
            checked.append(f"{task}/{name}")
    assert {"train/curves", "evaluate/results", "evaluate/kl_report", "evaluate/reconstructions"} <= set(
        checked
    )
    assert {"train/train_metrics", "evaluate/metrics", "sample/grid"} <= set(checked)
    assert (run / "evaluate" / "results" / "kl_per_group.png").stat().st_size > 0


def _logged_metrics(task_dir: Path, name: str) -> dict:
    """The scalars a step logged to its Metrics output (kfp.local keeps them in executor_output.json)."""
    out = json.loads((task_dir / "executor_output.json").read_text())
    (artifact,) = out["artifacts"][name]["artifacts"]
    return artifact.get("metadata", {})


def test_gradient_accumulation_is_a_pipeline_parameter_of_the_train_step():
    spec, _ = _docs(COMPILED)
    train = spec["root"]["dag"]["tasks"]["train"]["inputs"]["parameters"]
    assert train["grad_accum"] == {"componentInputParameter": "grad_accum"}
    assert spec["root"]["inputDefinitions"]["parameters"]["grad_accum"]["defaultValue"] == 1


def test_the_local_pipeline_from_an_authors_checkpoint_to_a_served_model(tmp_path, capsys, s3_env):
    """An authors' checkpoint in the store goes through the pipeline without training: imported, evaluated,
    readjusted, exported, sampled, scored by FID (weights from the store) and registered; the registered decoder is then served by `python -m
    serving` and answers a request."""
    import socket
    import subprocess
    import sys

    import httpx
    from background_server import wait_ready
    from oip_cases import body

    from common.s3 import s3_client_from_env
    from inference.fid import write_random_weights
    from model.nvlabs import load_nvlabs_file

    bucket = s3_env["make_bucket"]("nvae-imported")
    authors = Path(__file__).resolve().parents[1] / "model" / "nvlabs" / "tiny-mnist.pt"
    s3_client_from_env().upload_file(str(authors), bucket, "nvlabs/tiny-mnist.pt")
    registry = f"s3://{bucket}/models/nvae-nvlabs-mnist"
    # FID on, with Inception weights of pytorch-fid's architecture and random values from the store.
    weights_sha256 = write_random_weights(tmp_path / "inception.pth")
    s3_client_from_env().upload_file(str(tmp_path / "inception.pth"), bucket, "fid/inception.pth")
    settings = {
        "dataset": "mnist", "preset": "mnist", "source": LOCAL_SOURCE, "prepare_limit": "100",
        "import_checkpoint": f"s3://{bucket}/nvlabs/tiny-mnist.pt", "checkpoint_store": "", "iw_samples": "2",
        "eval_limit": "8", "readjust_iters": "2", "num_samples": "4", "registry": registry,
        "fid_samples": "6", "fid_inception": f"s3://{bucket}/fid/inception.pth",
        "fid_inception_sha256": weights_sha256,
    }  # fmt: skip
    argv = ["pipeline", "run", "--local", "--root", str(tmp_path / "runs")]
    for key, value in settings.items():
        argv += ["--set", f"{key}={value}"]
    assert main(argv) == 0, capsys.readouterr().err
    found = find_local_outputs(tmp_path / "runs")
    run = Path(found["run"])
    assert "Not trained in this run" in (run / "train" / "curves").read_text()
    their_step = load_nvlabs_file(authors)["global_step"]  # 2550 in the committed file
    assert _logged_metrics(run / "train", "train_metrics")["global_step"] == their_step
    metrics = json.loads(Path(found["metrics"]).read_text())
    assert metrics["dataset"] == "mnist" and np.isfinite(metrics["nll_bpd"])
    fid = json.loads(Path(found["fid"]).read_text())
    assert np.isfinite(fid["fid"]) and fid["fid_samples"] == 6 and fid["fid_temperature"] == 0.8
    assert fid["fid_bn_readjusted"] and fid["fid_bn_temperature"] == 0.8  # the readjusted checkpoint's
    logged = _logged_metrics(run / "fid", "metrics")
    assert logged["fid"] == fid["fid"] and logged["fid_samples"] == 6 and logged["fid_bn_readjusted"] == 1.0

    pulled = tmp_path / "pulled"
    assert main(["model", "pull", "--registry", registry, "--out", str(pulled)]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "serving", "--onnx", str(pulled / "decoder.onnx"), "--port", str(port)],
        cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_ready(url, server, timeout_s=60), "the server did not come up"
        reply = httpx.post(url + "/v2/models/nvae-decoder/infer", json=body(n=2), timeout=30)
        assert reply.status_code == 200, reply.text
        (images,) = [o for o in reply.json()["outputs"] if o["name"] == "images"]
        assert images["datatype"] == "UINT8" and images["shape"] == [2, 28, 28, 1]
    finally:
        server.terminate()
        server.wait(timeout=20)
