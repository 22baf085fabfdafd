"""The Kubeflow pipeline: the DAG over `components`, compile, local runs (kfp.local) and submission."""
