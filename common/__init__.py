"""What several layers share and which imports nothing of the project: the error classes (`errors`), atomic
file writes and file digests (`files`), the CPU's model and feature flags (`cpu`), the S3-API client
configured from the environment (`s3`), the object store's scoped users (`store_admin`, MinIO's admin API),
the model registry (`registry`), progress lines (`progress`) and command-line argument types (`argtypes`)."""
