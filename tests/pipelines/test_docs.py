"""docs/kubeflow.md matches the code it documents."""

import re
from pathlib import Path

from components.params import PipelineParams

DOC = Path(__file__).resolve().parents[2] / "docs" / "kubeflow.md"


def test_parameter_table_is_the_one_generated_from_pipeline_params():
    text = "\n".join(line.strip() for line in DOC.read_text().splitlines())
    assert PipelineParams.markdown_table() in text, (
        "paste PipelineParams.markdown_table() into docs/kubeflow.md"
    )


def test_every_documented_output_is_declared_by_its_step():
    import yaml

    from pipelines.nvae_pipeline import COMPILED

    spec = next(yaml.safe_load_all(COMPILED.read_text()))
    declared = set()
    for task, t in spec["root"]["dag"]["tasks"].items():
        outputs = spec["components"][t["componentRef"]["name"]].get("outputDefinitions", {})
        declared |= {(task, name) for name in outputs.get("artifacts", {})}
    section = DOC.read_text().split("## 4. Where the results appear")[1].split("## 5.")[0]
    documented = set()
    for step, names in re.findall(r"^\| ([\w-]+) \| (`[^|]+`) \|", section, flags=re.M):
        documented |= {(step, n) for n in re.findall(r"`([\w]+)`", names)}
    assert documented == declared


def test_both_docs_show_the_minimum_versions_and_the_code_needs_no_more():
    import tomllib

    import yaml
    from packaging.requirements import Requirement

    from components.trainjob import trainjob_body
    from components.versions import markdown_table, minimum
    from pipelines.nvae_pipeline import COMPILED

    table = markdown_table()
    for doc in (DOC, DOC.with_name("deploy.md")):
        assert table in doc.read_text(), f"paste components.versions.markdown_table() into {doc.name}"
    # The spec uses what sets the KFP minimum: optional Secret mounts (2.15), run-time images and accelerator
    # counts (2.4), the /dev/shm emptyDir (2.3).
    spec, platform = list(yaml.safe_load_all(COMPILED.read_text()))
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    optional = [s for ex in k8s.values() for s in ex.get("secretAsVolume", []) + ex.get("secretAsEnv", [])]
    assert any(s.get("optional") for s in optional) and minimum("Kubeflow Pipelines backend") == "2.15"
    # The TrainJob's default form is Trainer 2.2's; pyproject's Trainer API models are at least that.
    body = trainjob_body(name="j", image="i", nodes=2, gpus_per_node=1, accelerator="nvidia.com/gpu", run="s3://b/r",
                         train_args=[], store_secret="s", deadline_s=60)  # fmt: skip
    assert "runtimePatches" in body["spec"] and "activeDeadlineSeconds" in body["spec"]
    project = tomllib.loads((DOC.parents[1] / "pyproject.toml").read_text())["project"]
    reqs = {Requirement(r).name: Requirement(r) for extra in project["optional-dependencies"].values()
            for r in extra if not r.startswith("nvae-pipeline")}  # fmt: skip

    def lowest(name: str) -> str:
        (spec_,) = [s for s in reqs[name].specifier if s.operator in (">=", "==")]
        return spec_.version

    assert lowest("kubeflow-trainer-api") == minimum("Kubeflow Trainer")
    assert lowest("kfp") == lowest("kfp-kubernetes") == minimum("kfp SDK")
    assert lowest("kserve") == minimum("KServe")
