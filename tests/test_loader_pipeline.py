"""The input pipeline's hand-over: uint8 images normalised by the consumer (bit-identical to
the old in-worker float path), batches built in shared memory with int metadata, and ONE
DataLoader for the whole run (make_stream) that equals the per-epoch loaders, resumes exactly
across an epoch boundary and starts its worker processes once."""

from __future__ import annotations

import json
import multiprocessing
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset
from torchvision.transforms.v2 import functional as F

import moco_mm.data.loader as loader_mod
from moco_mm.config import ConfigError, load_config
from moco_mm.data import DataError, LoaderState, ShardSource, build_transforms, make_loader, make_stream, pin_memory_for
from moco_mm.data.loader import make_legacy_loader
from tests.test_data import SIZE, L, check_batch, ids, make_shard_dir, same

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's: not exact in binary
CORRUPT = {5: {"png": b"\x89PNG but not really"}, 22: {"json": b"{not json"}}
EPOCHS = 3


@pytest.fixture(scope="module")
def transform():
    return build_transforms(SIZE, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), train=True, crop_scale_min=0.5)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """4 shards of 9, two corrupt samples (skipped in every epoch), two captions, groups."""
    src, _ = make_shard_dir(tmp_path_factory.mktemp("shards"), [9, 9, 9, 9], corrupt=CORRUPT, n_captions=2,
                            groups=True)
    return ShardSource.from_spec(src)


def common(tokenizer, transform) -> dict:
    return dict(batch_size=4, tokenizer=tokenizer, max_length=L, transform=transform, seed=0, shuffle_buffer=5)


def take(stream, n: int) -> list[dict]:
    out = []
    for batch in stream:
        out.append(batch)
        if len(out) == n:
            break
    return out


# ---------------------------------------------------------------------------------------
# uint8 out of the workers, normalised by the consumer
# ---------------------------------------------------------------------------------------


def old_transform(t, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
    """ImageTransform.__call__ as it was before uint8 hand-over, written out: the uint8
    geometry, then to_dtype(scale=True) and normalize on each image in the worker."""
    x = F.to_image(image)
    if t.train:
        top, left, h, w = t._crop_box(x.shape[-2], x.shape[-1], generator)
        x = F.resized_crop(x, top, left, h, w, [t.image_size, t.image_size], antialias=True)
        if t.hflip and torch.rand((), generator=generator).item() < 0.5:
            x = F.horizontal_flip(x)
    else:
        x = t._eval(x)
    x = F.to_dtype(x, torch.float32, scale=True)
    x = F.normalize(x, t.mean, t.std)
    return x.as_subclass(torch.Tensor)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_normalize_is_bit_identical_to_the_old_in_worker_float_path(train):
    t = build_transforms(24, MEAN, STD, train=train, crop_scale_min=0.3, hflip=True)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for h, w in ((20, 30), (64, 48), (24, 24), (31, 97), (100, 40), (7, 9))]
    seeds = range(len(images))
    old = torch.stack([old_transform(t, img, torch.Generator().manual_seed(s)) for img, s in zip(images, seeds)])
    new = [t(img, torch.Generator().manual_seed(s)) for img, s in zip(images, seeds)]
    assert all(x.dtype == torch.uint8 and x.shape == (3, 24, 24) for x in new)
    batch = torch.stack(new)
    got = t.normalize(batch)
    assert got.dtype == torch.float32 and got.shape == (len(images), 3, 24, 24)
    assert torch.equal(got, old)  # bit for bit: batching an elementwise op changes nothing
    assert torch.equal(t.normalize(new[3]), old[3])  # a single [3, H, W] image too
    assert torch.equal(batch, torch.stack(new))  # the input is left as it was
    with pytest.raises(TypeError, match="uint8"):
        t.normalize(got)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_normalize_on_the_device_matches_the_cpu():
    t = build_transforms(32, MEAN, STD, train=False)
    batch = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    got = t.normalize(batch.cuda())
    assert got.device.type == "cuda" and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), t.normalize(batch), rtol=0, atol=1e-6)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_normalise_to_the_legacy_float_batches(source, tokenizer, workers):
    t = build_transforms(SIZE, MEAN, STD, train=True)
    args = dict(batch_size=4, tokenizer=tokenizer, max_length=L, transform=t, seed=0, shuffle_buffer=5)
    new = list(make_loader(source, epoch=1, workers=workers, **args))
    old = list(make_legacy_loader(source, epoch=1, workers=workers, **args))
    assert len(new) == len(old) > 0
    for n, o in zip(new, old):
        assert o["image"].dtype == torch.float32 and n["image"].dtype == torch.uint8
        assert torch.equal(t.normalize(n["image"]), o["image"])
        for key in ("input_ids", "attention_mask", "sample_id", "fingerprints"):
            assert torch.equal(n[key], o[key]), key
        for key in ("n_skipped", "worker_id", "worker_pos", "step"):
            assert n[key] == int(o[key]), key
        assert n["epoch"] == 1


# ---------------------------------------------------------------------------------------
# Shared memory, int metadata
# ---------------------------------------------------------------------------------------

