"""Multi-node training from the train step: the TrainJob it creates, checked against Kubeflow Trainer's own API
models, and how it follows the job, against a local HTTP server that serves the TrainJob API paths. The
calls recorded there are the ones k8s/base/rbac must allow, and nothing more."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from components.trainjob import (
    TrainJobFailed,
    job_name,
    node_script,
    phase,
    run_trainjob,
    trainjob_body,
)

REPO = Path(__file__).resolve().parents[2]
PATH = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team/trainjobs"


def _status(kind: str) -> dict:
    if kind == "Created":
        return {"conditions": [{"type": "Created", "status": "True", "reason": "JobsCreationSucceeded"}]}
    if kind == "Running":
        return {"jobsStatus": [{"name": "node", "active": 2, "ready": 1, "succeeded": 0, "failed": 0,
                                "suspended": 0}]}  # fmt: skip
    if kind == "Complete":
        return {"conditions": [{"type": "Complete", "status": "True", "reason": "JobsCompleted"}]}
    return {
        "conditions": [
            {"type": "Failed", "status": "True", "reason": "TrainingFailed", "message": "node-1: OOMKilled"}
        ]
    }


class FakeTrainerAPI(BaseHTTPRequestHandler):
    """POST validates the body with kubeflow-trainer-api's models; each GET moves the job one phase on."""

    jobs: dict[str, dict] = {}
    script: list[str] = []  # the statuses successive GETs report
    calls: list[tuple[str, str]] = []  # (verb, name or "") as RBAC sees them
    problems: list[str] = []
    deletes: list[str] = []  # each DELETE's propagationPolicy ("" when none was given)
    # A foreground delete keeps the object (deletionTimestamp set, finalizer foregroundDeletion) until its
    # dependents are gone: here, for this many GETs. Meanwhile a create of the same name is refused (409).
    delete_gets = 0
    deleting: dict[str, int] = {}

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _name(self) -> str | None:
        if not self.path.startswith(PATH):
            return None
        return self.path[len(PATH) :].strip("/").split("?")[0]

    def do_POST(self):
        from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.calls.append(("create", ""))
        if self._name() != "":
            return self._send(404, {"kind": "Status", "code": 404})
        model = TrainerV1alpha1TrainJob.from_dict(body)
        if model.to_dict() != body:
            self.problems.append("fields dropped by the TrainJob model")
        name = body["metadata"]["name"]
        if name in self.jobs or name in self.deleting:
            return self._send(409, {"kind": "Status", "code": 409, "reason": "AlreadyExists"})
        self.jobs[name] = body
        self._send(201, body)

    def do_GET(self):
        name = self._name()
        self.calls.append(("get", name or ""))
        if name in self.deleting:
            left = self.deleting.pop(name)
            if left > 0:
                self.deleting[name] = left - 1
                gone = {"metadata": {"name": name, "deletionTimestamp": "2026-12-01T00:00:00Z",
                                     "finalizers": ["foregroundDeletion"]}}  # fmt: skip
                return self._send(200, gone)
        if not name or name not in self.jobs:
            return self._send(404, {"kind": "Status", "code": 404})
        job = dict(self.jobs[name])
        if self.script:
            job["status"] = _status(self.script.pop(0))
            self.jobs[name] = job
        self._send(200, job)

    def do_DELETE(self):
        from urllib.parse import parse_qs, urlsplit

        name = self._name()
        self.calls.append(("delete", name or ""))
        length = int(self.headers.get("Content-Length") or 0)
        options = json.loads(self.rfile.read(length) or b"{}") if length else {}
        query = parse_qs(urlsplit(self.path).query)
        policy = options.get("propagationPolicy") or (query.get("propagationPolicy") or [""])[0]
        self.deletes.append(policy)
        if self.jobs.pop(name, None) is None:
            return self._send(404, {"kind": "Status", "code": 404})
        if policy == "Foreground" and self.delete_gets:
            self.deleting[name] = self.delete_gets
        self._send(200, {"kind": "Status", "status": "Success"})


@pytest.fixture
def api():
    FakeTrainerAPI.jobs, FakeTrainerAPI.script = {}, []
    FakeTrainerAPI.calls, FakeTrainerAPI.problems = [], []
    FakeTrainerAPI.deletes, FakeTrainerAPI.deleting, FakeTrainerAPI.delete_gets = [], {}, 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeTrainerAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = client.Configuration()
    config.host = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield client.CustomObjectsApi(client.ApiClient(config))
    finally:
        server.shutdown()


