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
