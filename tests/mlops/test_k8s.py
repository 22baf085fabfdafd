"""k8s/: every kustomization builds; core objects validate against the Kubernetes schema; custom resources load
into their own projects' API models with no field dropped; images agree with k8s/images.yaml; security
settings (non-root, read-only root filesystem, requests and limits) hold for every container."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from components import images as images_mod

from .conftest import REPO, run, tool

K8S = REPO / "k8s"
KUSTOMIZATIONS = [
    "base",
    "overlays/cpu-dev",
    "overlays/gpu",
    "overlays/kserve",
    "overlays/kserve-grpc",
    "overlays/kserve-triton",
    "train",
]
K8S_VERSION = "1.33.0"  # schema version the manifests target (kubernetes-validate bundles it)
IMAGES = yaml.safe_load((K8S / "images.yaml").read_text())
PROJECT_REPO = images_mod.DEFAULT_REGISTRY + "/"


def _build(path: str) -> list[dict]:
    out = run([tool("kubectl"), "kustomize", str(K8S / path)], cwd=REPO).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict]]:
    return {path: _build(path) for path in KUSTOMIZATIONS}


def _pod_specs(doc: dict) -> list[dict]:
    """Pod specs inside a workload object (Deployment, StatefulSet, Job, InferenceService predictor, TrainJob)."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "DaemonSet"):
        return [spec["template"]["spec"]]
    if kind == "Job":
        return [spec["template"]["spec"]]
    if kind == "InferenceService":
        return [spec["predictor"]]
    if kind == "TrainJob":
        return [
            rj["template"]["spec"]["template"]["spec"]
            for patch in spec.get("runtimePatches", [])
            for rj in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
        ]
    return []


def _containers(doc: dict) -> list[dict]:
    return [c for ps in _pod_specs(doc) for c in ps.get("initContainers", []) + ps.get("containers", [])]


def _images(doc: dict) -> list[str]:
    images = [c["image"] for c in _containers(doc) if "image" in c]
    if doc["kind"] == "TrainJob":
        images.append(doc["spec"]["trainer"]["image"])
    return images


# --- building and schema -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_kustomization_builds_and_every_object_is_namespaced_to_nvae(built, path):
    docs = built[path]
    assert docs, f"{path} builds to nothing"
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "nvae", (
                f"{path}: {doc['kind']}/{doc['metadata']['name']}"
            )


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_core_objects_validate_against_the_kubernetes_schema(built, path):
    import kubernetes_validate

    for doc in built[path]:
        if doc["kind"] in ("TrainJob", "InferenceService"):
            continue  # custom resources: validated through their own API models below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


S3_SECRETS = {"nvae-s3-credentials", "nvae-s3-sampler", "nvae-s3-pipeline"}  # root, read-only, read-write


def test_secret_template_validates_and_holds_no_credentials():
    import kubernetes_validate

    docs = list(yaml.safe_load_all((K8S / "base/store/secret.template.yaml").read_text()))
    assert {doc["metadata"]["name"] for doc in docs} == S3_SECRETS
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert doc["stringData"]["AWS_ACCESS_KEY_ID"] == "REPLACE_ME"
        assert doc["stringData"]["AWS_SECRET_ACCESS_KEY"] == "REPLACE_ME"
        assert doc["stringData"]["AWS_ENDPOINT_URL"].startswith("http://minio.nvae.svc")
        assert "data" not in doc
    # ... and no kustomization applies them (kubectl apply -k must never overwrite the real Secrets).
    for path in KUSTOMIZATIONS:
        kinds = {(d["kind"], d["metadata"]["name"]) for d in _build(path)}
        assert not {("Secret", name) for name in S3_SECRETS} & kinds


def test_only_known_custom_resources_appear(built):
    core_groups = ("", "apps", "batch", "autoscaling", "networking.k8s.io", "rbac.authorization.k8s.io")
    for path, docs in built.items():
        for doc in docs:
            group = doc["apiVersion"].rpartition("/")[0]
            if group not in core_groups:
                assert (doc["apiVersion"], doc["kind"]) in {
                    ("trainer.kubeflow.org/v1alpha1", "TrainJob"),
                    ("serving.kserve.io/v1beta1", "InferenceService"),
                }, f"{path}: unvalidated custom resource {doc['apiVersion']} {doc['kind']}"


