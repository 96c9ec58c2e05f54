"""The training data stream: shards -> exact, resumable batches of equal shape on every rank.

Public API (all the trainer needs):

    source = ShardSource.from_spec(cfg.data.train)          # shard URLs + samples per shard
    transform = build_transforms(image_size, mean, std, train=True,
                                 crop_scale_min=cfg.data.crop_scale_min, hflip=cfg.data.hflip)
    n = steps_per_epoch(source, batch_size=B, world_size=W, workers=K)  # same for every epoch
    state = LoaderState.start(epoch, workers=K)             # or LoaderState.from_dict(saved)
    stream = make_stream(source, batch_size=B, tokenizer=tok, max_length=L, transform=transform,
                         seed=seed, state=state, rank=r, world_size=W, workers=K,
                         shuffle_buffer=..., max_consecutive_bad=...,
                         pin_memory=pin_memory_for(cfg.data.pin_memory, device),
                         prefetch_factor=cfg.data.prefetch_factor)
    for batch in stream:            # endless: epoch e from state.step on, then e + 1, e + 2, ...
        images = transform.normalize(batch["image"].to(device, non_blocking=True))  # float32
        ...train on images and the rest of the batch...
        state.update(batch)         # after the batch's effect is part of the run; it follows
                                    # the epoch change by itself
    stream.close()                  # stops the worker processes (also: `with make_stream(...)`)
    # checkpoint: store state.to_dict() of EVERY rank (step and epoch agree across ranks,
    # positions differ once a rank has skipped a corrupt sample); resume with
    # make_stream(..., state=LoaderState.from_dict(saved)).

    for batch in iter_eval_batches(ShardSource.from_spec(cfg.data.val), batch_size=...,
                                   transform=build_transforms(..., train=False), tokenizer=tok,
                                   max_length=L):      # every sample once, in order
        images = eval_transform.normalize(batch["image"].to(device))   # uint8 -> float32
        ...

`make_loader(..., epoch=e, start_step=s, positions=p)` yields the batches of one epoch only
(from batch s on), through a DataLoader of its own; the concatenation of make_loader epochs
e, e + 1, ... is exactly make_stream's sequence. make_stream starts its worker processes once
for the whole run; make_loader starts them per epoch (tests, tools, one-epoch benchmarks).

Batch (from `make_stream` and `make_loader`), B = batch_size, L = max_length:
    image          uint8   [B, 3, H, W]  the transformed pixels, NOT normalised: the consumer
                                         calls transform.normalize(image on its device)
    input_ids      int64   [B, L]        padded to L (fixed shape), truncated
    attention_mask int64   [B, L]
    sample_id      int64   [B]           stable ids written by make_shards
    fingerprints   int64   [B, 3]        columns (text, image, group), see data/fingerprints.py:
                                         text  = text_fingerprint(the caption in input_ids),
                                         image = KEY.json "image_fp" (stored pixels), or
                                                 bytes_fingerprint(image member) for older shards,
                                         group = group_fingerprint(KEY.json "group"), -1 if none.
                                         Equal values = exact duplicates (never mask on -1).
    n_skipped      int                   corrupt raw samples skipped while making this batch
    worker_id      int                   the logical reader (0..workers-1) that made it
    worker_pos     int                   raw samples that reader has consumed in this epoch
    worker_offset  tuple | None          (pass, input index, byte offset): where a resume of that
                                         reader starts reading (LoaderState.offsets), or None
    epoch          int                   the epoch the batch belongs to
    step           int                   index of this batch in its epoch (0-based)
The metadata are plain Python ints (no tensor, so reading them costs no device sync). With
workers > 0 the five tensors are built directly in shared memory by the worker (as torch's
default_collate does for its batches), so handing a batch to the main process copies no
pixels; with pin_memory the DataLoader then copies them once into page-locked memory.

How an epoch is laid out (a pure function of seed, epoch, world size, workers, batch size
and the shard list):
  * Readers: every rank has `max(workers, 1)` logical readers; reader `w` of rank `r` is slot
    `r * K + w` of `S = world_size * K` slots. workers=0 and workers=1 give the same stream.
  * Shards: the shard list is permuted with `random.Random(mix(seed, epoch))`, and shard
    `order[i]` goes to slot `i % S` (so there must be at least S shards).
  * Each reader streams its shards in that order through a shuffle buffer of
    `shuffle_buffer` raw samples (seeded from seed, epoch, slot). When it runs out before its
    quota (corrupt samples) it starts another pass over the same shards, with the same rng
    continuing, so it never yields fewer batches.
  * Quota: every reader yields `steps_per_epoch / K` batches, where
    `steps_per_epoch = K * floor(sum of the floor(N/S) smallest shard counts / B)`: a lower
    bound of what any reader gets under any permutation, so it is the same for every epoch,
    rank and reader. Samples a reader holds beyond its quota are dropped for this epoch
    (drop-last remainder; which ones changes every epoch with the permutation). Equal-size
    shards, N a multiple of S and B dividing N/S * shard size lose nothing.
  * Batch order: batch `t` of the epoch comes from reader `t % K`; PyTorch's DataLoader
    round-robins its workers in order, and a loader started at step `s` maps DataLoader
    worker `j` to reader `(s + j) % K`, so the order is the same. Because every reader
    yields the same number of batches per epoch, that mapping holds in every later epoch
    too: make_stream's worker j streams reader (s + j) % K's batches of epoch e, then its
    batches of e + 1, ..., and the round robin stays aligned across epoch boundaries.
  * Augmentation draws come from a torch.Generator seeded from (seed, epoch, slot, raw
    position); the caption of a multi-caption sample is chosen from (caption_seed, epoch,
    sample_id). No global RNG is touched. Fingerprints are a pure function of the sample's
    bytes and that caption choice, so they replay exactly too.

Exact resume (what the trainer must store): `LoaderState` = {epoch, step, positions}, where
`step` is the number of batches of this epoch already consumed and `positions[w]` is
`worker_pos` of the last consumed batch made by reader `w` (0 if none yet). Positions are per
rank; every rank must resume from its own. `LoaderState.update(batch)` maintains it (a batch
of epoch + 1 with step 0 starts the new epoch: step and positions restart from 0). Passing
`positions` makes the resumed stream identical to the uninterrupted one even when corrupt
samples were skipped; `start_step` alone (make_loader) assumes none were (position =
batches * B). A resumed reader rebuilds its shuffle buffer exactly without reading the
epoch again: the buffer's draws depend only on counts, so it replays the shuffle on input
indices (no I/O) to learn which inputs sit in the buffer, then reads from
`offsets[w]` = (pass, i0, byte offset) on, where i0 is the oldest input still buffered
(or the last one read): it seeks to that byte offset in a local uncompressed tar (a `pipe:`
or compressed shard is read from its start and skipped by count; whole earlier shards are
not opened), keeps the buffered inputs and continues. So a resume reads about
shuffle_buffer * ln(shuffle_buffer) raw samples back, not the epoch so far. Without offsets
(older states, or after a shard read back fewer samples than its manifest count, when the
index replay would be wrong) it re-reads (but does not decode) the raw samples before its
position, as before; both ways are bit-identical to the uninterrupted stream. A state whose step equals
steps_per_epoch (saved after an epoch's last batch) resumes at batch 0 of the next epoch.

Corrupt samples (missing members, undecodable image, bad json/caption, a KEY.json
"image_fp" that is not an integer in [0, 2**63) or a "group" that is not a string/integer) are skipped,
counted in `n_skipped` and logged at most once per `WARN_INTERVAL_S` per reader.
`max_consecutive_bad` consecutive raw samples that yield nothing raise `DataError` naming the
shard and the member names seen (e.g. tars whose members are not KEY.jpg/KEY.json/KEY.txt).
A shard that breaks off (truncated tar, failing `pipe:` command) ends early with a warning;
exactness assumes a shard reads back the same bytes on replay, so a transient remote failure
makes that reader's stream differ from the uninterrupted run from there on.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from moco_mm.data.fingerprints import text_fingerprint
from moco_mm.data.samples import RawSample, _BadSample, decode_sample, iter_raw_samples
from moco_mm.data.shard_io import split_name
from moco_mm.data.sources import DataError, ShardSource
from moco_mm.data.transforms import ImageTransform

__all__ = [
    "EpochPlan", "plan_epoch", "steps_per_epoch", "LoaderState", "EpochLoader", "make_loader",
    "BatchStream", "make_stream", "pin_memory_for", "iter_eval_batches", "choose_caption",
]

log = logging.getLogger(__name__)

WARN_INTERVAL_S = 60.0
# Defaults of data.pipe_retries / data.pipe_backoff_s (config.py).
PIPE_RETRIES = 3
PIPE_BACKOFF_S = 1.0
_MASK64 = (1 << 64) - 1
# Domain tags keep the streams derived from one seed independent of each other.
_TAG_SHARDS, _TAG_SAMPLES, _TAG_AUGMENT, _TAG_CAPTION = 1, 2, 3, 4


def _mix(*values: int) -> int:
    """A stable 64-bit hash of integers (splitmix64 chain); unlike hash(), fixed across runs."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h


