"""Progress without a terminal: a line every 10 % or 60 s, one at the end, nothing per update."""

import logging

import pytest

from common.progress import LineProgress, progress


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_a_line_every_tenth_and_one_at_the_end(caplog):
    caplog.set_level(logging.INFO, logger="nvae.progress")
    clock = Clock()
    with LineProgress(total=300, desc="train", unit="step", clock=clock) as bar:
        for _ in range(300):
            clock.t += 0.1
            bar.update(1)
            bar.set_postfix(bpd="3.5")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10
    assert lines[0].startswith("train: 30/300 step (10%)") and "eta" in lines[0] and "bpd=3.5" in lines[0]
    assert lines[-1].startswith("train: 300/300 step (100%)") and "eta" not in lines[-1]


def test_slow_work_still_reports_every_minute(caplog):
    caplog.set_level(logging.INFO, logger="nvae.progress")
    clock = Clock()
    bar = LineProgress(total=1000, desc="evaluate", unit="img", clock=clock)
    for _ in range(5):
        clock.t += 61
        bar.update(1)
    bar.close()
    bar.close()  # idempotent
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        f"evaluate: {n}/1000 img (0%)" for n in (1, 2, 3, 4, 5)
    ]  # and no extra line at close: nothing new since the last


def test_iterating_and_disabled(caplog):
    caplog.set_level(logging.INFO, logger="nvae.progress")
    assert sum(LineProgress(range(50), total=50, desc="it", disable=True)) == sum(range(50))
    assert caplog.records == []
    assert list(LineProgress(range(20), total=20, desc="it")) == list(range(20))
    assert len(caplog.records) == 10


def test_mode_from_the_environment(monkeypatch):
    from tqdm import tqdm

    monkeypatch.setenv("NVAE_PROGRESS", "bar")
    assert isinstance(progress(total=3), tqdm)
    monkeypatch.setenv("NVAE_PROGRESS", "lines")
    assert isinstance(progress(range(3)), LineProgress) and progress(range(3)).total == 3
    monkeypatch.setenv("NVAE_PROGRESS", "off")
    assert progress(total=3).disable
    monkeypatch.setenv("NVAE_PROGRESS", "fancy")
    with pytest.raises(ValueError, match="NVAE_PROGRESS"):
        progress(total=3)


def test_the_first_line_comes_within_seconds(caplog):
    """Work whose first tenth takes hours still shows its rate and eta after about five seconds."""
    caplog.set_level(logging.INFO, logger="nvae.progress")
    clock = Clock()
    bar = LineProgress(total=10_000_000, desc="evaluate (K=1000)", unit="samples", clock=clock)
    for _ in range(40):
        clock.t += 2.0
        bar.update(64)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("evaluate (K=1000): 192/10000000 samples (0%)") and "eta" in lines[0]
    assert len(lines) == 2  # at 6 s, then a minute after it


def test_the_first_item_s_warm_up_is_left_out_of_the_rate(caplog):
    """A first training step of 7 s (warm-up) and then 0.5 s steps: the early line says 2 step/s, not 0.27."""
    caplog.set_level(logging.INFO, logger="nvae.progress")
    clock = Clock()
    bar = LineProgress(total=1000, desc="train", unit="step", clock=clock)
    clock.t = 7.0
    bar.update(1)  # past 5 s, but a rate needs a second step
    assert caplog.records == []
    clock.t = 7.5
    bar.update(1)
    line = caplog.records[0].getMessage()
    assert line.startswith("train: 2/1000 step (0%), 2 step/s, 8 s, eta 499 s"), line
