"""Multi-node training from a pipeline step: a Kubeflow Trainer v2 `TrainJob`, created, watched and reported.

The train step calls this when the pipeline's `nodes` is above 1. The TrainJob is the one of `k8s/train/`
(runtime `torch-distributed`, the same pod security and volumes), filled from the pipeline's parameters. Its
nodes cannot see the step's files, so everything goes through the object store, under the run's prefix:

    <run>/data/         the prepared dataset (the step uploads it; every node downloads it)
    <run>/checkpoints/  checkpoints (`nvae train --checkpoint-dir`): a new TrainJob resumes from them
    <run>/out/          node 0's run folder (summary, metrics, curves), uploaded when training ends

The job's name comes from the run id, so a retried step finds the TrainJob of its earlier attempt: it follows
one that is still running or has completed, and replaces one that failed (resuming from its checkpoints).

Kubernetes API calls, all on `trainjobs` in the pod's namespace (k8s/base/rbac grants exactly these):
create, get (polled), delete (a failed job of an earlier attempt, or one past its deadline).

Deadlines. The job carries `activeDeadlineSeconds` (Trainer 2.2 and newer: the controller fails it with
reason DeadlineExceeded and stops its pods), and the step stops following it at the same deadline: it
deletes the job, which frees its GPUs, and fails. A job is deleted in the foreground, and the step waits
until the API server no longer has it before it creates one under the same name: with background deletion
the old JobSet and its pods could still be running beside the new job's.

Trainer versions. `runtimePatches` (the pod security, volumes and labels of k8s/train/) and
`activeDeadlineSeconds` exist from Trainer 2.2. Trainer 2.0 and 2.1 have `podTemplateOverrides` instead,
which can set the labels, tolerations, volumes and mounts but not the security contexts (those then come from
the cluster's `torch-distributed` runtime) and have no deadline field (the step's own deadline still holds);
`trainer_api="2.0"` selects that form.

Why not the Kubeflow SDK's `TrainerClient`: the step needs a job name derived from the run id (a retried pod
must find the job of its earlier attempt), the runtime patch above, and a foreground delete that it can wait
on; `TrainerClient` names the jobs it creates itself and its `delete_job` issues a plain delete and returns at
once. The step therefore talks to the TrainJob API with the Kubernetes client.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Callable
from pathlib import Path

from common.errors import ConfigError

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
RUNTIME = "torch-distributed"
UID = 10001  # the images' user
# The nodes' ServiceAccount (k8s/base/train-identity): no Role, and automountServiceAccountToken false.
TRAIN_SERVICE_ACCOUNT = "nvae-train"
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
STORE_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# The TrainJob API forms: "2.2" (runtimePatches, activeDeadlineSeconds: Trainer 2.2 and newer) and "2.0"
# (podTemplateOverrides: Trainer 2.0 and 2.1).
TRAINER_APIS = ("2.2", "2.0")
# How long a foreground delete may take (the pods' grace periods) before the step fails.
DELETE_TIMEOUT_S = 900.0


class TrainJobFailed(RuntimeError):
    """The TrainJob failed (its reason and message), or could not be created or followed."""


def job_name(run_id: str) -> str:
    """`nvae-train-<run id>`, lower case, a valid Kubernetes name (at most 63 characters)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-") or "run"
    return f"nvae-train-{slug}"[:63].rstrip("-")


def node_script(run: str, train_args: list[str]) -> str:
    """What each node runs: fetch the prepared data, train under torchrun (which reads the PET_* variables
    the torch runtime sets), and on node 0 upload the run folder."""
    train = ["torchrun", "-m", "cli", "train", "--data", "/work/data", "--out", "/work/out"]
    train += ["--checkpoint-dir", f"{run}/checkpoints", *train_args]
    return "\n".join(
        [
            f"nvae store get {shlex.quote(run + '/data/')} --out /work/data",
            " ".join(shlex.quote(a) for a in train),
            'if [ "${PET_NODE_RANK:-0}" = 0 ]; then',
            f"  nvae store put /work/out {shlex.quote(run + '/out/')}",
            "fi",
        ]
    )


def trainjob_body(
    *,
    name: str,
    image: str,
    nodes: int,
    gpus_per_node: int,
    accelerator: str,
    run: str,
    train_args: list[str],
    store_secret: str,
    labels: dict[str, str] | None = None,
    deadline_s: int | None = None,
    trainer_api: str = "2.2",
) -> dict:
    """The TrainJob object (as `k8s/train/trainjob.yaml`, with the store in place of the PVC), in the API form
    of `trainer_api` (TRAINER_APIS), failing after `deadline_s` seconds where that form has a deadline."""
    if trainer_api not in TRAINER_APIS:
        raise ConfigError(f"trainer_api={trainer_api!r}; choose one of: {', '.join(TRAINER_APIS)}")
    gpu = {accelerator: str(gpus_per_node)} if gpus_per_node else {}
    env = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "MPLCONFIGDIR", "value": "/tmp/matplotlib"},
        *(
            {"name": key, "valueFrom": {"secretKeyRef": {"name": store_secret, "key": key}}}
            for key in STORE_ENV
        ),
    ]
    pod = {
        "serviceAccountName": TRAIN_SERVICE_ACCOUNT,  # mounts no token: the nodes never call the API
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "tolerations": [{"key": accelerator, "operator": "Exists", "effect": "NoSchedule"}],
        "containers": [
            {
                "name": "node",
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                },
                "volumeMounts": [
                    {"name": "work", "mountPath": "/work"},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                    {"name": "tmp", "mountPath": "/tmp"},
                ],
            }
        ],
        "volumes": [
            {"name": "work", "emptyDir": {"sizeLimit": "200Gi"}},  # data and node 0's run folder
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
        ],
    }
    spec: dict = {
        "runtimeRef": {"name": RUNTIME},
        "trainer": {
            "image": image,
            "numNodes": nodes,
            "numProcPerNode": max(1, gpus_per_node),
            "command": ["sh", "-ec"],
            "args": [node_script(run, train_args)],
            "env": env,
            "resourcesPerNode": {
                "requests": {"cpu": "8", "memory": "64Gi", **gpu},
                "limits": {"cpu": "32", "memory": "256Gi", **gpu},
            },
        },
    }
    store_label = {"nvae.io/store-client": "true"}
    if trainer_api == "2.2":
        if deadline_s:
            spec["activeDeadlineSeconds"] = int(deadline_s)
        pod_template = {"metadata": {"labels": store_label}, "spec": pod}
        replicated = {"name": "node", "template": {"spec": {"template": pod_template}}}
        template = {"spec": {"replicatedJobs": [replicated]}}
        spec["runtimePatches"] = [{"manager": "nvae-pipeline", "trainingRuntimeSpec": {"template": template}}]
    else:
        container = {"name": "node", "volumeMounts": pod["containers"][0]["volumeMounts"]}
        override = {"serviceAccountName": TRAIN_SERVICE_ACCOUNT, "tolerations": pod["tolerations"],
                    "volumes": pod["volumes"], "containers": [container]}  # fmt: skip
        spec["podTemplateOverrides"] = [
            {"targetJobs": [{"name": "node"}], "metadata": {"labels": store_label}, "spec": override}
        ]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/part-of": "nvae-pipeline", **(labels or {})},
        },
        "spec": spec,
    }


