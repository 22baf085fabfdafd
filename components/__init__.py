"""Kubeflow components: one thin KFP component per pipeline step over the `nvae` CLI, their images, and
the pipeline parameters with their validation (shared with `pipelines`, which builds the DAG)."""