def test_trainjob_loads_into_the_kubeflow_trainer_models_without_dropping_fields(built):
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    (job,) = [d for d in built["train"] if d["kind"] == "TrainJob"]
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    model = TrainerV1alpha1TrainJob.from_dict(job)
    # from_dict ignores unknown keys silently: a lossless round trip proves every field is known to the API.
    assert model.to_dict() == job
    trainer = model.spec.trainer
    assert trainer.num_nodes >= 2 and trainer.num_proc_per_node >= 2, "multi-node, multi-GPU"
    assert trainer.command == ["torchrun"] and trainer.args[:3] == ["-m", "cli", "train"]
    assert job["spec"]["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == str(
        trainer.num_proc_per_node
    )
    # The authors' run of the recipe: their GPU count (x accumulation) and fp16.
    from model.config import get_preset

    args = trainer.args
    recipe = get_preset(args[args.index("--preset") + 1])
    accum = int(args[args.index("--grad-accum") + 1]) if "--grad-accum" in args else 1
    assert trainer.num_nodes * trainer.num_proc_per_node * accum == recipe.recipe_processes
    assert args[args.index("--precision") + 1] == "fp16"


def _strict_kserve_load(value, type_name: str, where: str):
    """Deserialize like the OpenAPI client does, but fail on any key the model (kserve or kubernetes) lacks."""
    import kserve.models
    import kubernetes.client.models

    if value is None:
        return None
    if m := re.fullmatch(r"list\[(.+)\]", type_name):
        return [_strict_kserve_load(v, m[1], f"{where}[{i}]") for i, v in enumerate(value)]
    if m := re.fullmatch(r"dict\((\w+), (.+)\)", type_name):
        return {k: _strict_kserve_load(v, m[2], f"{where}.{k}") for k, v in value.items()}
    if type_name in ("str", "int", "float", "bool", "object", "datetime"):
        return value
    cls = getattr(kserve.models, type_name, None) or getattr(kubernetes.client.models, type_name)
    by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    unknown = set(value) - set(by_json)
    assert not unknown, f"{where}: fields unknown to {type_name}: {sorted(unknown)}"
    kwargs = {
        by_json[k]: _strict_kserve_load(v, cls.openapi_types[by_json[k]], f"{where}.{k}")
        for k, v in value.items()
    }
    return cls(**kwargs)


def test_inferenceservice_loads_into_the_kserve_sdk_models_without_unknown_fields(built):
    import kserve

    (isvc,) = [d for d in built["overlays/kserve"] if d["kind"] == "InferenceService"]
    assert isvc["apiVersion"] == f"{kserve.constants.KSERVE_GROUP}/v1beta1"
    model = _strict_kserve_load(isvc, "V1beta1InferenceService", "InferenceService")
    assert isinstance(model, kserve.V1beta1InferenceService)
    (container,) = model.spec.predictor.containers
    assert container.readiness_probe.http_get.path == "/v2/health/ready"
    assert container.liveness_probe.http_get.path == "/v2/health/live"


def test_strict_kserve_loader_rejects_an_unknown_field(built):
    (isvc,) = [d for d in built["overlays/kserve"] if d["kind"] == "InferenceService"]
    bad = yaml.safe_load(yaml.safe_dump(isvc))
    bad["spec"]["predictor"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(AssertionError, match="imagePullPolicyy"):
        _strict_kserve_load(bad, "V1beta1InferenceService", "InferenceService")


# --- security and resources ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_container_is_non_root_read_only_and_bounded(built, path):
    for doc in built[path]:
        where = f"{path}: {doc['kind']}/{doc['metadata']['name']}"
        for pod in _pod_specs(doc):
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            assert pod["securityContext"]["runAsUser"] != 0, where
        for c in _containers(doc):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, f"{where} {c['name']}"
            assert sc["readOnlyRootFilesystem"] is True, f"{where} {c['name']}"
            assert sc["capabilities"]["drop"] == ["ALL"], f"{where} {c['name']}"
            if doc["kind"] == "TrainJob":
                continue  # resources come from spec.trainer.resourcesPerNode
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][bound]), f"{where} {c['name']} {bound}"
        if doc["kind"] == "TrainJob":
            res = doc["spec"]["trainer"]["resourcesPerNode"]
            assert {"cpu", "memory", "nvidia.com/gpu"} <= set(res["requests"]) & set(res["limits"]), where