def phase(obj: dict) -> tuple[str, str]:
    """(phase, detail) of a TrainJob: Failed or Succeeded from its conditions (type Failed / Complete with
    status True; detail is the reason and message), Running while a child job is active, else Created."""
    status = obj.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        detail = ": ".join(filter(None, [cond.get("reason"), cond.get("message")]))
        if cond.get("type") == "Failed":
            return "Failed", detail
        if cond.get("type") == "Complete":
            return "Succeeded", detail
    jobs = status.get("jobsStatus") or []
    if any(j.get("active") for j in jobs):
        ready = sum(int(j.get("ready") or 0) for j in jobs)
        return "Running", f"{ready} of {len(jobs)} job(s) ready"
    return "Created", ""


def in_cluster_api():
    """CustomObjectsApi with the pod's service account, and the pod's namespace."""
    from kubernetes import client, config

    config.load_incluster_config()
    return client.CustomObjectsApi(), NAMESPACE_FILE.read_text().strip()


def run_trainjob(
    api,
    namespace: str,
    body: dict,
    poll_s: float = 15.0,
    log: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
    deadline_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    delete_timeout_s: float = DELETE_TIMEOUT_S,
) -> dict:
    """Create the TrainJob (or take over the one of an earlier attempt), print each change of its phase and
    return it when it succeeds; TrainJobFailed with the job's reason when it fails, or when it has not
    finished `deadline_s` seconds after this call (the job is then deleted)."""
    from kubernetes.client.exceptions import ApiException

    name = body["metadata"]["name"]
    where = dict(group=GROUP, version=VERSION, namespace=namespace, plural=PLURAL)
    job = f"TrainJob {namespace}/{name}"
    start = clock()

    def call(what: str, fn, **kwargs):
        try:
            return fn(**where, **kwargs)
        except ApiException as exc:
            if exc.status == 409 and what == "create":
                raise
            raise TrainJobFailed(f"{job}: cannot {what} it: HTTP {exc.status} {exc.reason}") from None

    def delete() -> None:
        """Delete in the foreground and wait until the job (its JobSet and pods first) is gone."""
        call("delete", api.delete_namespaced_custom_object, name=name, propagation_policy="Foreground")
        _wait_gone(api, where, name, poll_s, sleep, clock, delete_timeout_s)

    try:
        call("create", api.create_namespaced_custom_object, body=body)
        log(f"{job} created: {body['spec']['trainer']['numNodes']} nodes")
    except ApiException:  # 409: an earlier attempt of this run created it
        earlier = call("read", api.get_namespaced_custom_object, name=name)
        state, detail = phase(earlier)
        if state != "Failed":
            log(f"{job} exists ({state}): following it")
        else:
            log(f"{job} of an earlier attempt failed ({detail}): replacing it")
            delete()
            call("create", api.create_namespaced_custom_object, body=body)
            log(f"{job} created again; it resumes from the run's checkpoints")
    seen = None
    while True:
        obj = call("read", api.get_namespaced_custom_object, name=name)
        state, detail = phase(obj)
        if (state, detail) != seen:
            log(f"{job}: {state}" + (f" ({detail})" if detail else ""))
            seen = (state, detail)
        if state == "Succeeded":
            return obj
        if state == "Failed":
            raise TrainJobFailed(f"{job} failed: {detail or 'no reason given'}")
        if deadline_s is not None and clock() - start >= deadline_s:
            log(f"{job}: not finished after the deadline of {deadline_s:g} s: deleting it")
            delete()
            raise TrainJobFailed(
                f"{job} did not finish within its deadline of {deadline_s:g} s; it was deleted"
            )
        sleep(poll_s)


def _wait_gone(api, where: dict, name: str, poll_s: float, sleep, clock, timeout_s: float) -> None:
    from kubernetes.client.exceptions import ApiException

    start = clock()
    while True:
        try:
            api.get_namespaced_custom_object(**where, name=name)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        if clock() - start >= timeout_s:
            raise TrainJobFailed(
                f"TrainJob {where['namespace']}/{name} was still being deleted after {timeout_s:g} s"
            )
        sleep(poll_s)
