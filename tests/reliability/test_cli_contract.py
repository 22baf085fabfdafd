"""The error contract of every command: bad input is one line naming the file or option, exit status 2,
and nothing half-written is left behind. Cases a hostile user would try."""

import socket
from pathlib import Path

import pytest
import torch

from cli.main import main
from model.checkpoint import save_checkpoint
from model.network import NVAE


@pytest.fixture
def ckpt(tmp_path, make_tiny):
    torch.manual_seed(0)
    path = tmp_path / "c.pt"
    save_checkpoint(path, NVAE(make_tiny(data_size=28, image_size=32)), extra={"step": 1})
    return path


@pytest.fixture
def blocked(tmp_path) -> Path:
    """An output path under a regular file: unwritable even for root."""
    (tmp_path / "a-file").write_text("x")
    return tmp_path / "a-file" / "out"


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_unwritable_outputs_are_one_line(tmp_path, ckpt, fmnist64, blocked, capsys):
    cases = [
        ["evaluate", "--checkpoint", str(ckpt), "--data", str(fmnist64), "--iw-samples", "1", "--limit", "2"],
        ["readjust-bn", "--checkpoint", str(ckpt), "--temperature", "1", "--iters", "1", "--batch", "2"],
        ["sample", "--checkpoint", str(ckpt), "--n", "2", "--temperature", "1"],
        [
            "prepare",
            "--dataset",
            "fashion-mnist",
            "--source",
            "/usr/share/datasets/fashion-mnist",
            "--limit",
            "8",
        ],
        ["export-onnx", "--checkpoint", str(ckpt), "--exporter", "torchscript", "--no-verify"],
        ["pipeline", "compile"],
    ]
    for argv in cases:
        assert main([*argv, "--out", str(blocked / "x")]) == 2, argv
        one_line_error(capsys, str(blocked.parent), "Not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "c.pt"]


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"format": "nvae-pipeline-checkpoint", "version": 1, "config": "{}"}, "no 'model' entry"),
        (
            {"format": "nvae-pipeline-checkpoint", "version": 1, "model": {}, "config": "[1, 2]"},
            "JSON object",
        ),
        (
            {"format": "nvae-pipeline-checkpoint", "version": 1, "model": {}, "config": 7},
            "config: expected the config, a JSON object as text, got 7",
        ),
        (
            {"format": "nvae-pipeline-checkpoint", "version": 1, "model": {"w": "text"}, "config": "{}"},
            "'model'",
        ),
    ],
)
def test_malformed_checkpoints_are_one_line(tmp_path, capsys, payload, message):
    path = tmp_path / "bad.pt"
    torch.save(payload, path)
    assert main(["export-onnx", "--checkpoint", str(path), "--out", str(tmp_path / "d.onnx")]) == 2
    one_line_error(capsys, message)
    assert not (tmp_path / "d.onnx").exists()


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--log-every", "0", "--log-every must be >= 1, got 0"),
        ("--steps", "-3", "--steps must be >= 0, got -3"),  # 0 is for --init-from (tests/training)
        ("--batch-size", "0", "--batch-size must be >= 1, got 0"),
        ("--max-nonfinite", "0", "--max-nonfinite must be >= 1"),
        ("--samples", "-1", "--samples must be >= 0"),
    ],
)
def test_train_lengths_and_counts_are_range_checked(tmp_path, fmnist64, capsys, flag, value, message):
    argv = ["train", "--data", str(fmnist64), "--out", str(tmp_path / "run"), flag, value]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_serve_port_out_of_range_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--onnx", str(tmp_path / "m.onnx"), "--port", "70000"])
    assert exit_.value.code == 2 and "--port must be in [0, 65535], got 70000" in capsys.readouterr().err


def test_an_impossible_sample_count_is_refused_before_allocating(tmp_path, ckpt, capsys):
    assert main(["sample", "--checkpoint", str(ckpt), "--n", "100000000", "--out", str(tmp_path / "s")]) == 2
    one_line_error(capsys, "--n 100000000", "GiB", "at most")
    assert not (tmp_path / "s").exists()


def test_nan_weights_do_not_produce_a_metrics_file(tmp_path, make_tiny, fmnist64, capsys):
    model = NVAE(make_tiny(data_size=28, image_size=32))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    save_checkpoint(tmp_path / "nan.pt", model)
    out = tmp_path / "m.json"
    argv = [
        "evaluate",
        "--checkpoint",
        str(tmp_path / "nan.pt"),
        "--data",
        str(fmnist64),
        "--iw-samples",
        "1",
    ]
    assert main([*argv, "--limit", "2", "--out", str(out)]) == 2
    one_line_error(capsys, "non-finite", "nothing written")
    assert not out.exists()


def test_submit_to_a_dead_host_is_one_line(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host = f"http://127.0.0.1:{port}"
    assert main(["pipeline", "submit", "--host", host]) == 2
    one_line_error(capsys, host, "cannot connect")


def test_leftovers_of_a_killed_save_are_removed_on_the_next_start(tmp_path):
    from training.storage import LocalCheckpointStore

    leftover = tmp_path / ".checkpoint.pt.abc123.tmp"
    leftover.write_bytes(b"half a checkpoint")
    (tmp_path / "unrelated.tmp").write_text("keep")
    assert LocalCheckpointStore(tmp_path).load_latest() is None
    assert not leftover.exists() and (tmp_path / "unrelated.tmp").exists()


def test_store_failures_are_classified_retryable_or_permanent():
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError

    from common.errors import StorageError
    from common.s3 import is_retryable, parse_s3_uri

    def client_error(code, status):
        return ClientError(
            {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
        )

    assert is_retryable(EndpointConnectionError(endpoint_url="http://x"))
    assert is_retryable(ReadTimeoutError(endpoint_url="http://x"))
    assert is_retryable(client_error("InternalError", 500)) and is_retryable(client_error("SlowDown", 503))
    assert not is_retryable(client_error("InvalidAccessKeyId", 403))
    assert not is_retryable(client_error("NoSuchBucket", 404))
    assert not is_retryable(NoCredentialsError())
    with pytest.raises(StorageError) as bad_uri:
        parse_s3_uri("ftp://bucket/x")
    assert bad_uri.value.retryable is False


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (mounting needs root, as on this project's machines and CI; skipped elsewhere)."""
    import subprocess

    mount = tmp_path / "small-disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_a_checkpoint_save_names_the_file_and_leaves_nothing(small_disk):
    from model.checkpoint import atomic_torch_save

    target = small_disk / "model.pt"
    atomic_torch_save({"w": torch.zeros(10)}, target)  # an older checkpoint that must survive
    with pytest.raises(OSError) as exc:  # torch's own error would be RuntimeError('unexpected pos ...')
        atomic_torch_save({"w": torch.zeros(1_000_000)}, target)
    assert exc.value.errno == 28 and exc.value.filename == str(target)
    assert sorted(p.name for p in small_disk.iterdir()) == ["model.pt"]  # no temporary left behind
    assert torch.load(target)["w"].shape == (10,)


def test_train_on_a_full_disk_is_one_line_exit_2(small_disk, fmnist64, make_tiny, capsys):
    argv = ["train", "--data", str(fmnist64), "--out", str(small_disk / "run"), "--steps", "1",
            "--batch-size", "4", "--samples", "0", "--set", "channels=16", "--set", "z_channels=8"]  # fmt: skip
    assert main(argv) == 2
    one_line_error(capsys, "no space left on device")
    assert not [p for p in small_disk.rglob("*") if p.name.endswith(".tmp")]
