import copy
import json
import time

import pytest
import torch

from model.checkpoint import load_model
from training.train import NonFiniteLossError, TrainOptions, learning_rate, train


class Killed(Exception):
    pass


def _source(cfg, per_epoch=3, kill_at=None):
    """Deterministic batches per (epoch, index); raises Killed when the global batch `kill_at` is requested."""

    def batches(epoch, start):
        for i in range(start, per_epoch):
            if kill_at is not None and epoch * per_epoch + i == kill_at:
                raise Killed
            g = torch.Generator().manual_seed(1000 * epoch + i)
            yield torch.randint(0, 256, (4, 1, cfg.data_size, cfg.data_size), generator=g).float() / 255

    return batches


def _opts(out, steps=6, **kw):
    return TrainOptions(
        steps=steps, batches_per_epoch=3, out=out, checkpoint_every=2, progress=False, log_every=1, **kw
    )


def test_training_writes_checkpoint_metrics_and_summary(tmp_path, tiny_cfg):
    summary = train(tiny_cfg, _source(tiny_cfg), _opts(tmp_path))
    assert summary["steps"] == 6 and summary["skipped_steps"] == 0
    lines = [json.loads(x) for x in (tmp_path / "train_metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    assert all(m["beta"] > 0 and m["lambda"] == tiny_cfg.sr_lambda for m in lines)
    model, payload = load_model(tmp_path / "checkpoint.pt")
    assert payload["step"] == 6 and bool(model.spectral.initialized)


def test_killed_run_resumes_to_identical_weights(tmp_path, tiny_cfg):
    train(tiny_cfg, _source(tiny_cfg), _opts(tmp_path / "straight"))
    with pytest.raises(Killed):
        train(tiny_cfg, _source(tiny_cfg, kill_at=5), _opts(tmp_path / "killed"))
    assert torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["step"] == 4
    train(tiny_cfg, _source(tiny_cfg), _opts(tmp_path / "killed"))
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_with_another_config_is_refused(tmp_path, tiny_cfg, make_tiny):
    train(tiny_cfg, _source(tiny_cfg), _opts(tmp_path, steps=2))
    with pytest.raises(Exception, match="another configuration"):
        train(make_tiny(z_channels=3), _source(tiny_cfg), _opts(tmp_path, steps=4))


def test_non_finite_steps_are_skipped_then_stop(tmp_path, tiny_cfg):
    def nan_batches(epoch, start):
        for _ in range(start, 3):
            yield torch.full((2, 1, 12, 12), float("nan"))

    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite steps"):
        train(tiny_cfg, nan_batches, _opts(tmp_path, max_nonfinite=3))


def test_lr_warmup_then_cosine(tiny_cfg):
    cfg = tiny_cfg  # warmup_epochs 0.1 of 100 batches = 10 steps
    lrs = [learning_rate(cfg, s, 1000, 100) for s in range(1000)]
    assert lrs[0] == pytest.approx(cfg.lr / 10) and lrs[9] == pytest.approx(cfg.lr)
    assert lrs[10] == pytest.approx(cfg.lr) and lrs[-1] == pytest.approx(cfg.lr_min, rel=1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


# ------------------------------------------------------------------------------------------------------
# Issue 4: the `nvae train` program (CLI, signals, exact resume across processes, metrics, precision).

import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from tiny import TINY_SET  # noqa: E402

from cli import train as train_cli  # noqa: E402
from cli.main import main as nvae_main  # noqa: E402
from model.layers import BatchNormSwish, SyncBatchNormSwish  # noqa: E402
from training.distributed import convert_sync_batchnorm  # noqa: E402
from training.metrics import latent_stats  # noqa: E402
from training.train import (  # noqa: E402
    TrainingInterrupted,
    cpu_bf16_is_faster,
    default_precision,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: tiny convs on a shared 2-core machine are far faster without thread hand-offs."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    argv = ["train", "--preset", "fmnist-cpu", "--data", str(data), "--out", str(out), "--no-progress"]
    for item in TINY_SET:
        argv += ["--set", item]
    return argv + ["--batch-size", "16", *extra]


# The child process: `nvae train`, optionally SIGKILLing itself inside optimiser step number N (so the
# kill lands mid-step, after backward and before the update, at a step chosen by the test).
_CHILD = """
import os, signal, sys, torch
kill_at = int(os.environ.get("KILL_AT_OPT_STEP", "0"))
if kill_at:
    original, calls = torch.optim.Adamax.step, [0]
    def step(self, *a, **k):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *a, **k)
    torch.optim.Adamax.step = step
from cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def _run_child(argv: list[str], kill_at: int = 0, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL_AT_OPT_STEP": str(kill_at), "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **popen,
    )


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_sigkilled_run_resumes_to_bitwise_identical_weights(tmp_path, fmnist64):
    # 6 steps over 4 batches per epoch, checkpoints at 2 and 4; killed inside step 4 (after its backward), so
    # the resumed run restarts at step 2 (epoch 0, batch 2) and crosses into epoch 1.
    common = ["--steps", "6", "--checkpoint-every", "2", "--eval-every", "3", "--samples", "4"]
    killed = _run_child(_train_argv(fmnist64, tmp_path / "killed", *common), kill_at=4)
    assert nvae_main(_train_argv(fmnist64, tmp_path / "straight", *common)) == 0  # meanwhile, in-process
    assert killed.wait(timeout=120) == -signal.SIGKILL, killed.stderr.read().decode()[-2000:]
    assert _weights(tmp_path / "killed" / "checkpoint.pt")["step"] == 2
    assert nvae_main(_train_argv(fmnist64, tmp_path / "killed", *common)) == 0  # resumes at step 2
    a = _weights(tmp_path / "straight" / "checkpoint.pt")
    b = _weights(tmp_path / "killed" / "checkpoint.pt")
    assert a["step"] == b["step"] == 6 and (a["epoch"], a["batch_in_epoch"]) == (1, 2)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, v in a["optimizer"]["state"].items():
        assert all(torch.equal(v[n], b["optimizer"]["state"][k][n]) for n in v)
    assert torch.equal(a["rng"][0]["cpu"], b["rng"][0]["cpu"])
    # metrics of the run: DVCLive offline in RUN/dvclive, JSON lines, sample grids per evaluation interval
    for run in ("straight", "killed"):
        live = tmp_path / run / "dvclive"
        assert (live / "plots" / "metrics" / "train" / "loss.tsv").is_file()
        assert (live / "plots" / "metrics" / "eval" / "active_channels.tsv").is_file()
        assert sorted(p.name for p in (tmp_path / run / "samples").iterdir()) == [
            "step-00000003.png",
            "step-00000006.png",
        ]
        assert not (tmp_path / run / "dvc.yaml").exists() and not (live / "dvc.yaml").exists()
    lines = [json.loads(x) for x in (tmp_path / "straight" / "train_metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 7))
    assert {"loss", "recon", "kl", "beta", "lambda", "lr", "grad_norm", "img_per_s", "skipped"} <= set(
        lines[-1]
    )
    summary = json.loads((tmp_path / "straight" / "train_summary.json").read_text())
    assert summary["steps"] == 6 and summary["precision"] == default_precision(
        "cpu"
    )  # bf16 on a CPU where it is faster than fp32


@pytest.mark.slow
def test_sigterm_checkpoints_then_exits_143(tmp_path, fmnist64):
    out = tmp_path / "run"
    proc = _run_child(_train_argv(fmnist64, out, "--steps", "400", "--log-every", "1", "--samples", "0"))
    metrics = out / "train_metrics.jsonl"
    deadline = time.monotonic() + 90
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == train_cli.EXIT_SIGTERM
    assert "SIGTERM received" in proc.stderr.read().decode()
    step = _weights(out / "checkpoint.pt")["step"]
    assert 2 <= step < 400
    done = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert max(done) == step  # the checkpoint is of the last finished step


def test_sigterm_in_process_raises_after_checkpoint_and_resume_is_exact(tmp_path, tiny_cfg):
    def terminating(epoch, start):
        for i, x in enumerate(_source(tiny_cfg)(epoch, start)):
            if epoch * 3 + start + i == 4:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives while step 4 runs
            yield x

    def opts(out):
        return TrainOptions(
            steps=6, batches_per_epoch=3, out=out, progress=False, dvclive=False, sample_count=0
        )

    train(tiny_cfg, _source(tiny_cfg), opts(tmp_path / "straight"))
    with pytest.raises(TrainingInterrupted) as info:
        train(tiny_cfg, terminating, opts(tmp_path / "term"))
    assert info.value.signum == signal.SIGTERM and info.value.step == 5
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    train(tiny_cfg, _source(tiny_cfg), opts(tmp_path / "term"))
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "term" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_exit_codes_of_train(tmp_path, fmnist64, monkeypatch, capsys):
    from training import train as train_mod
    from training.storage import StorageError

    argv = _train_argv(fmnist64, tmp_path / "run", "--steps", "1")

    def raising(exc):
        def fake(*args, **kwargs):
            raise exc

        return fake

    cases = [
        (NonFiniteLossError("10 consecutive non-finite steps"), 1),
        (StorageError("endpoint unreachable", retryable=True), 75),
        (StorageError("InvalidAccessKeyId"), 2),  # permanent: a retry repeats it
        (TrainingInterrupted(signal.SIGTERM, 3, "somewhere"), 143),
        (TrainingInterrupted(signal.SIGINT, 3, "somewhere"), 130),
    ]
    for exc, code in cases:
        monkeypatch.setattr(train_mod, "train", raising(exc))
        assert nvae_main(argv) == code
    assert "error: 10 consecutive non-finite steps" in capsys.readouterr().err
    assert nvae_main([*argv, "--set", "channels=3"]) == 2  # bad input: permanent
    assert nvae_main([*argv[:-2], "--preset", "mnist"]) == 2  # preset for another dataset


def test_nonfinite_run_exits_1_keeping_the_last_good_checkpoint(tmp_path, fmnist64, monkeypatch, capsys):
    from training import train as train_mod

    real_loss = train_mod.nvae_loss

    def poisoned(model, x, step, total_steps, alphas):  # NaN from step 2 on
        terms = real_loss(model, x, step, total_steps, alphas)
        if step >= 2:
            terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(train_mod, "nvae_loss", poisoned)
    out = tmp_path / "run"
    extra = [
        "--steps",
        "8",
        "--checkpoint-every",
        "2",
        "--max-nonfinite",
        "2",
        "--samples",
        "0",
        "--no-dvclive",
    ]
    assert nvae_main(_train_argv(fmnist64, out, *extra)) == train_cli.EXIT_FAILED
    assert "2 consecutive non-finite steps at step 3" in capsys.readouterr().err
    kept = _weights(out / "checkpoint.pt")
    assert kept["step"] == 2 and kept["skipped"] == 0  # the last good checkpoint, untouched
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


def test_default_precision_follows_where_bf16_is_faster():
    avx2 = "processor: 0\nflags\t\t: fpu sse avx avx2 fma\n"
    zen = "flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"  # native bf16, measured slower than fp32
    sapphire = "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16\n"
    graviton = "Features\t: fp asimd bf16 i8mm\n"
    assert cpu_bf16_is_faster(sapphire) and cpu_bf16_is_faster(graviton)
    assert not cpu_bf16_is_faster(avx2) and not cpu_bf16_is_faster(zen)
    assert default_precision("cuda") == "fp16"
    expected = "bf16" if cpu_bf16_is_faster() else "fp32"
    assert default_precision("cpu") == expected


def test_sync_batchnorm_conversion_keeps_the_swish(tiny_cfg):
    from model.network import NVAE

    model = NVAE(tiny_cfg)
    n_swish = sum(isinstance(m, BatchNormSwish) for m in model.modules())
    x = torch.rand(2, 1, 12, 12)
    model.eval()
    ref = model.encode_features(x)[0]
    twin = copy.deepcopy(model).train()
    ref_train = twin.encode_features(x)[0]
    synced = convert_sync_batchnorm(model)
    assert sum(isinstance(m, SyncBatchNormSwish) for m in synced.modules()) == n_swish
    assert not any(type(m) in (BatchNormSwish, torch.nn.BatchNorm2d) for m in synced.modules())
    assert synced.state_dict().keys() == model.state_dict().keys()
    synced.eval()
    torch.testing.assert_close(synced.encode_features(x)[0], ref)
    synced.train()  # no process group: SyncBatchNorm uses batch statistics like BatchNorm2d
    torch.testing.assert_close(synced.encode_features(x)[0], ref_train, rtol=1e-4, atol=1e-4)


def test_latent_stats_counts_active_channels():
    kl_diag = torch.tensor([[0.0, 0.2, 0.05], [1.0, 0.11, 0.09]])
    stats = latent_stats(kl_diag)
    assert stats["active_channels"] == 3 and stats["kl_group/00"] == pytest.approx(0.25)
    assert stats["kl_group/01"] == pytest.approx(1.2)


def test_keep_malloc_arena_applies_on_glibc():
    import platform

    from model.precision import keep_malloc_arena

    applied = keep_malloc_arena()
    assert applied == (platform.libc_ver()[0] == "glibc")


@pytest.mark.slow
def test_compiled_objective_matches_eager_values_and_gradients():
    """`--compile` (inductor, C++ on CPU) through the custom autograd functions; ~2 min of compilation."""
    import torch._inductor.config as inductor_config
    from tiny import TINY

    from model.config import apply_overrides, get_preset
    from model.network import NVAE
    from training.train import Objective

    results = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inductor_config, "fallback_random", True)  # the same posterior noise as eager
        for compiled in (False, True):
            torch.manual_seed(0)
            model = NVAE(apply_overrides(get_preset("fmnist-cpu"), {**TINY, "batch_size": 8}))
            model = model.to(memory_format=torch.channels_last)
            objective = Objective(model)
            if compiled:
                model.compile()
            x = torch.rand(8, 1, 28, 28).contiguous(memory_format=torch.channels_last)
            loss = objective(x, 0, 100).loss
            loss.backward()
            results.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (eager_loss, eager_grad), (comp_loss, comp_grad) = results
    torch.testing.assert_close(comp_loss, eager_loss, rtol=1e-5, atol=1e-3)
    assert (comp_grad - eager_grad).abs().max() <= 1e-4 * eager_grad.abs().max()


def _recording_source(cfg, per_epoch=3):
    """Like `_source`, also recording the (epoch, index) of every batch handed out."""
    seen = []
    inner = _source(cfg, per_epoch)

    def batches(epoch, start):
        for i, x in enumerate(inner(epoch, start), start):
            seen.append((epoch, i))
            yield x

    return batches, seen


def test_grad_accum_takes_k_batches_per_step_across_epochs_and_resumes_at_the_same_batch(tmp_path, tiny_cfg):
    source, seen = _recording_source(tiny_cfg)
    summary = train(tiny_cfg, source, _opts(tmp_path / "straight", steps=4, grad_accum=2))
    assert summary["steps"] == 4
    assert seen == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]  # 8 batches, 2 a step
    payload = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    assert payload["grad_accum"] == 2 and (payload["epoch"], payload["batch_in_epoch"]) == (2, 2)
    metrics = [
        json.loads(x) for x in (tmp_path / "straight" / "train_metrics.jsonl").read_text().splitlines()
    ]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    # Killed after step 2 (checkpoint_every=2): the resumed run starts at batch 4 = (epoch 1, index 1).
    with pytest.raises(Killed):
        train(tiny_cfg, _source(tiny_cfg, kill_at=5), _opts(tmp_path / "killed", steps=4, grad_accum=2))
    source, seen = _recording_source(tiny_cfg)
    train(tiny_cfg, source, _opts(tmp_path / "killed", steps=4, grad_accum=2))
    assert seen[0] == (1, 1)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(Exception, match="--grad-accum 2"):
        train(tiny_cfg, _source(tiny_cfg), _opts(tmp_path / "killed", steps=6, grad_accum=3))


def test_grad_accum_sums_the_mean_of_the_batches_gradients(tmp_path, tiny_cfg, monkeypatch):
    """One step over the same batch twice with grad_accum=2 moves the weights as one step over it once: the
    loss is divided by k, so the accumulated gradient is the batches' mean, not their sum."""
    import training.train as train_mod

    grads = {}
    real_step = torch.optim.Adamax.step

    def capture(self, *a, **k):  # the gradient each run hands to the optimiser
        grads[len(grads)] = torch.cat([p.grad.flatten() for g in self.param_groups for p in g["params"]
                                       if p.grad is not None])  # fmt: skip
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adamax, "step", capture)
    # Posterior noise fixed (the posterior's mean), so both batches of the accumulated step give one gradient.
    import model.distributions as dist_mod

    monkeypatch.setattr(dist_mod.torch, "randn_like", lambda t, **k: torch.full_like(t, 0.3))
    batch = _source(tiny_cfg)(0, 0).__next__()

    def same(epoch, start):
        for _ in range(start, 3):
            yield batch.clone()

    cfg = train_mod.NVAEConfig(
        **{**tiny_cfg.to_dict(), "sr_lambda": 0.0}
    )  # its power iteration moves per batch
    for accum in (1, 2):
        train(cfg, same, TrainOptions(steps=1, batches_per_epoch=3, out=tmp_path / str(accum), progress=False,
                                      dvclive=False, grad_accum=accum, eval_every=0, sample_count=0))  # fmt: skip
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-5)


def test_train_warns_when_the_global_batch_is_not_the_recipes(caplog):
    import logging

    from model.config import get_preset
    from training.run import warn_global_batch

    cifar = get_preset("cifar10")
    with caplog.at_level(logging.WARNING, logger="training.run"):
        assert warn_global_batch(cifar, 32, 1, 1) == 32
    assert "differs from the recipe's 256 (32 per GPU x 8 GPUs); --grad-accum 8 reaches it" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="training.run"):
        assert warn_global_batch(cifar, 32, 2, 4) == 256  # 2 processes x 4 accumulated = the authors' 8 GPUs
    assert not caplog.text


def test_info_shows_the_authors_processes_and_global_batch(capsys):
    from cli.main import main

    expected = {"mnist": (200, 2, 400), "cifar10": (32, 8, 256), "celeba64": (16, 8, 128),
                "imagenet32": (24, 24, 576), "celebahq256": (4, 24, 96), "ffhq256": (4, 24, 96)}  # fmt: skip
    for preset, (per_gpu, gpus, global_batch) in expected.items():
        assert main(["info", "--preset", preset, "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert (info["batch_per_process"], info["recipe_processes"], info["global_batch"]) == (
            per_gpu, gpus, global_batch), preset  # fmt: skip
    assert main(["info", "--preset", "cifar10"]) == 0
    assert "32 per process x 8 processes = global batch 256" in capsys.readouterr().out
