"""Every value the KFP driver puts into a pod spec at run time refers to a STRING parameter.

The v2 driver resolves a container's run-time image and resources (`{{$.inputs.parameters['X']}}`) with
`resolvePodSpecInputRuntimeParameter`, which returns the executor input's `GetStringValue()`: for a number
that is "", so an integer GPU count gives a pod with no GPU limit and no error. The check walks every
executor of the compiled spec and follows each placeholder to the parameter behind it: the component's
input, and what the DAG feeds it (a pipeline parameter or another task's output).
"""

import re
from pathlib import Path

import yaml

from pipelines.nvae_pipeline import COMPILED

PLACEHOLDER = re.compile(r"\{\{\$\.inputs\.parameters\['([^']+)'\]\}\}")
# The container's fields that the launcher fills from the executor input with their types; everything else
# of the container (image, resources, env) is patched into the pod spec by the driver.
_LAUNCHER_FIELDS = {"command", "args"}


def _strings(node, path: str):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _strings(value, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


def _feeders(spec: dict) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(component, input parameter) -> [(what feeds it, its parameterType)] over every DAG of the spec."""
    components = spec["components"]
    dags = {"root": (spec["root"], spec["root"].get("inputDefinitions", {}).get("parameters", {}))}
    for name, comp in components.items():
        if "dag" in comp:
            dags[name] = (comp, comp.get("inputDefinitions", {}).get("parameters", {}))
    found: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for dag_name, (dag, dag_inputs) in dags.items():
        tasks = dag["dag"]["tasks"]
        for task in tasks.values():
            comp = task["componentRef"]["name"]
            for param, source in task.get("inputs", {}).get("parameters", {}).items():
                if "componentInputParameter" in source:
                    key = source["componentInputParameter"]
                    kind = dag_inputs.get(key, {}).get("parameterType", "?")
                    found.setdefault((comp, param), []).append((f"{dag_name} input {key}", kind))
                elif "taskOutputParameter" in source:
                    out = source["taskOutputParameter"]
                    producer = components[tasks[out["producerTask"]]["componentRef"]["name"]]
                    kind = producer["outputDefinitions"]["parameters"][out["outputParameterKey"]]
                    found.setdefault((comp, param), []).append(
                        (f"{out['producerTask']} output {out['outputParameterKey']}", kind["parameterType"])
                    )
    return found


def non_string_pod_spec_placeholders(docs: list[dict]) -> list[str]:
    """'executor field -> parameter (type)' for every pod-spec placeholder that is not a STRING parameter."""
    spec = docs[0]
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    by_executor = {c["executorLabel"]: n for n, c in spec["components"].items() if "executorLabel" in c}
    feeders = _feeders(spec)
    bad = []
    for executor, body in spec["deploymentSpec"]["executors"].items():
        comp_name = by_executor[executor]
        inputs = spec["components"][comp_name].get("inputDefinitions", {}).get("parameters", {})
        container = {k: v for k, v in body.get("container", {}).items() if k not in _LAUNCHER_FIELDS}
        fields = list(_strings(container, "container")) + list(_strings(platform.get(executor, {}), "k8s"))
        for where, text in fields:
            for param in PLACEHOLDER.findall(text):
                # A run-time pod-spec input is the task's own (the compiler adds it to the task, not to the
                # component's interface); a declared input counts too.
                kinds = [(f"{comp_name} input", inputs[param]["parameterType"])] if param in inputs else []
                kinds += feeders.get((comp_name, param), []) or [("nothing", "unresolved")]
                bad += [
                    f"{executor} {where} -> {param}: {src} is {kind}"
                    for src, kind in kinds
                    if kind != "STRING"
                ]
    return bad


def test_every_pod_spec_placeholder_of_the_committed_spec_is_a_string_parameter():
    docs = list(yaml.safe_load_all(COMPILED.read_text()))
    assert non_string_pod_spec_placeholders(docs) == []
    # ... and there are such placeholders to check: the run-time images and GPU counts.
    spec = docs[0]
    counts = [
        ex["container"]["resources"]["accelerator"]["resourceCount"]
        for ex in spec["deploymentSpec"]["executors"].values()
        if "accelerator" in ex["container"].get("resources", {})
    ]
    assert len(counts) == 7 and all(PLACEHOLDER.fullmatch(c) for c in counts)  # with the two FID steps


def test_an_integer_gpu_count_is_caught(tmp_path: Path):
    from kfp import compiler, dsl

    @dsl.component(base_image="python:3.11")
    def plan(n: int) -> int:
        return n

    @dsl.component(base_image="python:3.11")
    def work(x: int):
        print(x)

    @dsl.pipeline(name="counts")
    def counts(gpus: int = 1, image: str = "python:3.11", label: str = "1"):
        direct = work(x=gpus).set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)
        direct.set_container_image(image)
        planned = plan(n=gpus)
        work(x=gpus).set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(planned.output)
        work(x=gpus).set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(label)  # a string: fine

    out = tmp_path / "counts.yaml"
    compiler.Compiler().compile(counts, str(out))
    bad = non_string_pod_spec_placeholders(list(yaml.safe_load_all(out.read_text())))
    assert any("resourceCount" in b and "root input gpus is NUMBER_INTEGER" in b for b in bad), bad
    assert any("plan output Output is NUMBER_INTEGER" in b for b in bad), bad
    assert not any("label" in b or "image" in b for b in bad), bad