def test_sampler_probes_hit_the_serving_health_endpoints(built):
    for path in ("overlays/cpu-dev", "overlays/gpu"):
        (dep,) = [
            d for d in built[path] if d["kind"] == "Deployment" and d["metadata"]["name"] == "nvae-sampler"
        ]
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        assert c["command"] == ["python", "-m", "serving"]  # the slim image's sampler, no `nvae` CLI there
        assert c["args"][:2] == ["--onnx", "/models/decoder.onnx"] and "8080" in c["args"]
        (fetch,) = dep["spec"]["template"]["spec"]["initContainers"]
        assert fetch["command"] == ["nvae", "model", "pull", "--registry", "$(MODEL_REGISTRY)", "--version",
                                    "$(MODEL_VERSION)", "--out", "/models"]  # fmt: skip
        assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        kinds = {d["kind"] for d in built[path]}
        assert {
            "Service",
            "HorizontalPodAutoscaler",
            "NetworkPolicy",
            "StatefulSet",
            "Job",
            "RoleBinding",
        } <= kinds


@pytest.mark.parametrize(
    "path", ["overlays/cpu-dev", "overlays/gpu", "overlays/kserve", "overlays/kserve-grpc"]
)
def test_every_overlay_turns_sampler_authentication_on(built, path):
    from serving.__main__ import TOKEN_ENV

    (server,) = [
        c
        for d in built[path]
        if d["kind"] in ("Deployment", "InferenceService") and "sampler" in d["metadata"]["name"]
        for c in _containers(d)
        if "serving" in c.get("command", [])
    ]
    (token,) = [e for e in server["env"] if e["name"] == TOKEN_ENV]
    assert token["valueFrom"]["secretKeyRef"] == {"name": "nvae-sampler-token", "key": "token"}
    assert not token["valueFrom"]["secretKeyRef"].get("optional")  # no token, no start: never open by mistake
    assert all(d["kind"] != "Secret" or d["metadata"]["name"] != "nvae-sampler-token" for d in built[path])


def test_kserve_overlay_runs_kserves_model_server_on_the_model_kserve_fetches(built):
    (isvc,) = [d for d in built["overlays/kserve"] if d["kind"] == "InferenceService"]
    predictor = isvc["spec"]["predictor"]
    assert "initContainers" not in predictor  # KServe's storage initializer replaces our fetch step
    (c,) = predictor["containers"]
    assert c["image"] == IMAGES["serve-cpu"] and c["command"] == ["python", "-m", "serving"]
    args = c["args"]
    assert args[args.index("--server") + 1] == "kserve"
    storage = {e["name"]: e.get("value") for e in c["env"]}["STORAGE_URI"]
    onnx = args[args.index("--onnx") + 1]
    assert onnx == "/mnt/models/decoder.onnx"  # the version folder's decoder, where the initializer puts it
    (config,) = [
        d
        for d in built["overlays/kserve"]
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "nvae-sampler"
    ]
    registry, _, version = storage.rstrip("/").rpartition("/")
    assert registry == config["data"]["MODEL_REGISTRY"], "the Deployment and KServe read the same registry"
    assert len(version) == 16 and storage.endswith("/"), (
        "a pinned version folder (KServe cannot read `latest`)"
    )
    (sa,) = [
        d
        for d in built["overlays/kserve"]
        if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == predictor["serviceAccountName"]
    ]
    assert [s["name"] for s in sa["secrets"]] == ["nvae-s3-sampler"]
    assert (
        sa["metadata"]["annotations"]["serving.kserve.io/s3-endpoint"] == "minio.nvae.svc.cluster.local:9000"
    )


def test_kserve_grpc_overlay_routes_the_predictor_port_to_the_grpc_server(built):
    """KServe routes one port per predictor container; `h2c` makes it gRPC. It must be the port the server's
    gRPC listens on, and the probes (Knative allows only the serving port) must check that port."""
    (isvc,) = [d for d in built["overlays/kserve-grpc"] if d["kind"] == "InferenceService"]
    (c,) = isvc["spec"]["predictor"]["containers"]
    (port,) = c["ports"]
    assert port["name"] == "h2c"
    assert int(c["args"][c["args"].index("--grpc-port") + 1]) == port["containerPort"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe] == {"tcpSocket": {"port": port["containerPort"]}}, probe
    assert _strict_kserve_load(isvc, "V1beta1InferenceService", "InferenceService") is not None
    (rest,) = [d for d in built["overlays/kserve"] if d["kind"] == "InferenceService"]
    assert {k: v for k, v in c.items() if k not in ("args", "ports", "readinessProbe", "livenessProbe")} == {
        k: v
        for k, v in rest["spec"]["predictor"]["containers"][0].items()
        if k not in ("args", "ports", "readinessProbe", "livenessProbe")
    }