def _body(name="nvae-train-run-1", **kwargs) -> dict:
    return trainjob_body(
        **kwargs,
        name=name,
        image="ghcr.io/nvae-pipeline/nvae-gpu:0.1.0",
        nodes=2,
        gpus_per_node=4,
        accelerator="nvidia.com/gpu",
        run="s3://nvae/runs/run-1",
        train_args=["--preset", "cifar10", "--steps", "100", "--precision", "fp16"],
        store_secret="nvae-s3-pipeline",
    )


def test_the_trainjob_follows_the_manifest_in_k8s_train():
    """The step's TrainJob is k8s/train/trainjob.yaml filled from parameters: same runtime, same pod security,
    tolerations and /dev/shm; the store replaces the PVC."""
    manifest = yaml.safe_load((REPO / "k8s/train/trainjob.yaml").read_text())
    body = _body()
    assert body["apiVersion"] == manifest["apiVersion"] and body["kind"] == "TrainJob"
    assert body["spec"]["runtimeRef"] == manifest["spec"]["runtimeRef"]
    pod = lambda doc: doc["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"][  # noqa: E731
        "replicatedJobs"
    ][0]["template"]["spec"]["template"]["spec"]
    ours, theirs = pod(body), pod(manifest)
    assert ours["securityContext"] == theirs["securityContext"]
    assert ours["tolerations"] == theirs["tolerations"]
    assert ours["containers"][0]["securityContext"] == theirs["containers"][0]["securityContext"]
    volumes = {v["name"]: v for v in ours["volumes"]}
    assert volumes["dshm"] == {v["name"]: v for v in theirs["volumes"]}["dshm"]
    assert "persistentVolumeClaim" not in json.dumps(ours)
    trainer = body["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 4)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"
    secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in trainer["env"] if "valueFrom" in e}
    assert set(secret_env) == {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert {ref["name"] for ref in secret_env.values()} == {"nvae-s3-pipeline"}


def test_each_node_fetches_the_data_trains_under_torchrun_and_node_0_uploads_the_run():
    script = node_script("s3://nvae/runs/r1", ["--preset", "cifar10", "--steps", "10"])
    lines = script.splitlines()
    assert lines[0] == "nvae store get s3://nvae/runs/r1/data/ --out /work/data"
    assert lines[1].startswith("torchrun -m cli train --data /work/data --out /work/out")
    assert "--checkpoint-dir s3://nvae/runs/r1/checkpoints --preset cifar10 --steps 10" in lines[1]
    assert (
        'if [ "${PET_NODE_RANK:-0}" = 0 ]' in script
        and "nvae store put /work/out s3://nvae/runs/r1/out/" in script
    )


def test_job_names_are_valid_kubernetes_names():
    assert (
        job_name("3f2a7C1e-0b5d-4c1e-9a8b-1234567890ab") == "nvae-train-3f2a7c1e-0b5d-4c1e-9a8b-1234567890ab"
    )
    assert job_name("x" * 100) == "nvae-train-" + "x" * 52
    assert job_name("run/with spaces") == "nvae-train-run-with-spaces"


def test_the_step_creates_the_trainjob_and_reports_running_then_succeeded(api):
    FakeTrainerAPI.script = ["Created", "Running", "Running", "Complete"]
    lines: list[str] = []
    obj = run_trainjob(api, "team", _body(), poll_s=0, log=lines.append, sleep=lambda s: None)
    assert phase(obj)[0] == "Succeeded"
    assert FakeTrainerAPI.problems == []
    assert lines == [
        "TrainJob team/nvae-train-run-1 created: 2 nodes",
        "TrainJob team/nvae-train-run-1: Created",
        "TrainJob team/nvae-train-run-1: Running (1 of 1 job(s) ready)",
        "TrainJob team/nvae-train-run-1: Succeeded (JobsCompleted)",
    ]


def test_a_failed_trainjob_fails_the_step_with_its_reason(api):
    FakeTrainerAPI.script = ["Created", "Running", "Failed"]
    with pytest.raises(
        TrainJobFailed, match="team/nvae-train-run-1 failed: TrainingFailed: node-1: OOMKilled"
    ):
        run_trainjob(api, "team", _body(), poll_s=0, log=lambda s: None, sleep=lambda s: None)


def test_a_retried_step_follows_the_running_job_and_replaces_a_failed_one(api):
    FakeTrainerAPI.jobs["nvae-train-run-1"] = {**_body(), "status": _status("Running")}
    FakeTrainerAPI.script = ["Running", "Complete"]
    lines: list[str] = []
    run_trainjob(api, "team", _body(), poll_s=0, log=lines.append, sleep=lambda s: None)
    assert lines[0] == "TrainJob team/nvae-train-run-1 exists (Running): following it"
    assert ("delete", "nvae-train-run-1") not in FakeTrainerAPI.calls

    FakeTrainerAPI.jobs["nvae-train-run-1"] = {**_body(), "status": _status("Failed")}
    FakeTrainerAPI.script = ["Failed", "Created", "Complete"]  # the earlier job; then the new one
    lines = []
    run_trainjob(api, "team", _body(), poll_s=0, log=lines.append, sleep=lambda s: None)
    assert "failed (TrainingFailed: node-1: OOMKilled): replacing it" in lines[0]
    assert ("delete", "nvae-train-run-1") in FakeTrainerAPI.calls
    assert lines[-1].endswith("Succeeded (JobsCompleted)")


class FakeClock:
    """Time that passes only when the step sleeps."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_failed_job_is_deleted_in_the_foreground_and_recreated_only_once_it_is_gone(api):
    FakeTrainerAPI.jobs["nvae-train-run-1"] = {**_body(), "status": _status("Failed")}
    FakeTrainerAPI.script = ["Failed", "Created", "Complete"]
    FakeTrainerAPI.delete_gets = 3  # the JobSet and its pods take three polls to go
    clock = FakeClock()
    run_trainjob(api, "team", _body(), poll_s=5, log=lambda s: None, sleep=clock.sleep, clock=clock)
    assert FakeTrainerAPI.deletes == ["Foreground"]
    calls = FakeTrainerAPI.calls
    deleted, created = calls.index(("delete", "nvae-train-run-1")), calls.index(("create", ""), 1)
    assert calls[deleted + 1 : created] == [("get", "nvae-train-run-1")] * 4  # 3 while deleting, then 404
    assert FakeTrainerAPI.deleting == {} and "nvae-train-run-1" in FakeTrainerAPI.jobs


def test_a_delete_that_never_completes_fails_the_step_instead_of_racing_the_old_job(api):
    FakeTrainerAPI.jobs["nvae-train-run-1"] = {**_body(), "status": _status("Failed")}
    FakeTrainerAPI.script = ["Failed"]
    FakeTrainerAPI.delete_gets = 10**6
    clock = FakeClock()
    with pytest.raises(TrainJobFailed, match="still being deleted after 60 s"):
        run_trainjob(
            api, "team", _body(), poll_s=5, log=lambda s: None, sleep=clock.sleep, clock=clock,
            delete_timeout_s=60,
        )  # fmt: skip
    assert [c for c in FakeTrainerAPI.calls if c[0] == "create"] == [("create", "")]  # never created again


def test_a_job_that_never_finishes_is_deleted_at_the_deadline_and_fails_the_step(api):
    FakeTrainerAPI.script = ["Created"] + ["Running"] * 10**4
    clock = FakeClock()
    lines: list[str] = []
    with pytest.raises(TrainJobFailed, match="did not finish within its deadline of 3600 s; it was deleted"):
        run_trainjob(
            api, "team", _body(deadline_s=3600), poll_s=60, log=lines.append, sleep=clock.sleep,
            clock=clock, deadline_s=3600,
        )  # fmt: skip
    assert 3600 <= clock.now < 3600 + 2 * 60
    assert FakeTrainerAPI.deletes == ["Foreground"] and "nvae-train-run-1" not in FakeTrainerAPI.jobs
    assert "deadline of 3600 s: deleting it" in lines[-1]
    assert FakeTrainerAPI.problems == []  # the body with its deadline passes Trainer's TrainJob model


def test_the_job_carries_its_deadline_in_the_trainer_2_2_form():
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    body = _body(deadline_s=7200)
    assert body["spec"]["activeDeadlineSeconds"] == 7200
    assert TrainerV1alpha1TrainJob.from_dict(body).to_dict() == body
    assert "activeDeadlineSeconds" not in _body()["spec"]


# The fields of Trainer 2.0/2.1's podTemplateOverrides (kubeflow-trainer-api 2.1.0's models
# TrainerV1alpha1PodTemplateOverride, ...SpecOverride, ...ContainerOverride); 2.2 replaced them with
# runtimePatches and added activeDeadlineSeconds.
_OVERRIDE_FIELDS = {"metadata", "spec", "targetJobs"}
_OVERRIDE_SPEC_FIELDS = {"affinity", "containers", "imagePullSecrets", "initContainers", "nodeSelector",
                         "schedulingGates", "serviceAccountName", "tolerations", "volumes"}  # fmt: skip
_CONTAINER_OVERRIDE_FIELDS = {"env", "name", "volumeMounts"}
_SPEC_FIELDS_2_1 = {"annotations", "initializer", "labels", "managedBy", "podTemplateOverrides", "runtimeRef",
                    "suspend", "trainer"}  # fmt: skip


# The fields of Trainer 2.2's runtimePatches pod patch (trainjob_types.go: PodSpecPatch, ContainerPatch); it has
# no automountServiceAccountToken, so the nodes' account carries that (k8s/base/train-identity).
_PATCH_SPEC_FIELDS = {"affinity", "containers", "imagePullSecrets", "initContainers", "nodeSelector",
                      "schedulingGates", "securityContext", "serviceAccountName", "tolerations", "volumes"}  # fmt: skip
_CONTAINER_PATCH_FIELDS = {"env", "name", "securityContext", "volumeMounts"}


def test_the_trainer_2_2_form_patches_only_fields_runtime_patches_has_and_the_nodes_mount_no_token():
    manifest = yaml.safe_load((REPO / "k8s/train/trainjob.yaml").read_text())
    identity = yaml.safe_load((REPO / "k8s/base/train-identity/serviceaccount.yaml").read_text())
    assert identity["kind"] == "ServiceAccount" and identity["automountServiceAccountToken"] is False
    for doc in (_body(), manifest):
        (patch,) = doc["spec"]["runtimePatches"]
        (replicated,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
        pod = replicated["template"]["spec"]["template"]["spec"]
        assert set(pod) <= _PATCH_SPEC_FIELDS, set(pod) - _PATCH_SPEC_FIELDS
        assert all(set(c) <= _CONTAINER_PATCH_FIELDS for c in pod["containers"])
        assert pod["serviceAccountName"] == identity["metadata"]["name"]
    override = _body(trainer_api="2.0")["spec"]["podTemplateOverrides"][0]["spec"]
    assert override["serviceAccountName"] == identity["metadata"]["name"]


def test_the_trainer_2_0_form_uses_pod_template_overrides_with_only_their_fields():
    body = _body(trainer_api="2.0", deadline_s=7200)
    spec = body["spec"]
    assert set(spec) <= _SPEC_FIELDS_2_1 and "runtimePatches" not in spec
    (override,) = spec["podTemplateOverrides"]
    assert set(override) <= _OVERRIDE_FIELDS and override["targetJobs"] == [{"name": "node"}]
    assert set(override["spec"]) <= _OVERRIDE_SPEC_FIELDS
    for container in override["spec"]["containers"]:
        assert set(container) <= _CONTAINER_OVERRIDE_FIELDS
    assert override["metadata"]["labels"] == {"nvae.io/store-client": "true"}  # the store's NetworkPolicy
    assert {v["name"] for v in override["spec"]["volumes"]} == {"work", "dshm", "tmp"}
    assert spec["trainer"] == _body()["spec"]["trainer"]
    with pytest.raises(ValueError, match="trainer_api='2.1'"):
        _body(trainer_api="2.1")


def test_api_errors_name_the_job_and_the_status(api):
    # The fake server serves one namespace; elsewhere it answers 404, as a cluster without Trainer would.
    with pytest.raises(TrainJobFailed, match=r"^TrainJob elsewhere/nvae-train-x: cannot create it: HTTP 404"):
        run_trainjob(
            api, "elsewhere", _body("nvae-train-x"), poll_s=0, log=lambda s: None, sleep=lambda s: None
        )


def _role_rules() -> list[dict]:
    docs = list(yaml.safe_load_all((REPO / "k8s/base/rbac/pipeline-runner.yaml").read_text()))
    (role,) = [d for d in docs if d["kind"] == "Role"]
    return role["rules"]


def test_the_role_allows_exactly_the_trainjob_calls_the_step_makes(api):
    """Every call the launcher made in these scenarios is allowed by the Role, and the Role's TrainJob rule
    grants no verb the code does not use."""
    FakeTrainerAPI.jobs["nvae-train-run-1"] = {**_body(), "status": _status("Failed")}
    FakeTrainerAPI.script = ["Failed", "Created", "Complete"]
    run_trainjob(api, "team", _body(), poll_s=0, log=lambda s: None, sleep=lambda s: None)
    used = {verb for verb, _ in FakeTrainerAPI.calls}
    (rule,) = [r for r in _role_rules() if "trainer.kubeflow.org" in r["apiGroups"]]
    assert rule["resources"] == ["trainjobs"]
    assert set(rule["verbs"]) == used == {"create", "get", "delete"}
