"""The oldest version of each platform part that the compiled spec and the manifests work with, and the
feature that sets it: docs/kubeflow.md and docs/deploy.md show this table, and tests hold both the docs and
the code (the spec's features, the TrainJob's API forms, pyproject's ranges) to it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Minimum:
    part: str
    version: str
    needs: str  # what needs that version


MINIMUMS = (
    Minimum(
        "Kubeflow Pipelines backend",
        "2.15",
        "optional Secret mounts (the store's CA `nvae-s3-ca` and, outside a cluster with the store, the keys "
        "`nvae-s3-pipeline`) are honoured from 2.15; 2.4 resolves run-time images and accelerator counts "
        "from placeholders, 2.3 mounts the `/dev/shm` emptyDir. On 2.4-2.14 both Secrets must exist.",
    ),
    Minimum(
        "kfp SDK", "2.17.3", "the spec is compiled with kfp and kfp-kubernetes 2.17.3 (pyproject pins them)."
    ),
    Minimum(
        "Kubeflow Trainer",
        "2.2",
        "`runtimePatches` (the pods' security, volumes and labels) and `activeDeadlineSeconds` on the "
        "TrainJob; Trainer 2.0 and 2.1 work with the pipeline parameter `trainer_api=2.0` "
        "(`podTemplateOverrides`, no job deadline). Only for `nodes` > 1.",
    ),
    Minimum(
        "KServe",
        "0.15",
        "the `kserve` overlays: the predictor runs the `kserve` model server package at 0.15 or newer "
        "(`kserve.Model`, OIP v2 REST and gRPC).",
    ),
    Minimum(
        "Kubernetes",
        "1.26",
        "the bucket Job's `podFailurePolicy` (on by default from 1.26, GA in 1.31); the manifests are validated "
        "against the 1.33 schemas.",
    ),
)


def markdown_table() -> str:
    rows = ["| part | at least | what needs it |", "|---|---|---|"]
    rows += [f"| {m.part} | {m.version} | {m.needs} |" for m in MINIMUMS]
    return "\n".join(rows)


def minimum(part: str) -> str:
    return next(m.version for m in MINIMUMS if m.part == part)