def test_gpu_overlay_gives_the_sampler_a_gpu_and_cpu_dev_does_not(built):
    def sampler(path):
        (dep,) = [d for d in built[path] if d["kind"] == "Deployment"]
        return dep["spec"]["template"]["spec"]["containers"][0]

    assert sampler("overlays/gpu")["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in sampler("overlays/cpu-dev")["resources"]["limits"]


@pytest.mark.parametrize("path", ["overlays/cpu-dev", "overlays/gpu", "overlays/kserve"])
def test_network_policy_admits_only_labelled_clients_on_the_serving_port(built, path):
    (pol,) = [d for d in built[path] if d["kind"] == "NetworkPolicy" and "sampler" in d["metadata"]["name"]]
    assert pol["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = pol["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8080}]
    for peer in rule["from"]:  # this namespace, or named namespaces; always with the client label
        assert peer["podSelector"]["matchLabels"] == {"nvae.io/sampler-client": "true"}
        _assert_named_namespaces_only(peer)
    # The policy must select the pods that actually serve.
    selected = pol["spec"]["podSelector"]["matchLabels"]
    if path == "overlays/kserve":
        (isvc,) = [d for d in built[path] if d["kind"] == "InferenceService"]
        assert selected == {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"]}
    else:
        (dep,) = [d for d in built[path] if d["kind"] == "Deployment"]
        assert selected.items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def _assert_named_namespaces_only(peer: dict) -> None:
    """A peer outside this namespace is selected by namespace *name* (set by the API server), never by a
    label a tenant can put on their own namespace, and never by an empty selector (every namespace)."""
    if "namespaceSelector" not in peer:
        return
    sel = peer["namespaceSelector"]
    assert sel, "an empty namespaceSelector admits every namespace"
    assert "matchLabels" not in sel
    (expr,) = sel["matchExpressions"]
    assert expr["key"] == "kubernetes.io/metadata.name" and expr["operator"] == "In" and expr["values"]


@pytest.mark.parametrize("path", KUSTOMIZATIONS[:4])
def test_the_namespace_denies_by_default_and_opens_only_what_each_workload_needs(built, path):
    policies = {d["metadata"]["name"]: d["spec"] for d in built[path] if d["kind"] == "NetworkPolicy"}
    deny = policies["default-deny"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    (dns,) = policies["allow-dns"]["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    (to_store,) = policies["store-clients-egress"]["egress"]
    assert to_store["ports"] == [{"protocol": "TCP", "port": 9000}]
    (store_rule,) = policies["minio-clients-only"]["ingress"]
    for peer in store_rule["from"]:
        assert peer["podSelector"]["matchLabels"] == {"nvae.io/store-client": "true"}
        _assert_named_namespaces_only(peer)
    # Every workload that talks to the store carries the label its egress and the store's ingress select.
    for doc in built[path]:
        if doc["kind"] in ("Deployment", "Job", "StatefulSet"):
            labels = doc["spec"]["template"]["metadata"]["labels"]
            talks_to_store = any(_s3_secret_refs(c) for c in _containers(doc))
            if talks_to_store and labels.get("app.kubernetes.io/name") != "minio":
                assert labels.get("nvae.io/store-client") == "true", doc["metadata"]["name"]
        if doc["kind"] == "InferenceService":  # KServe copies the service's labels onto its pods
            assert doc["metadata"]["labels"].get("nvae.io/store-client") == "true"


def test_rbac_binds_the_pipeline_runner_to_its_role(built):
    docs = {(d["kind"], d["metadata"]["name"]): d for d in built["base"]}
    binding = docs[("RoleBinding", "nvae-pipeline-runner")]
    assert binding["roleRef"]["name"] == "nvae-pipeline-runner"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "nvae-pipeline-runner", "namespace": "nvae"}
    ]
    rules = docs[("Role", "nvae-pipeline-runner")]["rules"]
    assert not any("*" in r["verbs"] or "*" in r["resources"] for r in rules), "least privilege: no wildcards"
    # Each rule and its caller: the train step's TrainJob calls (tested against a fake API in
    # tests/pipelines/test_trainjob.py), KFP's launcher (its ConfigMap and artifact-store Secret, by name),
    # Argo's executor (task results). Nothing else: the store's keys reach pods as secretKeyRef variables.
    granted = {
        (group, resource, name, verb)
        for r in rules
        for group in r["apiGroups"]
        for resource in r["resources"]
        for name in r.get("resourceNames", ["*any*"])
        for verb in r["verbs"]
    }
    assert granted == {
        ("trainer.kubeflow.org", "trainjobs", "*any*", "create"),
        ("trainer.kubeflow.org", "trainjobs", "*any*", "get"),
        ("trainer.kubeflow.org", "trainjobs", "*any*", "delete"),
        ("", "configmaps", "kfp-launcher", "get"),
        ("", "secrets", "mlpipeline-minio-artifact", "get"),
        ("argoproj.io", "workflowtaskresults", "*any*", "create"),
        ("argoproj.io", "workflowtaskresults", "*any*", "patch"),
    }


def _secret_refs(container: dict, pod: dict | None = None) -> set[str]:
    """The Secrets a container reads: through its environment, and (given its pod) the Secret volumes it
    mounts."""
    refs = {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
    refs |= {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", []) if "valueFrom" in e}
    if pod is not None:
        mounted = {m["name"] for m in container.get("volumeMounts", [])}
        refs |= {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v and v["name"] in mounted}
    return refs


def _s3_secret_refs(container: dict, pod: dict | None = None) -> set[str]:
    return {name for name in _secret_refs(container, pod) if name.startswith("nvae-s3-")}


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_only_minio_and_the_bucket_job_hold_the_root_keys(built, path):
    """Each workload reads its own scoped Secret: the sampler the read-only one, the pipeline the read-write
    one; the root Secret only reaches MinIO and the bucket Job, which creates the two users."""
    for doc in built[path]:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        refs = {
            r
            for pod in _pod_specs(doc)
            for c in pod.get("initContainers", []) + pod.get("containers", [])
            for r in _s3_secret_refs(c, pod)
        }
        assert refs <= S3_SECRETS, f"{path}: {name} reads {refs}"
        if name == "StatefulSet/minio":
            assert refs == {"nvae-s3-credentials"}
        elif name == "Job/nvae-create-bucket":
            assert refs == S3_SECRETS
        elif name == "InferenceService/nvae-sampler":  # KServe's storage initializer, via the ServiceAccount
            assert not refs, f"{path}: {name}"
            account = doc["spec"]["predictor"]["serviceAccountName"]
            (sa,) = [
                d for d in built[path] if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == account
            ]
            assert [s["name"] for s in sa["secrets"]] == ["nvae-s3-sampler"]
        elif "sampler" in name and _containers(doc):  # the Deployment's init container
            assert refs == {"nvae-s3-sampler"}, f"{path}: {name}"
        else:
            assert "nvae-s3-credentials" not in refs, f"{path}: {name} must not hold the root keys"
    pipeline = (REPO / "pipelines/nvae_pipeline.py").read_text()
    assert 'S3_SECRET = "nvae-s3-pipeline"' in pipeline


def test_minio_reads_its_root_keys_from_files_of_the_mounted_secret(built):
    """MINIO_ROOT_USER_FILE and MINIO_ROOT_PASSWORD_FILE name files of the mounted root Secret: a wrong path
    would start MinIO on its default keys (it ignores a missing file)."""
    (minio,) = [d for d in built["base"] if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "minio"]
    pod = minio["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert not {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"} & set(env)
    volumes = {v["name"]: v for v in pod["volumes"]}
    files = {}
    for mount in container["volumeMounts"]:
        secret = volumes.get(mount["name"], {}).get("secret")  # data: the volume claim template
        if secret:
            assert mount.get("readOnly") is True
            files |= {f"{mount['mountPath']}/{i['path']}": (secret["secretName"], i["key"]) for i in secret["items"]}
    assert files[env["MINIO_ROOT_USER_FILE"]["value"]] == ("nvae-s3-credentials", "AWS_ACCESS_KEY_ID")
    assert files[env["MINIO_ROOT_PASSWORD_FILE"]["value"]] == ("nvae-s3-credentials", "AWS_SECRET_ACCESS_KEY")


def test_bucket_job_creates_the_users_from_the_workloads_secrets(built):
    from common.s3 import parse_s3_uri
    from common.store_admin import DEFAULT_SAMPLER_PREFIX, KEY_ENV

    docs = {(d["kind"], d["metadata"]["name"]): d for d in built["base"]}
    job = docs[("Job", "nvae-create-bucket")]
    (c,) = _containers(job)
    assert c["command"][:3] == ["nvae", "store", "init"] and "--users" in c["command"]
    bucket = c["command"][c["command"].index("--bucket") + 1]
    env = {e["name"]: e for e in c["env"]}
    for role, variables in KEY_ENV.items():
        for var, key in zip(variables, ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), strict=True):
            ref = env[var]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == (f"nvae-s3-{role}", key), var
    # The prefix the sampler may read holds the model it fetches, in the bucket the Job sets up.
    model_bucket, model_key = parse_s3_uri(docs[("ConfigMap", "nvae-sampler")]["data"]["MODEL_REGISTRY"])
    assert model_bucket == bucket and model_key.startswith(DEFAULT_SAMPLER_PREFIX)
    # Exit 2 (bad keys, no admin API) fails the Job at once; 75 (store not ready) is retried.
    spec = job["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never" and spec["backoffLimit"] > 0
    (rule,) = spec["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and rule["onExitCodes"] == {
        "containerName": c["name"],
        "operator": "In",
        "values": [2],
    }


# --- TLS to the store (the component k8s/base/store/tls) -----------------------------------------------------

TLS_OVERLAYS = ["overlays/cpu-dev", "overlays/kserve"]


@pytest.fixture(scope="module")
def built_tls(tmp_path_factory) -> dict[str, list[dict]]:
    """Each overlay with the TLS component added, as a user's overlay adds it."""
    import os

    out = {}
    for path in TLS_OVERLAYS:
        d = tmp_path_factory.mktemp("tls-" + path.replace("/", "-"))
        rel = lambda p, d=d: os.path.relpath(K8S / p, d)  # noqa: E731
        (d / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "resources": [rel(path)],
                    "components": [rel("base/store/tls")],
                }
            )
        )
        stdout = run([tool("kubectl"), "kustomize", str(d)], cwd=REPO).stdout
        out[path] = [doc for doc in yaml.safe_load_all(stdout) if doc]
    return out


def _ca_bundle_paths(docs: list[dict]) -> list[str]:
    return [
        e["value"]
        for d in docs
        for c in _containers(d)
        for e in c.get("env", [])
        if e["name"] == "AWS_CA_BUNDLE"
    ]


def test_the_base_speaks_http_to_the_store(built):
    for path, docs in built.items():
        assert _ca_bundle_paths(docs) == [], path
        for doc in docs:
            for c in _containers(doc):
                assert "HTTPS" not in str(c.get("readinessProbe", "")), f"{path}: {c['name']}"


@pytest.mark.parametrize("path", TLS_OVERLAYS)
def test_tls_component_serves_https_and_every_store_client_trusts_the_mounted_ca(built_tls, built, path):
    import kubernetes_validate

    docs = built_tls[path]
    for doc in docs:
        if doc["kind"] == "InferenceService":
            _strict_kserve_load(doc, "V1beta1InferenceService", "InferenceService")
        elif doc["kind"] != "TrainJob":
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    (minio,) = [d for d in docs if d["kind"] == "StatefulSet"]
    (server,) = _containers(minio)
    certs_dir = server["args"][server["args"].index("--certs-dir") + 1]
    (mount,) = [m for m in server["volumeMounts"] if m["mountPath"] == certs_dir]
    (volume,) = [v for v in _pod_specs(minio)[0]["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "nvae-s3-tls"
    assert {i["path"] for i in volume["secret"]["items"]} == {"public.crt", "private.key"}  # MinIO's names
    assert server["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert server["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    # Every container that reads an S3 Secret, MinIO aside, trusts the CA from nvae-s3-ca.
    clients = 0
    for doc in docs:
        for pod in _pod_specs(doc):
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for c in pod.get("initContainers", []) + pod.get("containers", []):
                if not _s3_secret_refs(c) or doc["kind"] == "StatefulSet":
                    continue
                clients += 1
                (bundle,) = [e["value"] for e in c["env"] if e["name"] == "AWS_CA_BUNDLE"]
                (m,) = [m for m in c["volumeMounts"] if bundle.startswith(m["mountPath"].rstrip("/") + "/")]
                assert m.get("readOnly") is True
                assert volumes[m["name"]]["secret"]["secretName"] == "nvae-s3-ca"
                assert bundle.rpartition("/")[2] == "ca.crt"
    if path == "overlays/kserve":  # KServe's storage initializer fetches the model, over HTTPS
        (sa,) = [
            d
            for d in docs
            if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == "nvae-sampler-storage"
        ]
        assert sa["metadata"]["annotations"]["serving.kserve.io/s3-usehttps"] == "1"
        assert clients == 1, "the bucket Job"
    else:
        assert clients == 2, "the bucket Job and the sampler's init container"
    # Nothing else changed: the same objects as without TLS.
    assert {(d["kind"], d["metadata"]["name"]) for d in docs} == {
        (d["kind"], d["metadata"]["name"]) for d in built[path]
    }


# --- images --------------------------------------------------------------------------------------------------


def test_images_file_names_the_cpu_and_gpu_images_at_the_project_version():
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert images_mod.DEFAULT_TAG == version
    assert IMAGES == {
        "cpu": f"{PROJECT_REPO}nvae-cpu:{version}",
        "gpu": f"{PROJECT_REPO}nvae-gpu:{version}",
        "serve-cpu": f"{PROJECT_REPO}nvae-serve-cpu:{version}",
        "serve-gpu": f"{PROJECT_REPO}nvae-serve-gpu:{version}",
    }


@pytest.mark.parametrize(
    "path, allowed",
    [
        ("base", {"cpu", "serve-cpu"}),
        ("overlays/cpu-dev", {"cpu", "serve-cpu"}),
        ("overlays/gpu", {"gpu", "serve-gpu"}),
        ("overlays/kserve", {"cpu", "serve-cpu"}),
        ("train", {"gpu"}),
    ],
)
def test_manifests_use_exactly_the_images_in_images_yaml(built, path, allowed):
    for doc in built[path]:
        for image in _images(doc):
            if image.startswith(PROJECT_REPO):
                assert image in {IMAGES[k] for k in allowed}, f"{path}: {image}"
            else:
                # Third-party images are pinned to a release, never a moving tag.
                assert re.fullmatch(
                    r"quay\.io/minio/minio:RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", image
                ), image


def test_pipeline_components_use_the_images_in_images_yaml():
    from components import images

    assert (images.CPU_IMAGE, images.GPU_IMAGE) == (IMAGES["cpu"], IMAGES["gpu"])
    pattern = re.escape(PROJECT_REPO) + r"[\w.:/-]+"
    for path in [*REPO.glob("components/*.py"), *REPO.glob("pipelines/*.py"), *REPO.glob("pipelines/*.yaml")]:
        for image in re.findall(pattern, path.read_text()):
            assert image in IMAGES.values(), f"{path.relative_to(REPO)}: {image}"


def _stages(dockerfile: Path) -> list[str]:
    """The base of every stage, with `${ARG}` replaced by the ARG's default."""
    text = dockerfile.read_text()
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, flags=re.M))
    return [
        re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), base)
        for base in re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    ]


