"""What several layers share and which imports nothing of the project: the error classes (`errors`)
and the S3-API client configured from the environment (`s3`)."""
