"""Training: the loop (AdaMax + cosine, KL warm-up, AMP), torchrun/DDP helpers, checkpoint stores (local,
S3) and metrics logging. Imports `model`, `data` and `common`."""