# ids avoid the bare word "gpu": tests/conftest.py skips items with a "gpu" keyword on machines without CUDA.
@pytest.mark.parametrize("kind", ["cpu", "gpu"], ids=["cpu-image", "gpu-image"])
def test_dockerfile_is_labelled_with_its_image_pinned_multistage_and_non_root(kind):
    dockerfile = K8S / "images" / f"{kind}.Dockerfile"
    text = dockerfile.read_text()
    (ref,) = re.findall(r'org\.opencontainers\.image\.ref\.name="([^"]+)"', text)
    assert ref == IMAGES[kind]
    assert f"-t {IMAGES[kind]}" in text, "the build command in the header names the image"
    froms = _stages(dockerfile)
    assert len(froms) >= 2, "multi-stage: build tools stay out of the runtime image"
    for base in froms:
        assert ":" in base and not base.endswith((":latest", ":slim")), f"unpinned base image {base}"
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1] not in ("root", "0", "0:0"), "the runtime stage runs as a non-root user"
    assert re.search(r"^EXPOSE 8080$", text, flags=re.M)
    # Every package installed beside the project is pinned to an exact version.
    for name in _pip_requirements(text):
        assert name.startswith(".") or "==" in name, f"{kind}.Dockerfile: unpinned {name}"


def _pip_requirements(dockerfile_text: str) -> list[str]:
    """Requirement arguments of every `pip install` in a Dockerfile (options and their values left out)."""
    text = dockerfile_text.replace("\\\n", " ")
    reqs = []
    for line in re.findall(r"pip install (.*)", text):
        tokens = line.split("&&")[0].split()
        skip_next = False
        for tok in tokens:
            if skip_next:
                skip_next = False
            elif tok in ("--index-url", "--extra-index-url", "-r", "-c", "-i", "--constraint"):
                skip_next = True
            elif not tok.startswith("-"):
                reqs.append(tok.strip('"'))
    return reqs


