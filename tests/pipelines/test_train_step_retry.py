"""The train step on a retry, as KFP runs it: the same step function with the same run id, in a new process.

A step killed hard (SIGKILL, as a node loss or the OOM killer) after a checkpoint resumes from the run's
checkpoints in the store; a permanent failure leaves a marker that stops the retry at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from components.runtime import PERMANENT_MARKER

REPO = Path(__file__).resolve().parents[2]
TINY = "channels=8 z_channels=4 groups=2 cells_enc=1 cells_dec=1 pre_cells=1 post_cells=1 num_mix=3"

# One attempt of the train step: the component's function, called as the KFP executor would call it.
STEP = """
import sys
from kfp.dsl import HTML, Dataset, Metrics, Model
from components.steps import train

data, out, steps, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
train(data=Dataset(uri=data), preset="fmnist-cpu", overrides=overrides, steps=steps, batch_size=16, grad_accum=1, gpus=0,
      seed=0, nodes=1, accelerator="nvidia.com/gpu", checkpoint_store="s3://runs-bucket/runs",
      checkpoint_every=2, trainjob_deadline_s=604800, trainer_api="2.2", import_checkpoint="", run_id="run-42", image="unused", model=Model(uri=out + "/model"),
      train_metrics=Metrics(uri=out + "/train_metrics"), curves=HTML(uri=out + "/curves"))
"""


def _attempt(data: Path, out: Path, steps: int, overrides: str = TINY) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", STEP, str(data), str(out), str(steps), overrides],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _client(s3):
    return boto3.client(
        "s3",
        endpoint_url=s3["endpoint_url"],
        aws_access_key_id=s3["access_key"],
        aws_secret_access_key=s3["secret_key"],
        region_name=s3["region"],
    )


def _pointer(client) -> dict | None:
    try:
        body = client.get_object(Bucket="runs-bucket", Key="runs/run-42/checkpoints/latest.json")["Body"]
    except client.exceptions.NoSuchKey:
        return None
    return json.loads(body.read())


@pytest.fixture
def runs_bucket(s3_env):
    client = _client(s3_env)
    try:
        client.create_bucket(Bucket="runs-bucket")
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="runs-bucket", Prefix="runs/run-42/"):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket="runs-bucket", Key=obj["Key"])
    return client


def test_a_killed_train_step_resumes_from_the_run_checkpoints_on_retry(fmnist64, tmp_path, runs_bucket):
    first = _attempt(fmnist64, tmp_path / "attempt1", steps=400)
    deadline = time.monotonic() + 240
    while (pointer := _pointer(runs_bucket)) is None or pointer["step"] < 4:
        assert first.poll() is None, first.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no checkpoint in the store in time"
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)  # no handler runs: only what is already in the store survives
    first.wait()
    killed_at = _pointer(runs_bucket)["step"]
    assert 4 <= killed_at < 400

    second = _attempt(fmnist64, tmp_path / "attempt2", steps=killed_at + 4)  # the retry, a fresh pod
    log, _ = second.communicate(timeout=600)
    assert second.returncode == 0, log[-3000:]
    assert f"resumed from s3://runs-bucket/runs/run-42/checkpoints/ at step {killed_at}" in log
    model = tmp_path / "attempt2" / "model"
    summary = json.loads((model / "train_summary.json").read_text())
    assert summary["steps"] == killed_at + 4
    # The final checkpoint came back from the store into the step's output, where evaluate reads it.
    assert _pointer(runs_bucket)["step"] == killed_at + 4
    import torch

    assert torch.load(model / "checkpoint.pt", weights_only=False)["step"] == killed_at + 4


def test_a_permanent_failure_stops_the_retry_at_once(fmnist64, tmp_path, runs_bucket):
    bad = _attempt(fmnist64, tmp_path / "attempt1", steps=4, overrides=TINY + " groups=0")
    log, _ = bad.communicate(timeout=300)
    assert bad.returncode != 0 and "exited with status 2" in log, log[-2000:]
    marker = runs_bucket.get_object(Bucket="runs-bucket", Key=f"runs/run-42/{PERMANENT_MARKER}")
    assert json.loads(marker["Body"].read()) == {"what": "nvae train exited with status 2"}

    retry = _attempt(fmnist64, tmp_path / "attempt2", steps=4)
    log, _ = retry.communicate(timeout=300)
    assert retry.returncode != 0
    assert "an earlier attempt of this run failed permanently (nvae train exited with status 2" in log
    assert "+ nvae train" not in log  # refused before any work
