"""Loaders: deterministic order and augmentation, exact resume, disjoint DDP shards, binarization, bits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import DataError
from data.loaders import PreparedDataset, epoch_plan, load_split, make_loader


def _all(loader) -> list[torch.Tensor]:
    return list(loader)


def _as_uint8(batch: torch.Tensor, max_value: int = 255) -> np.ndarray:
    """float (B, C, H, W) in [0, 1] back to uint8 (B, H, W, C)."""
    return (batch * max_value).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_batches_are_float_bchw_in_unit_range(prepared_fmnist: Path) -> None:
    loader = make_loader(prepared_fmnist, "train", 16, train=True)
    batches = _all(loader)
    assert len(loader) == len(batches) == 6
    x = batches[0]
    assert x.dtype == torch.float32 and x.shape == (16, 1, 28, 28)
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_eval_order_is_the_stored_order(prepared_fmnist: Path) -> None:
    loader = make_loader(prepared_fmnist, "test", 16, train=False, drop_last=False)
    batches = _all(loader)
    assert [len(b) for b in batches] == [16, 16, 8] and len(loader) == 3
    assert np.array_equal(_as_uint8(torch.cat(batches)), load_split(prepared_fmnist, "test"))


def test_same_seed_and_epoch_give_the_same_batches(prepared_fmnist: Path) -> None:
    a = _all(make_loader(prepared_fmnist, "train", 16, train=True, seed=3, epoch=2))
    b = _all(make_loader(prepared_fmnist, "train", 16, train=True, seed=3, epoch=2))
    c = _all(make_loader(prepared_fmnist, "train", 16, train=True, seed=3, epoch=3))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(torch.cat(a), torch.cat(c))
    # an epoch is a permutation: the same images, in another order
    stored = np.sort(load_split(prepared_fmnist, "train").reshape(96, -1), axis=0)
    assert np.array_equal(np.sort(_as_uint8(torch.cat(c)).reshape(96, -1), axis=0), stored)


def test_start_batch_resumes_mid_epoch_exactly(prepared_cifar: Path) -> None:
    kw = {"train": True, "seed": 5, "epoch": 1, "binarize": True}
    full = _all(make_loader(prepared_cifar, "train", 8, **kw))
    resumed = make_loader(prepared_cifar, "train", 8, start_batch=3, **kw)
    assert len(resumed) == len(full) == 5
    tail = _all(resumed)
    assert len(tail) == 2 and all(torch.equal(x, y) for x, y in zip(tail, full[3:], strict=True))


def test_set_epoch_matches_a_fresh_loader(prepared_cifar: Path) -> None:
    loader = make_loader(prepared_cifar, "train", 8, train=True, seed=1, epoch=0)
    loader.set_epoch(4, start_batch=1)
    fresh = make_loader(prepared_cifar, "train", 8, train=True, seed=1, epoch=4, start_batch=1)
    assert all(torch.equal(x, y) for x, y in zip(loader, fresh, strict=True))


@pytest.mark.parametrize("train", [True, False])
def test_ddp_ranks_see_disjoint_parts_of_each_epoch(train: bool) -> None:
    n, world = 103, 4
    plans = [
        epoch_plan(n, 5, train=train, seed=7, epoch=2, rank=r, world_size=world, drop_last=train)
        for r in range(world)
    ]
    seen = [p.indices for p in plans]
    flat = np.concatenate(seen)
    assert len(np.unique(flat)) == len(flat)  # disjoint
    if train:
        assert {len(s) for s in seen} == {25} and {p.num_batches for p in plans} == {5}
    else:
        assert sorted(flat.tolist()) == list(range(n))  # evaluation covers the whole split once


def test_ddp_loaders_on_real_data_are_disjoint(prepared_fmnist: Path) -> None:
    images = load_split(prepared_fmnist, "train").reshape(96, -1)
    keys = {row.tobytes(): i for i, row in enumerate(images)}
    seen = []
    for rank in range(3):
        loader = make_loader(prepared_fmnist, "train", 8, train=True, seed=1, rank=rank, world_size=3)
        seen += [keys[r.tobytes()] for b in loader for r in _as_uint8(b).reshape(len(b), -1)]
    assert len(seen) == len(set(seen)) == 96


def test_flips_follow_the_recipe(prepared_fmnist: Path, prepared_cifar: Path) -> None:
    stored = load_split(prepared_cifar, "train")
    got = _as_uint8(torch.cat(_all(make_loader(prepared_cifar, "train", 8, train=True, seed=2))))
    plan = make_loader(prepared_cifar, "train", 8, train=True, seed=2).plan
    flips = plan.flips[plan.indices]
    assert 0 < flips.sum() < len(flips)  # CIFAR-10: NVAE flips
    assert np.array_equal(got[flips], stored[plan.indices[flips]][:, :, ::-1])
    assert np.array_equal(got[~flips], stored[plan.indices[~flips]])
    no_flip = _as_uint8(
        torch.cat(_all(make_loader(prepared_cifar, "train", 8, train=True, seed=2, flip=False)))
    )
    assert np.array_equal(no_flip, stored[plan.indices])
    assert make_loader(prepared_fmnist, "train", 8, train=True).plan.flips is None  # never for MNIST-likes
    assert make_loader(prepared_cifar, "test", 8, train=False).plan.flips is None  # never when evaluating


def test_dynamic_binarization_in_training(prepared_fmnist: Path) -> None:
    e0 = torch.cat(_all(make_loader(prepared_fmnist, "train", 16, train=True, binarize=True, flip=False)))
    assert set(e0.unique().tolist()) <= {0.0, 1.0}
    plain = torch.cat(_all(make_loader(prepared_fmnist, "train", 16, train=True)))
    assert abs(e0.mean() - plain.mean()) < 0.02  # P(x > u) = x
    again = torch.cat(_all(make_loader(prepared_fmnist, "train", 16, train=True, binarize=True)))
    assert torch.equal(e0, again)
    e1 = make_loader(prepared_fmnist, "train", 16, train=True, binarize=True, epoch=1)
    e1_sorted = torch.cat(_all(e1))
    assert not torch.equal(e0, e1_sorted)


def test_test_set_binarization_is_fixed(prepared_fmnist: Path) -> None:
    a = torch.cat(_all(make_loader(prepared_fmnist, "test", 16, train=False, binarize=True, drop_last=False)))
    b = torch.cat(
        _all(
            make_loader(
                prepared_fmnist, "test", 7, train=False, binarize=True, seed=99, epoch=5, drop_last=False
            )
        )
    )
    assert set(a.unique().tolist()) <= {0.0, 1.0} and torch.equal(a, b)
    # the same samples under two ranks get the same bits as in one process
    r1 = _all(
        make_loader(
            prepared_fmnist, "test", 40, train=False, binarize=True, rank=1, world_size=2, drop_last=False
        )
    )
    assert torch.equal(r1[0], a[1::2])


def test_five_bit_values_are_multiples_of_one_31st(prepared_5bit: Path) -> None:
    x = torch.cat(_all(make_loader(prepared_5bit, "train", 3, train=False)))
    k = x * 31
    assert torch.allclose(k, k.round(), atol=1e-5) and x.max() <= 1.0
    assert np.array_equal(
        k.round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), load_split(prepared_5bit, "train")[:9]
    )


def test_workers_do_not_change_the_batches(prepared_cifar: Path) -> None:
    kw = {"train": True, "seed": 4, "epoch": 2}
    serial = _all(make_loader(prepared_cifar, "train", 8, **kw))
    parallel = _all(make_loader(prepared_cifar, "train", 8, num_workers=2, **kw))
    assert all(torch.equal(x, y) for x, y in zip(serial, parallel, strict=True))


def test_dali_backend_gives_the_same_batches_on_cpu(prepared_cifar: Path, prepared_fmnist: Path) -> None:
    for root, kw in (
        (prepared_cifar, {"train": True, "seed": 3, "epoch": 1, "start_batch": 1}),
        (prepared_fmnist, {"train": False, "binarize": True, "drop_last": False}),
    ):
        split = "train" if kw["train"] else "test"
        torch_batches = _all(make_loader(root, split, 8, backend="torch", **kw))
        dali_batches = _all(make_loader(root, split, 8, backend="dali", **kw))
        assert len(torch_batches) == len(dali_batches)
        assert all(torch.equal(x, y) for x, y in zip(torch_batches, dali_batches, strict=True))


@pytest.mark.gpu
def test_dali_iterator_on_gpu_matches_cpu(prepared_cifar: Path) -> None:
    kw = {"train": True, "seed": 3, "epoch": 1}
    cpu = _all(make_loader(prepared_cifar, "train", 8, **kw))
    gpu = _all(make_loader(prepared_cifar, "train", 8, device="cuda", **kw))
    assert gpu[0].is_cuda and all(torch.equal(x, y.cpu()) for x, y in zip(cpu, gpu, strict=True))


def test_prepared_dataset_exposes_the_manifest(prepared_cifar: Path) -> None:
    ds = PreparedDataset(prepared_cifar, "test")
    assert (ds.dataset, ds.bits, ds.shape, ds.flip, len(ds)) == ("cifar10", 8, (32, 32, 3), True, 8)
    assert ds[0].shape == (32, 32, 3)


def test_load_split_errors(tmp_path: Path, prepared_fmnist: Path) -> None:
    with pytest.raises(DataError, match="no split 'valid'; it has: "):
        load_split(prepared_fmnist, "valid")
    with pytest.raises(DataError, match="no manifest"):
        load_split(tmp_path, "train")
    broken = tmp_path / "broken"
    shutil.copytree(prepared_fmnist, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["splits"]["test"]["count"] = 41
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"test.npy: holds uint8 \(40, 28, 28, 1\); the manifest says"):
        load_split(broken, "test")


def test_loader_argument_errors(prepared_fmnist: Path) -> None:
    with pytest.raises(DataError, match="start_batch=7 is outside"):
        make_loader(prepared_fmnist, "train", 16, train=True, start_batch=7)
    with pytest.raises(DataError, match="rank=2 must be in"):
        make_loader(prepared_fmnist, "train", 16, train=True, rank=2, world_size=2)
    if not torch.cuda.is_available():
        with pytest.raises(DataError, match="no CUDA device"):
            make_loader(prepared_fmnist, "train", 16, train=True, device="cuda")