def test_gpu_dockerfile_has_cuda_dali_and_only_the_gpu_onnxruntime():
    text = (K8S / "images" / "gpu.Dockerfile").read_text()
    assert any(base.startswith("nvidia/cuda:") for base in _stages(K8S / "images" / "gpu.Dockerfile"))
    # DALI's wheel for CUDA 13 and onnxruntime-gpu, never beside the CPU onnxruntime (they are one module),
    # from the image's hash-locked requirements (tests/mlops/test_image_locks.py checks their CUDA agrees).
    lock = (K8S / "images" / "locks" / "gpu.txt").read_text()
    assert re.search(r"^nvidia-dali-cuda130==", lock, flags=re.M)
    assert re.search(r"^onnxruntime-gpu==", lock, flags=re.M)
    assert not re.search(r"^onnxruntime==", lock, flags=re.M)
    assert "COPY k8s/images/lockfiles.py k8s/images/locks/gpu.txt" in text
    assert "--require-hashes --no-deps --no-build-isolation --use-pep517 -r lock/runtime.txt" in text


def test_cpu_dockerfile_installs_the_project_with_its_runtime_extras():
    text = (K8S / "images" / "cpu.Dockerfile").read_text()
    # The runtime extras (kfp too: the executor runs from the image) come from the hash-locked cpu.txt.
    assert "COPY k8s/images/lockfiles.py k8s/images/locks/cpu.txt" in text
    assert "pip install --no-deps --no-build-isolation ." in text
    assert "ARG TORCH_REQUIREMENT=" in text and "ARG BASE_IMAGE=" in text