class _Shuffle:
    """Buffer shuffle: fill `size` items, then emit a random one per new item, then drain.

    Draws depend only on how many items came in, never on their contents, which is what
    lets a resumed reader replay it from the item count alone (on input indices, see
    _ReaderStream.resume). `buf` may start non-empty (a rebuilt buffer): run() then goes on
    exactly as the interrupted run() would have.
    """

    def __init__(self, rng: random.Random, size: int, buf: list | None = None):
        self.rng = rng
        self.size = size
        self.buf: list = buf if buf is not None else []

    def run(self, items: Iterable) -> Iterator:
        size, buf, rng = self.size, self.buf, self.rng
        if size <= 1:
            yield from items
            return
        for item in items:
            if len(buf) < size:
                buf.append(item)
                continue
            j = rng.randrange(size)
            out, buf[j] = buf[j], item
            yield out
        while buf:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()


def _shuffled(items: Iterable[RawSample], rng: random.Random, size: int) -> Iterator[RawSample]:
    return _Shuffle(rng, size).run(items)


class _ReaderStream:
    """The endless raw stream of one reader: pass after pass over its shards, shuffled.

    `anchor()` says where a resume can start reading: (pass, i0, byte offset) of the oldest
    raw sample still in the shuffle buffer or the last one read, whichever is older; i0
    counts the pass's inputs (the reader's shards in order). None once a shard of this
    stream read back another number of samples than its manifest count (then the index
    replay would be wrong, and a resume reads everything before its position, as before).
    """

    def __init__(self, urls: Sequence[str], counts: Sequence[int], rng: random.Random, buffer: int, where: str,
                 retries: int = 0, backoff_s: float = 1.0):
        self.urls, self.counts = list(urls), list(counts)
        self.rng, self.size, self.where = rng, buffer, where
        self.retries, self.backoff_s = retries, backoff_s
        self.errors: list[str] = []
        self.exact = True  # every shard read so far gave its manifest count
        self.passno = 0
        self.last: tuple[int, int | None] | None = None  # (input index, offset) of the last raw read
        self.shuffle: _Shuffle | None = None
        self._gen: Iterator[RawSample] | None = None

    def _on_error(self, url: str, exc: BaseException) -> None:
        self.errors.append(f"{url}: {exc}")
        self.exact = False
        log.warning("%s: shard %s ended early: %s", self.where, url, exc)

    def _inputs(self, first: int = 0, offset: int | None = None) -> Iterator[tuple[int, RawSample]]:
        """(pass input index, raw) from input `first` on (`offset`: that sample's byte position)."""
        cum = 0
        for url, count in zip(self.urls, self.counts):
            if first >= cum + count:
                cum += count
                continue
            local = max(first - cum, 0)
            n = 0
            for raw in iter_raw_samples(url, self._on_error, count, start=local,
                                        offset=offset if local else None,
                                        retries=self.retries, backoff_s=self.backoff_s):
                if local + n >= count:
                    self.exact = False  # more samples than the manifest says
                i = cum + local + n
                n += 1
                self.last = (i, raw.offset)
                yield i, raw
            if local + n != count:
                self.exact = False
            cum += count

    def _passes(self, first_pass: Iterator[RawSample] | None, emitted: int) -> Iterator[RawSample]:
        if first_pass is not None:
            n = emitted
            for raw in first_pass:
                n += 1
                yield raw
            self._check_pass(n)
            self.passno += 1
        while True:
            self.shuffle = _Shuffle(self.rng, self.size)
            n = 0
            for _, raw in self.shuffle.run(self._inputs()):
                n += 1
                yield raw
            self._check_pass(n)
            self.passno += 1

    def _check_pass(self, n: int) -> None:
        if n == 0:
            detail = f"; errors: {self.errors[:3]}" if self.errors else ""
            raise DataError(f"{self.where}: a full pass over its shards {self.urls} produced no samples "
                            f"(empty tars, only directories/metadata, or unreadable){detail}")

    def __iter__(self) -> Iterator[RawSample]:
        return self

    def __next__(self) -> RawSample:
        if self._gen is None:
            self._gen = self._passes(None, 0)
        return next(self._gen)

    def close(self) -> None:
        if self._gen is not None:
            self._gen.close()  # type: ignore[attr-defined]

    def anchor(self) -> tuple[int, int, int | None] | None:
        """Where a resume after the raw samples yielded so far can start reading."""
        if not self.exact or self.last is None:
            return None
        buf = self.shuffle.buf if self.shuffle is not None and self.size > 1 else []
        i0, off = min([(i, raw.offset) for i, raw in buf] + [self.last], key=lambda t: t[0])
        return (self.passno, i0, off)

    def resume(self, pos: int, anchor: Sequence[int | None] | None) -> None:
        """Skip the first `pos` raw samples. With an anchor (anchor() of the run being
        resumed) the shuffle is replayed on input indices (no I/O) and only the raw samples
        from the anchor on are read: from its byte offset in a local plain tar, by count in a
        remote one, whole earlier shards not at all. Anything inconsistent falls back to
        reading all `pos` samples (the old way, also exact)."""
        if pos == 0:
            return
        plan = self._replay(pos, anchor) if anchor is not None else None
        if plan is None:
            for _ in range(pos):  # replay raw bytes only: nothing before `pos` is decoded
                next(self)
            return
        passno, buf_ids, consumed, emitted = plan
        i0, off = int(anchor[1]), anchor[2]  # type: ignore[index, arg-type]
        self.passno = passno
        inputs = self._inputs(i0, None if off is None else int(off))
        wanted = set(buf_ids)
        held: dict[int, RawSample] = {}
        for i, raw in inputs:  # from the anchor to the last input read: keep the buffered ones
            if i in wanted:
                held[i] = raw
            if i >= consumed - 1:
                break
        if len(held) != len(wanted):  # a shard read back short: the replay cannot be exact
            self.exact = False
            log.warning("%s: seek-resume found %d of %d buffered samples: the stream differs from the "
                        "uninterrupted run", self.where, len(held), len(wanted))
        self.shuffle = _Shuffle(self.rng, self.size, [(i, held[i]) for i in buf_ids if i in held])
        self._gen = self._passes((raw for _, raw in self.shuffle.run(inputs)), emitted)

    def _replay(self, pos: int, anchor: Sequence[int | None]) -> tuple[int, list[int], int, int] | None:
        """The shuffle of the first `pos` outputs replayed on input indices: (pass, buffered
        input indices in buffer order, inputs consumed in that pass, outputs of that pass),
        or None when it disagrees with `anchor`. On success self.rng is where reading would
        have left it."""
        total = sum(self.counts)
        if total == 0 or len(anchor) != 3:
            return None
        rng = random.Random()
        rng.setstate(self.rng.getstate())
        done = passno = 0
        consumed = 0

        def counted() -> Iterator[int]:
            nonlocal consumed
            for i in range(total):
                consumed = i + 1
                yield i

        while True:
            sim = _Shuffle(rng, self.size)
            consumed = emitted = 0
            for _ in sim.run(counted()):
                done += 1
                emitted += 1
                if done == pos:
                    break
            if done == pos:
                break
            passno += 1
        buf = [int(i) for i in sim.buf] if self.size > 1 else []
        i0 = min(buf + [consumed - 1])
        if anchor[0] != passno or anchor[1] != i0:
            log.warning("%s: saved resume offset %s does not match the replay (pass %d, sample %d): "
                        "reading the %d samples before the resume point instead", self.where,
                        list(anchor), passno, i0, pos)
            return None
        self.rng.setstate(rng.getstate())
        return passno, buf, consumed, emitted