TENSORS = ("image", "input_ids", "attention_mask", "sample_id", "fingerprints")
INTS = ("n_skipped", "worker_id", "worker_pos", "epoch", "step")


class _SharedInWorker(IterableDataset):
    """Records, inside the worker and before the hand-over, whether every tensor of each
    batch already lives in shared memory (else the pickler copies it there)."""

    def __init__(self, inner):
        self.inner = inner

    def __iter__(self):
        for batch in self.inner:
            yield dict(batch, shared_in_worker=all(v.is_shared() for v in batch.values()
                                                   if isinstance(v, torch.Tensor)))


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_batches_are_built_in_shared_memory_with_int_metadata(source, tokenizer, transform, workers):
    with make_stream(source, state=LoaderState.start(0, workers), workers=workers,
                     **common(tokenizer, transform)) as stream:
        batches = take(stream, 5)
        # The same dataset under a plain DataLoader, to look inside the worker.
        probe = DataLoader(_SharedInWorker(stream.loader.dataset), batch_size=None, num_workers=workers)
        inside = [b["shared_in_worker"] for b in take(probe, 4)]
    for b in batches:
        check_batch(b, tokenizer, 4, groups=True)
        assert all(b[k].is_shared() for k in TENSORS)
        assert all(type(b[k]) is int for k in INTS)  # passed through the DataLoader unchanged
    assert inside == [True] * 4  # nothing left for the hand-over to copy
    # The old pipeline stacked in private memory: its hand-over copied every batch.
    legacy = make_legacy_loader(source, epoch=0, workers=workers, **common(tokenizer, transform))
    legacy_probe = DataLoader(_SharedInWorker(legacy.loader.dataset), batch_size=None, num_workers=workers)
    assert [b["shared_in_worker"] for b in take(legacy_probe, 2)] == [False] * 2


