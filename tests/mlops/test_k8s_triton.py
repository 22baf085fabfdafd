"""k8s/overlays/kserve-triton: the decoder on KServe's stock ONNX runtime (Triton), reading the model repository
`nvae export-onnx --layout triton` writes from the store, with no container of ours."""

from __future__ import annotations

import pytest
import yaml

from .conftest import REPO, run, tool
from .test_k8s import _strict_kserve_load

OVERLAY = REPO / "k8s" / "overlays" / "kserve-triton"


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    out = run([tool("kubectl"), "kustomize", str(OVERLAY)], cwd=REPO).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _isvc(docs: list[dict]) -> dict:
    (isvc,) = [d for d in docs if d["kind"] == "InferenceService"]
    return isvc


def test_overlay_builds_in_the_nvae_namespace_without_the_sampler_deployment(docs):
    assert all(d["metadata"].get("namespace") == "nvae" for d in docs if d["kind"] != "Namespace")
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Deployment", "nvae-sampler") not in kinds and ("Service", "nvae-sampler") not in kinds
    assert ("HorizontalPodAutoscaler", "nvae-sampler") not in kinds


def test_predictor_is_the_stock_onnx_runtime_on_the_triton_repository_in_the_store(docs):
    predictor = _isvc(docs)["spec"]["predictor"]
    assert "containers" not in predictor  # no image of ours: KServe's runtime serves the graph
    model = predictor["model"]
    assert model["modelFormat"]["name"] == "onnx"
    assert model.get("runtime", "kserve-tritonserver") == "kserve-tritonserver"
    uri = model["storageUri"]
    assert uri.startswith("s3://nvae/") and uri.endswith("/"), "a folder: the repository, not model.onnx"
    assert "/models/" not in uri, "a Triton repository, not a registry version folder (decoder.onnx)"
    assert {"cpu", "memory"} <= set(model["resources"]["requests"]) & set(model["resources"]["limits"])


def test_storage_initializer_reads_the_store_as_the_sampler_s_read_only_user(docs):
    isvc = _isvc(docs)
    predictor = isvc["spec"]["predictor"]
    (sa,) = [
        d
        for d in docs
        if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == predictor["serviceAccountName"]
    ]
    assert [s["name"] for s in sa["secrets"]] == ["nvae-s3-sampler"]
    annotations = sa["metadata"]["annotations"]
    assert annotations["serving.kserve.io/s3-endpoint"] == "minio.nvae.svc.cluster.local:9000"
    assert isvc["metadata"]["labels"]["nvae.io/store-client"] == "true"  # the store's NetworkPolicy admits it


def test_network_policy_selects_the_triton_pods(docs):
    (pol,) = [
        d
        for d in docs
        if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "nvae-sampler-clients-only"
    ]
    selected = pol["spec"]["podSelector"]["matchLabels"]
    assert selected == {"serving.kserve.io/inferenceservice": _isvc(docs)["metadata"]["name"]}
    (rule,) = pol["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8080}]  # kserve-tritonserver's --http-port


def test_predictor_runs_non_root_and_loads_into_the_kserve_models_without_unknown_fields(docs):
    import kserve

    isvc = _isvc(docs)
    pod = isvc["spec"]["predictor"]["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
    sc = isvc["spec"]["predictor"]["model"]["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    model = _strict_kserve_load(isvc, "V1beta1InferenceService", "InferenceService")
    assert isinstance(model, kserve.V1beta1InferenceService)
    assert model.spec.predictor.model.model_format.name == "onnx"