def choose_caption(captions: Sequence[str], *, caption_seed: int, epoch: int, sample_id: int) -> str:
    """One caption per image per epoch, a pure function of (caption_seed, epoch, sample_id)."""
    if len(captions) == 1:
        return captions[0]
    return captions[_mix(caption_seed, epoch, sample_id, _TAG_CAPTION) % len(captions)]


# ---------------------------------------------------------------------------------------
# Epoch planning
# ---------------------------------------------------------------------------------------


def steps_per_epoch(source: ShardSource, *, batch_size: int, world_size: int = 1, workers: int = 0) -> int:
    """Batches every rank yields per epoch; identical for every epoch (see module docstring)."""
    if batch_size <= 0 or world_size <= 0 or workers < 0:
        raise ValueError(f"batch_size and world_size must be > 0, workers >= 0; got "
                         f"{batch_size}, {world_size}, {workers}")
    counts = source.require_counts()
    k = max(workers, 1)
    slots = world_size * k
    if len(counts) < slots:
        raise DataError(
            f"{len(counts)} shard(s) cannot feed {world_size} rank(s) x {k} reader(s) = {slots}: every "
            f"reader needs a shard of its own. Write more, smaller shards (make_shards "
            f"--samples-per-shard) or use fewer data.workers")
    per_slot = len(counts) // slots
    sure = sum(sorted(counts)[:per_slot])
    n = sure // batch_size
    if n == 0:
        raise DataError(
            f"data.batch_size {batch_size} exceeds the {sure} samples every reader is sure to get "
            f"({per_slot} shard(s) each of {len(counts)} with {world_size} x {k} readers): lower the "
            f"batch size or the worker count, or use more data")
    return n * k