def test_cpu_image_has_a_compiler_for_the_compiled_kernels_unless_built_without():
    """The training step's compiled CPU kernels need g++ and Python.h at run time, in the runtime stage (the one
    that ships); scripts/images.sh --no-compiler builds without them."""
    text = (K8S / "images" / "cpu.Dockerfile").read_text()
    runtime = text[text.rindex("FROM ${BASE_IMAGE}") :]
    assert "ARG WITH_COMPILER=1" in runtime
    step = runtime[runtime.index('if [ "$WITH_COMPILER" = 1 ]') : runtime.index("fi\n")]
    assert "apt-get install -y --no-install-recommends g++ $headers" in step
    assert "Python.h" in step and "-dev" in step and "rm -rf /var/lib/apt/lists/*" in step
    assert runtime.index("apt-get") < runtime.index("USER 10001")  # installed as root
    script = (REPO / "scripts" / "images.sh").read_text()
    assert "--no-compiler) with_compiler=0 ;;" in script
    assert '--build-arg "WITH_COMPILER=$with_compiler"' in script


@pytest.mark.parametrize("kind", ["serve-cpu", "serve-gpu"])
def test_serving_image_holds_the_sampler_alone(kind):
    text = (K8S / "images" / f"{kind}.Dockerfile").read_text()
    copies = re.findall(r"^COPY (?!--from)(\S+)", text, flags=re.M)
    assert {c for c in copies if not c.startswith("k8s/")} == {"common", "serving"}
    assert f"COPY k8s/images/lockfiles.py k8s/images/locks/{kind}.txt" in text
    reqs = [
        line.strip()
        for line in (K8S / "images" / "serve-requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert "onnxruntime" in reqs and not {"torch", "torchvision", "nvidia-dali-cuda130", "dvc"} & set(reqs)
    lock = (K8S / "images" / "locks" / f"{kind}.txt").read_text()
    for r in reqs:  # the CUDA image locks onnxruntime-gpu in place of onnxruntime
        name = "onnxruntime-gpu" if kind == "serve-gpu" and r == "onnxruntime" else r
        assert re.search(rf"^{re.escape(name)}==", lock, flags=re.M), name
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users[-1] == "10001:10001" and 'ENTRYPOINT ["python", "-m", "serving"]' in text
    (ref,) = re.findall(r'org\.opencontainers\.image\.ref\.name="([^"]+)"', text)
    assert ref == f"{PROJECT_REPO}nvae-{kind}:{images_mod.DEFAULT_TAG}" == IMAGES[kind]
    if kind == "serve-gpu":  # onnxruntime-gpu instead of, never beside, the CPU onnxruntime
        assert not re.search(r"^onnxruntime==", lock, flags=re.M)
