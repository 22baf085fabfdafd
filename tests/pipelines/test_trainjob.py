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
        if name in self.jobs:
            return self._send(409, {"kind": "Status", "code": 409, "reason": "AlreadyExists"})
        self.jobs[name] = body
        self._send(201, body)

    def do_GET(self):
        name = self._name()
        self.calls.append(("get", name or ""))
        if not name or name not in self.jobs:
            return self._send(404, {"kind": "Status", "code": 404})
        job = dict(self.jobs[name])
        if self.script:
            job["status"] = _status(self.script.pop(0))
            self.jobs[name] = job
        self._send(200, job)

    def do_DELETE(self):
        name = self._name()
        self.calls.append(("delete", name or ""))
        if self.jobs.pop(name, None) is None:
            return self._send(404, {"kind": "Status", "code": 404})
        self._send(200, {"kind": "Status", "status": "Success"})


@pytest.fixture
def api():
    FakeTrainerAPI.jobs, FakeTrainerAPI.script = {}, []
    FakeTrainerAPI.calls, FakeTrainerAPI.problems = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeTrainerAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = client.Configuration()
    config.host = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield client.CustomObjectsApi(client.ApiClient(config))
    finally:
        server.shutdown()


def _body(name="nvae-train-run-1") -> dict:
    return trainjob_body(
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
