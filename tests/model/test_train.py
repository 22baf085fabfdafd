import json

import pytest
import torch

from model.checkpoint import load_model
from model.train import NonFiniteLossError, TrainOptions, learning_rate, train


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
