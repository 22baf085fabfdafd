"""k8s/overlays/seaweedfs: the object store as SeaweedFS instead of MinIO, behind the same Service and Secrets.

The overlay passes the checks every kustomization passes (test_k8s's, run here on it); no MinIO workload, image,
label or selector is left; clients keep the Service `minio` on port 9000; the S3 identities give the pipeline's
keys read-write and the sampler's keys read-only, judged by SeaweedFS's own matching rule; the image is pinned
to a release."""

from __future__ import annotations

import json
import re
from fnmatch import fnmatchcase
from pathlib import PurePosixPath

import pytest

from . import test_k8s as k8s

OVERLAY = "overlays/seaweedfs"
STORE = ("StatefulSet", "seaweedfs")
JOB = ("Job", "nvae-create-bucket")
IMAGE = re.compile(r"chrislusf/seaweedfs:\d+\.\d+")  # a release tag, never `latest`


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return k8s._build(OVERLAY)


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return k8s._build("base")


def _by_name(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def _store(docs: list[dict]) -> dict:
    (c,) = k8s._containers(_by_name(docs)[STORE])
    return c


def _flags(container: dict) -> dict[str, str]:
    """`-name=value` arguments as a dict (`-s3` alone maps to "true")."""
    flags = {}
    for arg in container["args"]:
        name, _, value = arg.lstrip("-").partition("=")
        flags[name] = value if "=" in arg else "true"
    return flags


def _job_bucket(docs: list[dict]) -> str:
    (c,) = k8s._containers(_by_name(docs)[JOB])
    return c["command"][c["command"].index("--bucket") + 1]


# --- the checks every kustomization passes ---------------------------------------------------------------------

GENERIC_CHECKS = [
    k8s.test_kustomization_builds_and_every_object_is_namespaced_to_nvae,
    k8s.test_core_objects_validate_against_the_kubernetes_schema,
    k8s.test_every_container_is_non_root_read_only_and_bounded,
]


@pytest.mark.parametrize("check", GENERIC_CHECKS, ids=lambda f: f.__name__.removeprefix("test_"))
def test_the_overlay_passes_the_checks_of_every_kustomization(docs, check):
    check({OVERLAY: docs}, OVERLAY)


def test_the_overlay_applies_no_s3_secret(docs):
    # kubectl apply -k must never overwrite the real keys with placeholders.
    applied = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert not {("Secret", name) for name in k8s.S3_SECRETS} & applied


# --- MinIO is gone, the clients' endpoint is not ---------------------------------------------------------------


def _label_sets(doc: dict):
    """Every labels / matchLabels / selector map in an object, however deep."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            plain_selector = key == "selector" and not {"matchLabels", "matchExpressions"} & set(value)
            if key in ("labels", "matchLabels") or plain_selector:  # a Service's selector is a plain map
                yield value
            yield from _label_sets(value)
    elif isinstance(doc, list):
        for item in doc:
            yield from _label_sets(item)


def test_no_minio_workload_image_label_or_selector_is_left(docs):
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    # The two names kept on purpose: the Service the clients' AWS_ENDPOINT_URL names, and the store's ingress
    # policy, whose namespace list deployers patch by that name (docs/deploy.md).
    kept = {("Service", "minio"), ("NetworkPolicy", "minio-clients-only")}
    assert {n for n in names if "minio" in n[1]} == kept
    assert [n for n in names if n[0] == "StatefulSet"] == [STORE]
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        assert not any("minio" in image for image in k8s._images(doc)), where
        for labels in _label_sets(doc):
            assert not any("minio" in str(v) for v in labels.values()), f"{where}: {labels}"
    (job,) = k8s._containers(_by_name(docs)[JOB])
    assert "--users" not in job["command"], "SeaweedFS has no MinIO admin API: --users would fail the Job"


def test_clients_keep_the_service_name_and_port_and_it_selects_seaweedfs(docs, base):
    service, base_service = _by_name(docs)[("Service", "minio")], _by_name(base)[("Service", "minio")]
    assert service["spec"]["ports"] == base_service["spec"]["ports"]
    (port,) = service["spec"]["ports"]
    pod = _by_name(docs)[STORE]["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container_port,) = [p for p in _store(docs)["ports"] if p["name"] == port["targetPort"]]
    assert container_port["containerPort"] == port["port"] == int(_flags(_store(docs))["s3.port"])
    # Workloads outside the store are the base's, unchanged but for the bucket Job.
    ours = _by_name(docs)
    for key, doc in _by_name(base).items():
        if key[0] in ("Deployment", "HorizontalPodAutoscaler", "ConfigMap", "Role", "RoleBinding"):
            assert ours[key] == doc, key


def test_only_the_s3_gateway_listens_beyond_the_pod_and_it_answers_probes(docs):
    store = _store(docs)
    flags = _flags(store)
    assert flags["ip.bind"] == "127.0.0.1"  # master, volume server, filer
    assert flags["s3"] == "true" and flags["s3.ip.bind"] == "0.0.0.0"
    assert flags["s3.port.iceberg"] == flags["s3.port.lance"] == "0" and flags["s3.iam"] == "false"
    assert flags["master.telemetry"] == "false"
    for probe in ("readinessProbe", "livenessProbe"):
        assert store[probe]["httpGet"] == {"path": "/healthz", "port": "s3"}
    mounts = {m["mountPath"] for m in store["volumeMounts"]}
    assert {flags["dir"], "/tmp"} <= mounts, "data and the servers' sockets are writable volumes"


def test_the_store_admits_only_labelled_clients_and_their_egress_reaches_it(docs, base):
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    base_policies = {d["metadata"]["name"]: d["spec"] for d in base if d["kind"] == "NetworkPolicy"}
    pod_labels = _by_name(docs)[STORE]["spec"]["template"]["metadata"]["labels"]
    ingress = policies["minio-clients-only"]
    assert ingress["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert ingress["ingress"] == base_policies["minio-clients-only"]["ingress"]  # same clients, same port
    (egress,) = policies["store-clients-egress"]["egress"]
    (to,) = egress["to"]
    assert to["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert egress["ports"] == [{"protocol": "TCP", "port": 9000}]
    assert policies["default-deny"] == base_policies["default-deny"]


def test_only_the_store_and_the_bucket_job_read_the_root_keys(docs):
    for doc in docs:
        key = (doc["kind"], doc["metadata"]["name"])
        refs = {r for c in k8s._containers(doc) for r in k8s._s3_secret_refs(c)}
        if key == STORE:  # the store itself: root (Admin) and the two users' keys for their identities
            assert refs == k8s.S3_SECRETS
        elif key == JOB:  # only creates the bucket: no users to make, no users' keys
            assert refs == {"nvae-s3-credentials"}
        else:
            assert "nvae-s3-credentials" not in refs, key


# --- the identities ----------------------------------------------------------------------------------------------


def _identities(docs: list[dict]) -> list[dict]:
    """The S3 config the store reads, followed from the -s3.config flag through its mount to the ConfigMap."""
    store = _store(docs)
    path = PurePosixPath(_flags(store)["s3.config"])
    (mount,) = [m for m in store["volumeMounts"] if PurePosixPath(m["mountPath"]) == path.parent]
    assert mount.get("readOnly") is True
    (volume,) = [v for v in k8s._pod_specs(_by_name(docs)[STORE])[0]["volumes"] if v["name"] == mount["name"]]
    (item,) = [i for i in volume["configMap"]["items"] if i["path"] == path.name]
    config_map = _by_name(docs)[("ConfigMap", volume["configMap"]["name"])]
    return json.loads(config_map["data"][item["key"]])["identities"]


def _secret_of(docs: list[dict], identity: dict) -> str:
    """The Secret an identity's keys come from: each key is a ${VAR} the store's environment fills from one
    Secret's AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."""
    env = {e["name"]: e for e in _store(docs)["env"]}
    (cred,) = identity["credentials"]
    secrets = set()
    for field, secret_key in (("accessKey", "AWS_ACCESS_KEY_ID"), ("secretKey", "AWS_SECRET_ACCESS_KEY")):
        var = re.fullmatch(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", cred[field])
        assert var, f"{identity['name']}.{field} must be a ${{VAR}} reference, never a literal key"
        ref = env[var[1]]["valueFrom"]["secretKeyRef"]
        assert ref["key"] == secret_key and not ref.get("optional"), var[1]
        secrets.add(ref["name"])
    (secret,) = secrets
    return secret


def can(actions: list[str], action: str, bucket: str, key: str = "") -> bool:
    """SeaweedFS's rule for a static identity (weed/s3api/auth_credentials.go, Identity.CanDo, 4.44): Admin or
    the bare action allows everywhere; `Action:bucket` the whole bucket; a pattern with * or ? is matched
    against `Action:bucket/key` (for a listing, the key is its prefix)."""
    if "Admin" in actions or action in actions:
        return True
    target = f"{bucket}/{key}" if key else bucket
    for a in actions:
        if "*" in a or "?" in a:
            if fnmatchcase(f"{action}:{target}", a) or fnmatchcase(f"Admin:{target}", a):
                return True
        elif a in (f"{action}:{bucket}", f"Admin:{bucket}"):
            return True
    return False


def test_the_matching_rule_reads_patterns_as_seaweedfs_does():
    sampler = ["Read:nvae/models/*", "List:nvae/models/*"]
    assert can(sampler, "Read", "nvae", "models/a/b.onnx")
    assert not can(sampler, "Read", "nvae", "models-old/x")
    assert not can(sampler, "Read", "nvae") and not can(sampler, "Write", "nvae", "models/x")
    assert can(["Write:nvae"], "Write", "nvae", "any/key") and not can(["Write:nvae"], "Write", "other", "k")
    assert can(["Admin"], "Write", "other") and not can(["Read"], "Write", "nvae")


def test_identities_give_the_pipeline_read_write_and_the_sampler_read_only(docs):
    from common.store_admin import DEFAULT_SAMPLER_PREFIX

    identities = _identities(docs)
    by_secret = {_secret_of(docs, i): i["actions"] for i in identities}
    assert len(by_secret) == len(identities) and set(by_secret) == k8s.S3_SECRETS
    assert all(i["name"] != "anonymous" and i["credentials"] for i in identities), "no access without keys"
    bucket = _job_bucket(docs)
    registry = _by_name(docs)[("ConfigMap", "nvae-sampler")]["data"]["MODEL_REGISTRY"]
    model_prefix = registry.removeprefix(f"s3://{bucket}/") + "/"  # where the sampler reads its model
    assert model_prefix.startswith(DEFAULT_SAMPLER_PREFIX)
    model, elsewhere = f"{model_prefix}0123456789abcdef/decoder.onnx", "data/fashion-mnist/train.npy"

    root = by_secret["nvae-s3-credentials"]
    assert can(root, "Admin", bucket) and can(root, "Admin", "any-bucket"), "the Job creates the bucket"

    pipeline = by_secret["nvae-s3-pipeline"]
    for key in (model, elsewhere):
        for action in ("Read", "Write", "List"):
            assert can(pipeline, action, bucket, key), (action, key)
    assert can(pipeline, "List", bucket) and can(pipeline, "Write", bucket), "listings, batch deletes"
    assert not can(pipeline, "Admin", bucket) and not can(pipeline, "Write", "other-bucket", "k")

    sampler = by_secret["nvae-s3-sampler"]
    assert can(sampler, "Read", bucket, model) and can(sampler, "List", bucket, model_prefix)
    for action in ("Write", "Tagging", "Admin", "DeleteBucket"):
        assert not can(sampler, action, bucket, model) and not can(sampler, action, bucket), action
    assert not can(sampler, "Read", bucket, elsewhere) and not can(sampler, "List", bucket)
    assert not can(sampler, "Read", bucket, DEFAULT_SAMPLER_PREFIX.rstrip("/") + "-old/x")


# --- the image -----------------------------------------------------------------------------------------------


def test_images_are_pinned_releases_or_the_projects_own(docs):
    for doc in docs:
        for image in k8s._images(doc):
            if image.startswith(k8s.PROJECT_REPO):
                assert image in {k8s.IMAGES["cpu"], k8s.IMAGES["serve-cpu"]}, image
            else:
                assert IMAGE.fullmatch(image), f"{image}: pin a SeaweedFS release tag"
    assert IMAGE.fullmatch(_store(docs)["image"])