@dataclass(frozen=True)
class EpochPlan:
    """Which shards each reader streams this epoch, and how many batches it yields."""

    world_size: int
    workers: int  # logical readers per rank (>= 1)
    batch_size: int
    order: tuple[int, ...]  # shard indices in this epoch's permuted order
    batches_per_worker: int

    @property
    def steps(self) -> int:
        return self.batches_per_worker * self.workers

    def shards_of(self, rank: int, worker: int) -> list[int]:
        slot = rank * self.workers + worker
        return list(self.order[slot::self.world_size * self.workers])


def plan_epoch(source: ShardSource, *, seed: int, epoch: int, batch_size: int, world_size: int = 1,
               workers: int = 0) -> EpochPlan:
    steps = steps_per_epoch(source, batch_size=batch_size, world_size=world_size, workers=workers)
    k = max(workers, 1)
    order = list(range(len(source)))
    random.Random(_mix(seed, epoch, _TAG_SHARDS)).shuffle(order)
    return EpochPlan(world_size, k, batch_size, tuple(order), steps // k)


def _batches_done(start_step: int, worker: int, workers: int) -> int:
    """Batches reader `worker` made among the first `start_step` of the epoch."""
    return max(0, -(-(start_step - worker) // workers))


# ---------------------------------------------------------------------------------------
# Resume state
# ---------------------------------------------------------------------------------------


@dataclass
class LoaderState:
    """Exactly what a trainer stores (per rank) to resume the data stream.

    epoch: the epoch being read; step: batches of it consumed; positions[w]: `worker_pos` of
    the last consumed batch of reader w in this epoch (0 if none). JSON-friendly via
    to_dict/from_dict. Resume with make_stream(..., state=s) and the same seed, world size,
    workers, batch size and shards. `update` follows the stream into the next epoch by
    itself. (One epoch at a time: make_loader(..., epoch=s.epoch, start_step=s.step,
    positions=s.positions), and once step equals steps_per_epoch, LoaderState.start(epoch + 1,
    workers) or just update() with the next epoch's first batch.)
    """

    epoch: int = 0
    step: int = 0
    positions: list[int] = field(default_factory=lambda: [0])
    # offsets[w]: `worker_offset` of reader w's last consumed batch: [pass, input index, byte
    # offset] where a resume starts reading (see _ReaderStream.anchor), or None (unknown:
    # a state saved before offsets existed, or a shard that read back short). Optional:
    # without it a resume re-reads the raw samples before `positions[w]`, as before.
    offsets: list | None = None

    @classmethod
    def start(cls, epoch: int, workers: int) -> "LoaderState":
        return cls(epoch, 0, [0] * max(workers, 1))

    def update(self, batch: dict) -> None:
        """Record that `batch` was consumed (call once per batch, in order).

        A batch of epoch + 1 must be that epoch's step 0: step and positions restart there
        (positions count raw samples within an epoch). Reads ints or 0-d tensors.
        """
        step = int(batch["step"])
        epoch = int(batch.get("epoch", self.epoch))
        if epoch != self.epoch:
            if epoch != self.epoch + 1 or step != 0:
                raise DataError(f"LoaderState: at epoch {self.epoch} step {self.step}, got a batch of epoch "
                                f"{epoch} step {step} (a batch was skipped or replayed)")
            self.epoch, self.step, self.positions = epoch, 0, [0] * len(self.positions)
            self.offsets = None
        if step != self.step:
            raise DataError(f"LoaderState: expected batch step {self.step}, got {step} (a batch was "
                            f"skipped or replayed)")
        self.step = step + 1
        w = int(batch["worker_id"])
        self.positions[w] = int(batch["worker_pos"])
        offset = batch.get("worker_offset")
        if offset is not None or self.offsets is not None:
            if self.offsets is None:
                self.offsets = [None] * len(self.positions)
            self.offsets[w] = None if offset is None else [None if v is None else int(v) for v in offset]

    def copy(self) -> "LoaderState":
        offsets = None if self.offsets is None else [None if o is None else list(o) for o in self.offsets]
        return LoaderState(self.epoch, self.step, list(self.positions), offsets)

    def to_dict(self) -> dict:
        """{"epoch", "step", "positions"} and, once any is known, "offsets" (older code and
        states without it: a resume then re-reads instead of seeking)."""
        d: dict = {"epoch": self.epoch, "step": self.step, "positions": list(self.positions)}
        if self.offsets is not None and any(o is not None for o in self.offsets):
            d["offsets"] = [None if o is None else list(o) for o in self.offsets]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoaderState":
        offsets = d.get("offsets")
        if offsets is not None:
            offsets = [None if o is None else [None if v is None else int(v) for v in o] for o in offsets]
        return cls(int(d["epoch"]), int(d["step"]), [int(p) for p in d["positions"]], offsets)


# ---------------------------------------------------------------------------------------
# The training stream
# ---------------------------------------------------------------------------------------


class _BadSampleLog:
    """Counts skipped samples; logs the first at once, then one summary per interval."""

    def __init__(self, where: str, interval_s: float = WARN_INTERVAL_S):
        self.where = where
        self.interval_s = interval_s
        self.total = 0
        self._since = 0
        self._last: float | None = None

    def record(self, raw: RawSample, reason: str) -> None:
        self.total += 1
        self._since += 1
        now = time.monotonic()
        if self._last is None or now - self._last >= self.interval_s:
            log.warning("%s: skipped %d corrupt sample(s) (%d so far); latest in %s: %s",
                        self.where, self._since, self.total, raw.url, reason)
            self._since = 0
            self._last = now


def _consecutive_bad_error(where: str, recent: Sequence[tuple[RawSample, str]], limit: int) -> DataError:
    shards = list(dict.fromkeys(r.url for r, _ in recent))
    names = [n for r, _ in list(recent)[-5:] for n in r.names][:12]
    exts = sorted({split_name(n)[1] or "<none>" for r, _ in recent for n in r.names})
    return DataError(
        f"{where}: {limit} consecutive samples yielded nothing; shard {shards[-1]} "
        f"(also {shards[:-1][-3:]}); member names seen: {names}; extensions seen: {exts}; "
        f"last reason: {recent[-1][1]}. Expected members KEY.jpg|png|webp with KEY.json "
        f"('sample_id', 'captions') and/or KEY.txt")


def _empty(shape: Sequence[int], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised CPU tensor; `shared`: its storage allocated in shared memory.

    A worker's batch crosses to the main process by handle when its storage is already
    shared; otherwise the pickler copies it into shared memory first (a second full copy).
    Allocating shared storage directly is what torch's default_collate does in workers
    (share_memory_() on a fresh tensor would copy too).
    """
    if not shared:
        return torch.empty(tuple(shape), dtype=dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes), 0, tuple(shape))


def _filled(values: torch.Tensor, dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """`values` as `dtype`, in shared memory when `shared` (one copy, inside the worker)."""
    if not shared:
        return values.to(dtype)
    return _empty(values.shape, dtype, True).copy_(values)


class _ReaderBatches(IterableDataset):
    """Whole batches of one rank: epochs `epoch`, `epoch + 1`, ... (`epochs` of them, None:
    endless), from batch `start_step` of the first epoch on; one instance per DataLoader
    worker (or the main process). Worker j streams reader (start_step + j) % K in every epoch.

    legacy: the pipeline before uint8 hand-over (images normalised to float32 per image in
    the worker, plain torch.stack, metadata as 0-d int64 tensors, no "epoch" key); kept only
    as the baseline of `moco-mm bench-loader`.
    """

    def __init__(self, *, source: ShardSource, rank: int, world_size: int, workers: int, batch_size: int,
                 tokenizer: Any, max_length: int, transform: ImageTransform, seed: int, caption_seed: int,
                 epoch: int, start_step: int, positions: list[int] | None, epochs: int | None,
                 shuffle_buffer: int, max_consecutive_bad: int, legacy: bool = False,
                 offsets: list | None = None, pipe_retries: int = 0, pipe_backoff_s: float = 1.0):
        super().__init__()
        self.offsets = offsets
        self.pipe_retries = pipe_retries
        self.pipe_backoff_s = pipe_backoff_s
        self.source = source
        self.rank = rank
        self.world_size = world_size
        self.workers = max(workers, 1)
        self.batch_size = batch_size
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.transform = transform
        self.seed = seed
        self.caption_seed = caption_seed
        self.epoch = epoch
        self.start_step = start_step
        self.positions = positions
        self.epochs = epochs
        self.shuffle_buffer = shuffle_buffer
        self.max_consecutive_bad = max_consecutive_bad
        self.legacy = legacy

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        # DataLoader worker j serves reader (start_step + j) % K, so that its first batch is
        # batch `start_step` and the in-order round robin reproduces the original sequence.
        # Every reader yields the same number of batches per epoch, so the same mapping
        # stays right in every later epoch.
        reader = (self.start_step + physical) % self.workers
        return self._epochs(reader)

    def _epochs(self, reader: int) -> Iterator[dict]:
        epochs = (itertools.count(self.epoch) if self.epochs is None
                  else range(self.epoch, self.epoch + self.epochs))
        start_step, positions, offsets = self.start_step, self.positions, self.offsets
        for epoch in epochs:
            plan = plan_epoch(self.source, seed=self.seed, epoch=epoch, batch_size=self.batch_size,
                              world_size=self.world_size, workers=self.workers)
            yield from self._reader_batches(plan, epoch, reader, start_step, positions, offsets)
            start_step, positions, offsets = 0, None, None  # later epochs: every reader from raw position 0

    def _reader_batches(self, plan: EpochPlan, epoch: int, reader: int, start_step: int,
                        positions: list[int] | None, offsets: list | None = None) -> Iterator[dict]:
        bsz = plan.batch_size
        slot = self.rank * plan.workers + reader
        where = f"rank {self.rank} reader {reader}"
        done = _batches_done(start_step, reader, plan.workers)
        remaining = plan.batches_per_worker - done
        if remaining <= 0:
            return
        pos = positions[reader] if positions is not None else done * bsz
        shards = plan.shards_of(self.rank, reader)
        rng = random.Random(_mix(self.seed, epoch, slot, _TAG_SAMPLES))
        stream = _ReaderStream([self.source.urls[i] for i in shards],
                               [self.source.require_counts()[i] for i in shards],
                               rng, self.shuffle_buffer, where, self.pipe_retries, self.pipe_backoff_s)
        bad_log = _BadSampleLog(where)
        recent: collections.deque[tuple[RawSample, str]] = collections.deque(maxlen=32)
        consecutive = 0
        try:
            anchor = offsets[reader] if offsets is not None and reader < len(offsets) else None
            stream.resume(pos, anchor)
            for k in range(remaining):
                images: list[torch.Tensor] = []
                captions: list[str] = []
                ids: list[int] = []
                fingerprints: list[tuple[int, int, int]] = []
                skipped = 0
                while len(images) < bsz:
                    raw = next(stream)
                    pos += 1
                    try:
                        dec = decode_sample(raw)
                        gen = torch.Generator().manual_seed(_mix(self.seed, epoch, slot, pos, _TAG_AUGMENT) >> 1)
                        image = self.transform(dec.image, gen)
                    except _BadSample as e:
                        skipped += 1
                        consecutive += 1
                        recent.append((raw, str(e)))
                        bad_log.record(raw, str(e))
                        if consecutive >= self.max_consecutive_bad:
                            raise _consecutive_bad_error(where, recent, self.max_consecutive_bad) from None
                        continue
                    consecutive = 0
                    images.append(self.transform.normalize(image) if self.legacy else image)
                    ids.append(dec.sample_id)
                    caption = choose_caption(dec.captions, caption_seed=self.caption_seed,
                                             epoch=epoch, sample_id=dec.sample_id)
                    captions.append(caption)
                    fingerprints.append((text_fingerprint(caption), dec.image_fp, dec.group_fp))
                step = reader + (done + k) * plan.workers
                batch = self._collate(images, captions, ids, fingerprints, skipped, reader, pos, epoch, step)
                if not self.legacy:
                    batch["worker_offset"] = stream.anchor()
                yield batch
        finally:
            stream.close()

    def _collate(self, images: list[torch.Tensor], captions: list[str], ids: list[int],
                 fingerprints: list[tuple[int, int, int]], skipped: int, reader: int, pos: int, epoch: int,
                 step: int) -> dict:
        tok = self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        b = len(captions)
        if tuple(tok["input_ids"].shape) != (b, self.max_length):
            raise DataError(f"tokenizer returned input_ids of shape {tuple(tok['input_ids'].shape)}, expected "
                            f"({b}, {self.max_length}); it must pad to max_length")
        sample_id = torch.tensor(ids, dtype=torch.int64)
        fps = torch.tensor(fingerprints, dtype=torch.int64).view(b, 3)
        if self.legacy:
            return {
                "image": torch.stack(images), "input_ids": tok["input_ids"].to(torch.int64),
                "attention_mask": tok["attention_mask"].to(torch.int64), "sample_id": sample_id,
                "fingerprints": fps, "n_skipped": torch.tensor(skipped, dtype=torch.int64),
                "worker_id": torch.tensor(reader, dtype=torch.int64),
                "worker_pos": torch.tensor(pos, dtype=torch.int64), "step": torch.tensor(step, dtype=torch.int64),
            }
        # In a worker every tensor is built in shared memory, so the hand-over to the main
        # process passes handles and copies nothing; the images are stacked straight into it.
        shared = get_worker_info() is not None
        image = torch.stack(images, out=_empty((b, *images[0].shape), images[0].dtype, shared))
        return {
            "image": image,
            "input_ids": _filled(tok["input_ids"], torch.int64, shared),
            "attention_mask": _filled(tok["attention_mask"], torch.int64, shared),
            "sample_id": _filled(sample_id, torch.int64, shared),
            "fingerprints": _filled(fps, torch.int64, shared),
            # Plain ints: the DataLoader (batch_size=None) and pin_memory pass them through
            # unchanged, and the trainer reads them without a tensor -> host sync.
            "n_skipped": skipped,
            "worker_id": reader,
            "worker_pos": pos,
            "epoch": epoch,
            "step": step,
        }


def _init_worker(worker_id: int) -> None:
    # Fast tokenizers' thread pool must not run inside forked workers (warning or deadlock);
    # one torch thread per worker keeps W workers from oversubscribing the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(1)


def _data_loader(dataset: _ReaderBatches, *, workers: int, pin_memory: bool, prefetch_factor: int, seed: int,
                 epoch: int, rank: int, persistent: bool) -> DataLoader:
    if workers > 0:
        # Set before the fork too: the tokenizers library warns in children of a parent
        # that has used its thread pool.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # DataLoader draws its workers' base seed from the global torch RNG unless given a
    # generator; that draw would shift the trainer's RNG (dropout) when a resumed run
    # creates its loader at another step than the uninterrupted run did.
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      worker_init_fn=_init_worker if workers > 0 else None,
                      prefetch_factor=prefetch_factor if workers > 0 else None,
                      persistent_workers=persistent and workers > 0,
                      generator=torch.Generator().manual_seed(_mix(seed, epoch, rank)))


def _check_args(rank: int, world_size: int, max_length: int, max_consecutive_bad: int, shuffle_buffer: int,
                workers: int, prefetch_factor: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if max_length <= 0 or max_consecutive_bad <= 0 or shuffle_buffer < 0:
        raise ValueError("max_length and max_consecutive_bad must be > 0, shuffle_buffer >= 0")
    if workers > 0 and prefetch_factor <= 0:
        raise ValueError(f"prefetch_factor must be > 0, got {prefetch_factor}")


class EpochLoader:
    """The batches of one epoch (from `start_step` on); `len()` is the number remaining."""

    def __init__(self, loader: DataLoader, plan: EpochPlan, start_step: int):
        self.loader = loader
        self.plan = plan
        self.start_step = start_step

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps

    def __len__(self) -> int:
        return self.plan.steps - self.start_step

    def __iter__(self) -> Iterator[dict]:
        if len(self) == 0:
            return
        it = iter(self.loader)
        try:
            yield from it
        finally:
            # Stop the worker processes now, also when the consumer stops early or a worker
            # raised: left to the garbage collector they linger (seconds per worker).
            shutdown = getattr(it, "_shutdown_workers", None)
            if callable(shutdown):
                shutdown()


def _epoch_loader(source: ShardSource, *, batch_size: int, tokenizer: Any, max_length: int,
                  transform: ImageTransform, seed: int, epoch: int, rank: int, world_size: int, workers: int,
                  start_step: int, positions: Sequence[int] | None, shuffle_buffer: int, max_consecutive_bad: int,
                  caption_seed: int | None, pin_memory: bool, prefetch_factor: int, legacy: bool,
                  offsets: Sequence | None = None, pipe_retries: int = 0,
                  pipe_backoff_s: float = 1.0) -> EpochLoader:
    _check_args(rank, world_size, max_length, max_consecutive_bad, shuffle_buffer, workers, prefetch_factor)
    plan = plan_epoch(source, seed=seed, epoch=epoch, batch_size=batch_size, world_size=world_size,
                      workers=workers)
    if not 0 <= start_step <= plan.steps:
        raise ValueError(f"start_step {start_step} is outside this epoch's {plan.steps} steps")
    pos_list = _check_positions(positions, start_step, plan) if positions is not None else None
    dataset = _ReaderBatches(
        source=source, rank=rank, world_size=world_size, workers=workers, batch_size=batch_size,
        tokenizer=tokenizer, max_length=max_length, transform=transform, seed=seed,
        caption_seed=seed if caption_seed is None else caption_seed, epoch=epoch, start_step=start_step,
        positions=pos_list, epochs=1, shuffle_buffer=shuffle_buffer, max_consecutive_bad=max_consecutive_bad,
        legacy=legacy, offsets=list(offsets) if offsets is not None and pos_list is not None else None,
        pipe_retries=pipe_retries, pipe_backoff_s=pipe_backoff_s)
    loader = _data_loader(dataset, workers=workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
                          seed=seed, epoch=epoch, rank=rank, persistent=False)
    return EpochLoader(loader, plan, start_step)


def make_loader(source: ShardSource, *, batch_size: int, tokenizer: Any, max_length: int,
                transform: ImageTransform, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                workers: int = 0, start_step: int = 0, positions: Sequence[int] | None = None,
                shuffle_buffer: int = 1000, max_consecutive_bad: int = 1000,
                caption_seed: int | None = None, pin_memory: bool = False,
                prefetch_factor: int = 2, offsets: Sequence | None = None,
                pipe_retries: int = PIPE_RETRIES, pipe_backoff_s: float = PIPE_BACKOFF_S) -> EpochLoader:
    """The batches of `epoch` for this rank, starting at batch `start_step`, through a
    DataLoader (and worker processes) of its own: for one epoch. A training run uses
    make_stream, whose sequence is the concatenation of these epochs.

    Batches as in the module docstring (uint8 images, int metadata).
    positions: the `LoaderState.positions` saved with `start_step` (one per reader); None
    derives them as batches * batch_size, exact only if no sample was corrupt.
    caption_seed: seed of the per-epoch caption choice (default: `seed`).
    offsets: the `LoaderState.offsets` saved with `positions` (None: re-read up to positions).
    pipe_retries, pipe_backoff_s: tries of a failing remote shard (iter_raw_samples).
    Every rank gets `steps_per_epoch(...)` batches of exactly `batch_size` samples.
    """
    return _epoch_loader(source, batch_size=batch_size, tokenizer=tokenizer, max_length=max_length,
                         transform=transform, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                         workers=workers, start_step=start_step, positions=positions,
                         shuffle_buffer=shuffle_buffer, max_consecutive_bad=max_consecutive_bad,
                         caption_seed=caption_seed, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
                         legacy=False, offsets=offsets, pipe_retries=pipe_retries, pipe_backoff_s=pipe_backoff_s)


def make_legacy_loader(source: ShardSource, *, batch_size: int, tokenizer: Any, max_length: int,
                       transform: ImageTransform, seed: int, epoch: int, workers: int = 0,
                       shuffle_buffer: int = 1000) -> EpochLoader:
    """One epoch through the pipeline as it was before uint8 hand-over: float32 images
    normalised per image in the worker, batches stacked in private memory (copied into
    shared memory again when they cross to the main process), metadata as 0-d tensors, a
    DataLoader per epoch. Same samples and values (images normalised). Only the baseline of
    `moco-mm bench-loader`; not part of the package API."""
    return _epoch_loader(source, batch_size=batch_size, tokenizer=tokenizer, max_length=max_length,
                         transform=transform, seed=seed, epoch=epoch, rank=0, world_size=1, workers=workers,
                         start_step=0, positions=None, shuffle_buffer=shuffle_buffer, max_consecutive_bad=1000,
                         caption_seed=None, pin_memory=False, prefetch_factor=2, legacy=True)


class BatchStream:
    """make_stream's endless training batches (layout and order: see the module docstring).

    Iterating yields the batches from `start` (the LoaderState make_stream was given) on,
    epoch after epoch, without end, through ONE DataLoader: its worker processes start at
    the first iteration and stay until close(). Iterating again (persistent workers)
    restarts the same sequence at `start` without new processes; to continue elsewhere
    (after restoring a checkpoint), close this stream and make a new one.
    steps_per_epoch: batches per epoch, the same for every epoch.
    """

    def __init__(self, loader: DataLoader, steps_per_epoch: int, start: LoaderState):
        self.loader = loader
        self.steps_per_epoch = steps_per_epoch
        self.start = start

    def __iter__(self) -> Iterator[dict]:
        return iter(self.loader)

    def close(self) -> None:
        """Stop the worker processes now (left to the garbage collector they linger)."""
        it = getattr(self.loader, "_iterator", None)  # the persistent workers' iterator
        shutdown = getattr(it, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()
        self.loader._iterator = None  # a later iteration starts fresh workers

    def __enter__(self) -> "BatchStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_stream(source: ShardSource, *, batch_size: int, tokenizer: Any, max_length: int,
                transform: ImageTransform, seed: int, state: LoaderState, rank: int = 0, world_size: int = 1,
                workers: int = 0, shuffle_buffer: int = 1000, max_consecutive_bad: int = 1000,
                caption_seed: int | None = None, pin_memory: bool = False,
                prefetch_factor: int = 2, pipe_retries: int = PIPE_RETRIES,
                pipe_backoff_s: float = PIPE_BACKOFF_S) -> BatchStream:
    """This rank's training batches for the whole run: epoch `state.epoch` from batch
    `state.step` on (readers at `state.positions`, exact across corrupt samples), then
    every later epoch from its start, endlessly, through one DataLoader whose `workers`
    processes start once (persistent). Bit-identical to the concatenation of
    make_loader(epoch=e, start_step=state.step, positions=state.positions),
    make_loader(epoch=e + 1), ...

    Batches as in the module docstring: uint8 images (normalise with transform.normalize on
    the device), int metadata with "epoch" and "step". `state` is copied, not updated: the
    caller keeps its own LoaderState current with state.update(batch).
    pin_memory: page-locked batches for non_blocking host-to-device copies (pin_memory_for).
    prefetch_factor: batches each worker prepares ahead (workers > 0).
    pipe_retries, pipe_backoff_s: a failing remote shard is read again up to pipe_retries
    times, after pipe_backoff_s * 2**k seconds (data.pipe_retries / data.pipe_backoff_s).
    """
    _check_args(rank, world_size, max_length, max_consecutive_bad, shuffle_buffer, workers, prefetch_factor)
    plan = plan_epoch(source, seed=seed, epoch=state.epoch, batch_size=batch_size, world_size=world_size,
                      workers=workers)
    if not 0 <= state.step <= plan.steps:
        raise ValueError(f"state.step {state.step} is outside epoch {state.epoch}'s {plan.steps} steps")
    positions = _check_positions(state.positions, state.step, plan)
    dataset = _ReaderBatches(
        source=source, rank=rank, world_size=world_size, workers=workers, batch_size=batch_size,
        tokenizer=tokenizer, max_length=max_length, transform=transform, seed=seed,
        caption_seed=seed if caption_seed is None else caption_seed, epoch=state.epoch, start_step=state.step,
        positions=positions, epochs=None, shuffle_buffer=shuffle_buffer, max_consecutive_bad=max_consecutive_bad,
        offsets=list(state.offsets) if state.offsets is not None else None, pipe_retries=pipe_retries,
        pipe_backoff_s=pipe_backoff_s)
    loader = _data_loader(dataset, workers=workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
                          seed=seed, epoch=state.epoch, rank=rank, persistent=True)
    return BatchStream(loader, plan.steps, state.copy())


def pin_memory_for(setting: bool | str, device: torch.device | str) -> bool:
    """data.pin_memory -> the DataLoader's pin_memory. True/False as given; "auto": pin when
    batches go to a CUDA device (page-locked memory lets `.to(device, non_blocking=True)`
    overlap the copy with compute; for a CPU run it would only cost a copy)."""
    if isinstance(setting, bool):
        return setting
    if setting == "auto":
        return torch.device(device).type == "cuda"
    raise ValueError(f"pin_memory: true, false or 'auto', got {setting!r}")


def _check_positions(positions: Sequence[int], start_step: int, plan: EpochPlan) -> list[int]:
    pos = [int(p) for p in positions]
    if len(pos) != plan.workers:
        raise ValueError(f"resume positions hold {len(pos)} reader(s) but this loader has {plan.workers} "
                         f"(data.workers changed?): the batch sequence depends on the worker count")
    for w, p in enumerate(pos):
        done = _batches_done(start_step, w, plan.workers)
        if p < done * plan.batch_size or (done == 0 and p != 0):
            raise ValueError(f"resume position {p} of reader {w} is impossible after {done} batch(es) of "
                             f"{plan.batch_size} at step {start_step}: state from another run or config?")
    return pos


# ---------------------------------------------------------------------------------------
# Evaluation stream
# ---------------------------------------------------------------------------------------


def iter_eval_batches(source: ShardSource, *, batch_size: int, transform: ImageTransform,
                      tokenizer: Any = None, max_length: int | None = None, rank: int = 0,
                      world_size: int = 1, max_samples: int | None = None,
                      max_consecutive_bad: int = 1000, block: int = 1, pipe_retries: int = PIPE_RETRIES,
                      pipe_backoff_s: float = PIPE_BACKOFF_S) -> Iterator[dict]:
    """Every good sample of `source` once, in shard and tar order (no shuffle, no drop-last).

    Raw sample k (global order, counting corrupt ones) belongs to rank (k // block) %
    world_size: block=1 deals samples out one by one; block=batch_size deals out whole
    batches, so that (without corrupt samples) every rank's batches are exactly the batches a
    single process would form, and embed to the same bits. `max_samples` keeps the first
    max_samples raw samples. Batches hold up to batch_size:
        image [b,3,H,W] uint8 (the eval transform's pixels, NOT normalised: the consumer calls
              transform.normalize(image on its device) -> float32), sample_id [b] int64,
        position [b] int64 (each sample's raw index k: the global order, whatever the rank),
        captions list[list[str]] (all of them), n_skipped int64 [], and with a tokenizer,
        every caption flattened in order:
        input_ids [c,L] int64, attention_mask [c,L] int64, caption_sample_id [c] int64.
    `image` is torch.stack of whatever `transform` returns (an ImageTransform: uint8).
    """
    if tokenizer is not None and not max_length:
        raise ValueError("iter_eval_batches: a tokenizer needs max_length")
    if block < 1:
        raise ValueError(f"iter_eval_batches: block must be >= 1, got {block}")
    where = f"eval rank {rank}"
    bad_log = _BadSampleLog(where)
    recent: collections.deque[tuple[RawSample, str]] = collections.deque(maxlen=32)
    consecutive = skipped = yielded = 0
    images: list[torch.Tensor] = []
    ids: list[int] = []
    positions: list[int] = []
    caps: list[list[str]] = []

    def on_error(url: str, exc: BaseException) -> None:
        log.warning("%s: shard %s ended early: %s", where, url, exc)

    def flush() -> dict:
        nonlocal skipped
        batch: dict[str, Any] = {"image": torch.stack(images), "sample_id": torch.tensor(ids, dtype=torch.int64),
                                 "position": torch.tensor(positions, dtype=torch.int64),
                                 "captions": [list(c) for c in caps],
                                 "n_skipped": torch.tensor(skipped, dtype=torch.int64)}
        if tokenizer is not None:
            flat = [c for cs in caps for c in cs]
            tok = tokenizer(flat, padding="max_length", truncation=True, max_length=max_length,
                            return_tensors="pt")
            batch["input_ids"] = tok["input_ids"].to(torch.int64)
            batch["attention_mask"] = tok["attention_mask"].to(torch.int64)
            batch["caption_sample_id"] = torch.tensor([i for i, cs in zip(ids, caps) for _ in cs],
                                                      dtype=torch.int64)
        images.clear()
        ids.clear()
        positions.clear()
        caps.clear()
        skipped = 0
        return batch

    counts = source.counts or (None,) * len(source.urls)
    raws = itertools.chain.from_iterable(
        iter_raw_samples(u, on_error, c, retries=pipe_retries, backoff_s=pipe_backoff_s)
        for u, c in zip(source.urls, counts))
    for k, raw in enumerate(raws):
        if max_samples is not None and k >= max_samples:
            break
        if (k // block) % world_size != rank:
            continue
        try:
            dec = decode_sample(raw)
        except _BadSample as e:
            skipped += 1
            consecutive += 1
            recent.append((raw, str(e)))
            bad_log.record(raw, str(e))
            if consecutive >= max_consecutive_bad:
                raise _consecutive_bad_error(where, recent, max_consecutive_bad) from None
            continue
        consecutive = 0
        images.append(transform(dec.image))
        ids.append(dec.sample_id)
        positions.append(k)
        caps.append(dec.captions)
        if len(images) == batch_size:
            yielded += len(images)
            yield flush()
    if images:
        yielded += len(images)
        yield flush()
    if yielded == 0 and recent:
        raise _consecutive_bad_error(where, recent, len(recent))
