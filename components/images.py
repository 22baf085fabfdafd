"""Container images the components run in (the same names as k8s/ and the Dockerfiles; a test checks)."""

CPU_IMAGE = "ghcr.io/nvae-pipeline/nvae-cpu:0.1.0"
GPU_IMAGE = "ghcr.io/nvae-pipeline/nvae-gpu:0.1.0"