def test_the_main_process_stream_builds_private_tensors(source, tokenizer, transform):
    with make_stream(source, state=LoaderState.start(0, 0), **common(tokenizer, transform)) as stream:
        (b,) = take(stream, 1)
    assert not any(b[k].is_shared() for k in TENSORS) and all(type(b[k]) is int for k in INTS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs CUDA")
def test_pinned_batches_keep_int_metadata(source, tokenizer, transform):
    assert pin_memory_for("auto", "cuda") and not pin_memory_for("auto", "cpu")
    with make_stream(source, state=LoaderState.start(0, 2), workers=2, pin_memory=True,
                     **common(tokenizer, transform)) as stream:
        batches = take(stream, 3)
    for b in batches:
        assert all(b[k].is_pinned() for k in TENSORS) and all(type(b[k]) is int for k in INTS)


# ---------------------------------------------------------------------------------------
# One stream for the run
# ---------------------------------------------------------------------------------------


def per_epoch(source, tokenizer, transform, workers: int, epochs: int = EPOCHS) -> list[dict]:
    return [b for e in range(epochs) for b in make_loader(source, epoch=e, workers=workers,
                                                          **common(tokenizer, transform))]


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_stream_equals_the_concatenated_epochs(source, tokenizer, transform, workers):
    old = per_epoch(source, tokenizer, transform, workers)
    with make_stream(source, state=LoaderState.start(0, workers), workers=workers,
                     **common(tokenizer, transform)) as stream:
        n = stream.steps_per_epoch
        new = take(stream, len(old) + 1)
    assert len(old) == EPOCHS * n and same(new[:len(old)], old)
    assert [(b["epoch"], b["step"]) for b in new] == [(e, t) for e in range(EPOCHS) for t in range(n)] + [(3, 0)]
    assert [b["worker_id"] for b in new] == [t % max(workers, 1) for _ in range(EPOCHS) for t in range(n)] + [0]
    assert sum(b["n_skipped"] for b in new[:n]) == len(CORRUPT)  # both corrupt samples hit every epoch
    assert ids(new[:n]) != ids(new[n:2 * n])  # epochs really differ
    state = LoaderState.start(0, workers)
    for b in new:
        check_batch(b, tokenizer, 4, groups=True)
        state.update(b)  # follows the epoch changes
    positions = [new[-1]["worker_pos"]] + [0] * (max(workers, 1) - 1)  # epoch 3 has begun on reader 0
    offsets = [list(new[-1]["worker_offset"])] + [None] * (max(workers, 1) - 1)  # where a resume would read
    assert state.to_dict() == {"epoch": 3, "step": 1, "positions": positions, "offsets": offsets}


def test_resume_mid_epoch_across_the_epoch_boundary_is_exact(source, tokenizer, transform):
    workers = 2
    with make_stream(source, state=LoaderState.start(0, workers), workers=workers,
                     **common(tokenizer, transform)) as stream:
        n = stream.steps_per_epoch
        full = take(stream, EPOCHS * n)
    state = LoaderState.start(0, workers)
    saved = {}
    for s in range(1, len(full) + 1):
        state.update(full[s - 1])
        saved[s] = LoaderState.from_dict(json.loads(json.dumps(state.to_dict())))  # as a checkpoint would
    # The end of epoch 0 (step == steps_per_epoch), mid epoch 1 on either reader, its last batch.
    points = [n - 1, n, n + 1, n + 2, 2 * n - 1, 2 * n]
    skipped_before = False
    for s in points:
        st = saved[s]
        assert (st.epoch, st.step) == ((s - 1) // n, (s - 1) % n + 1)
        # Positions beyond batches * B: a reader skipped a corrupt sample before this point.
        skipped_before |= any(p != -(-(st.step - w) // workers) * 4 for w, p in enumerate(st.positions))
        with make_stream(source, state=st, workers=workers, **common(tokenizer, transform)) as stream:
            resumed = take(stream, len(full) - s + n)
        assert same(resumed[:len(full) - s], full[s:]), s
        # and it goes on into the epoch after the reference run's last one
        assert (resumed[len(full) - s]["epoch"], resumed[len(full) - s]["step"]) == (EPOCHS, 0)
    assert skipped_before  # the resume points lie past corrupt samples: positions mattered
    # A stream resumed from a state saved in epoch 1 equals make_loader's resume of that epoch.
    st = saved[n + 3]
    one_epoch = list(make_loader(source, epoch=st.epoch, start_step=st.step, positions=st.positions,
                                 workers=workers, **common(tokenizer, transform)))
    assert same(one_epoch, full[n + 3:2 * n])


def test_loader_state_follows_the_epoch_change_and_refuses_gaps():
    state = LoaderState(epoch=0, step=6, positions=[30, 28])
    with pytest.raises(DataError, match="skipped or replayed"):
        state.update({"epoch": 1, "step": 1, "worker_id": 1, "worker_pos": 4})
    with pytest.raises(DataError, match="skipped or replayed"):
        state.update({"epoch": 2, "step": 0, "worker_id": 0, "worker_pos": 4})
    state.update({"epoch": 1, "step": 0, "worker_id": 0, "worker_pos": 4})
    assert state.to_dict() == {"epoch": 1, "step": 1, "positions": [4, 0]}
    state.update({"epoch": 1, "step": 1, "worker_id": 1, "worker_pos": 5, "n_skipped": 1})
    assert state.to_dict() == {"epoch": 1, "step": 2, "positions": [4, 5]}


def test_stream_checks_its_state(source, tokenizer, transform):
    args = common(tokenizer, transform)
    with pytest.raises(ValueError, match="workers changed"):
        make_stream(source, state=LoaderState(0, 2, [8, 8]), workers=0, **args)
    with pytest.raises(ValueError, match="outside epoch 0"):
        make_stream(source, state=LoaderState(0, 99, [0]), **args)
    with pytest.raises(ValueError, match="prefetch_factor"):
        make_stream(source, state=LoaderState.start(0, 1), workers=1, prefetch_factor=0, **args)


_INIT_CALLS = multiprocessing.Value("i", 0)  # shared with the forked workers
_INIT_PIDS = multiprocessing.Array("i", 16)


def _counting_init(worker_id: int, _init=loader_mod._init_worker) -> None:
    with _INIT_CALLS.get_lock():
        _INIT_PIDS[_INIT_CALLS.value % 16] = os.getpid()
        _INIT_CALLS.value += 1
    _init(worker_id)


def test_the_stream_starts_its_workers_once(source, tokenizer, transform, monkeypatch):
    if multiprocessing.get_start_method() != "fork":
        pytest.skip("the counter is inherited by forked workers")
    monkeypatch.setattr(loader_mod, "_init_worker", _counting_init)
    _INIT_CALLS.value = 0
    with make_stream(source, state=LoaderState.start(0, 2), workers=2, **common(tokenizer, transform)) as stream:
        n = stream.steps_per_epoch
        first = take(stream, EPOCHS * n)
        assert first[-1]["epoch"] == EPOCHS - 1
        assert _INIT_CALLS.value == 2  # two workers, started once for all three epochs
        pids = set(_INIT_PIDS[:2])
        # Iterating again restarts the sequence at the start state with the same processes.
        again = take(stream, 3)
        assert same(again, first[:3]) and _INIT_CALLS.value == 2
        assert {w.pid for w in stream.loader._iterator._workers} == pids
    _INIT_CALLS.value = 0
    per_epoch(source, tokenizer, transform, workers=2)
    assert _INIT_CALLS.value == 2 * EPOCHS  # what make_loader per epoch costs


def test_data_config_has_the_loader_knobs():
    cfg = load_config()
    assert cfg.data.prefetch_factor == 2 and cfg.data.pin_memory == "auto"
    assert load_config(overrides=["data.pin_memory=true"]).data.pin_memory is True
    assert load_config(overrides=["data.pin_memory=false"]).data.pin_memory is False
    with pytest.raises(ConfigError, match="data.prefetch_factor"):
        load_config(overrides=["data.prefetch_factor=0"])
    with pytest.raises(ConfigError, match="data.pin_memory"):
        load_config(overrides=["data.pin_memory=sometimes"])
    assert pin_memory_for(True, "cpu") and not pin_memory_for(False, "cuda")
    assert pin_memory_for("auto", torch.device("cuda", 0)) and not pin_memory_for("auto", "cpu")
