"""The training data stream: shards -> exact, resumable batches of equal shape on every rank.

Public API (all the trainer needs):

    source = ShardSource.from_spec(cfg.data.train)          # shard URLs + samples per shard
    transform = build_transforms(image_size, mean, std, train=True,
                                 crop_scale_min=cfg.data.crop_scale_min, hflip=cfg.data.hflip)
    n = steps_per_epoch(source, batch_size=B, world_size=W, workers=K)  # same for every epoch
    state = LoaderState.start(epoch, workers=K)             # or LoaderState.from_dict(saved)
    loader = make_loader(source, batch_size=B, tokenizer=tok, max_length=L, transform=transform,
                         seed=seed, epoch=state.epoch, rank=r, world_size=W, workers=K,
                         start_step=state.step, positions=state.positions,
                         shuffle_buffer=..., max_consecutive_bad=...)
    for batch in loader:            # len(loader) == n - state.step
        ...train on batch...
        state.update(batch)         # after the batch's effect is part of the run
    # checkpoint: store state.to_dict() of EVERY rank (step and epoch agree across ranks,
    # positions differ once a rank has skipped a corrupt sample); when state.step reaches
    # len(loader) + start_step the epoch is over: continue with LoaderState.start(epoch + 1, K)

    for batch in iter_eval_batches(ShardSource.from_spec(cfg.data.val), batch_size=...,
                                   transform=build_transforms(..., train=False), tokenizer=tok,
                                   max_length=L):      # every sample once, in order
        ...

Batch (from `make_loader`), B = batch_size, L = max_length:
    image          float32 [B, 3, H, W]  normalised with the caller's mean/std
    input_ids      int64   [B, L]        padded to L (fixed shape), truncated
    attention_mask int64   [B, L]
    sample_id      int64   [B]           stable ids written by make_shards
    fingerprints   int64   [B, 3]        columns (text, image, group), see data/fingerprints.py:
                                         text  = text_fingerprint(the caption in input_ids),
                                         image = KEY.json "image_fp" (stored pixels), or
                                                 bytes_fingerprint(image member) for older shards,
                                         group = group_fingerprint(KEY.json "group"), -1 if none.
                                         Equal values = exact duplicates (never mask on -1).
    n_skipped      int64   []            corrupt raw samples skipped while making this batch
    worker_id      int64   []            the logical reader (0..workers-1) that made it
    worker_pos     int64   []            raw samples that reader has consumed after it
    step           int64   []            index of this batch in the epoch (0-based)

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
    round-robins its workers in order, and a resumed loader maps DataLoader worker `j` to
    reader `(start_step + j) % K`, so the order is the same.
  * Augmentation draws come from a torch.Generator seeded from (seed, epoch, slot, raw
    position); the caption of a multi-caption sample is chosen from (caption_seed, epoch,
    sample_id). No global RNG is touched. Fingerprints are a pure function of the sample's
    bytes and that caption choice, so they replay exactly too.

Exact resume (what the trainer must store): `LoaderState` = {epoch, step, positions}, where
`step` is the number of batches of this epoch already consumed and `positions[w]` is
`worker_pos` of the last consumed batch made by reader `w` (0 if none yet). Positions are per
rank; every rank must resume from its own. `LoaderState.update(batch)` maintains it. Passing
`positions` makes the resumed stream identical to the uninterrupted one even when corrupt
samples were skipped; `start_step` alone assumes none were (position = batches * B). A
resumed reader re-reads (but does not decode) the raw samples before its position, so the
shuffle buffer is rebuilt exactly.

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
    "iter_eval_batches", "choose_caption",
]

log = logging.getLogger(__name__)

WARN_INTERVAL_S = 60.0
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


def _shuffled(items: Iterable[RawSample], rng: random.Random, size: int) -> Iterator[RawSample]:
    """Buffer shuffle: fill `size` items, then emit a random one per new item, then drain.

    Draws depend only on how many items came in, never on their contents, which is what
    lets a resumed reader replay it from raw bytes alone.
    """
    if size <= 1:
        yield from items
        return
    buf: list[RawSample] = []
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


def _reader_stream(urls: Sequence[str], counts: Sequence[int], rng: random.Random, buffer: int,
                   where: str) -> Iterator[RawSample]:
    """The endless raw stream of one reader: pass after pass over its shards, shuffled."""
    errors: list[str] = []

    def on_error(url: str, exc: BaseException) -> None:
        errors.append(f"{url}: {exc}")
        log.warning("%s: shard %s ended early: %s", where, url, exc)

    for _ in itertools.count():
        n = 0
        chained = itertools.chain.from_iterable(
            iter_raw_samples(u, on_error, c) for u, c in zip(urls, counts))
        for raw in _shuffled(chained, rng, buffer):
            n += 1
            yield raw
        if n == 0:
            detail = f"; errors: {errors[:3]}" if errors else ""
            raise DataError(f"{where}: a full pass over its shards {list(urls)} produced no samples "
                            f"(empty tars, only directories/metadata, or unreadable){detail}")


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
    the last consumed batch of reader w (0 if none). JSON-friendly via to_dict/from_dict.
    Resume with make_loader(..., epoch=s.epoch, start_step=s.step, positions=s.positions) and
    the same seed, world size, workers, batch size and shards; once step equals the epoch's
    steps_per_epoch, begin the next epoch with LoaderState.start(epoch + 1, workers).
    """

    epoch: int = 0
    step: int = 0
    positions: list[int] = field(default_factory=lambda: [0])

    @classmethod
    def start(cls, epoch: int, workers: int) -> "LoaderState":
        return cls(epoch, 0, [0] * max(workers, 1))

    def update(self, batch: dict) -> None:
        """Record that `batch` was consumed (call once per batch, in order)."""
        step = int(batch["step"])
        if step != self.step:
            raise DataError(f"LoaderState: expected batch step {self.step}, got {step} (a batch was "
                            f"skipped or replayed)")
        self.step = step + 1
        self.positions[int(batch["worker_id"])] = int(batch["worker_pos"])

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "positions": list(self.positions)}

    @classmethod
    def from_dict(cls, d: dict) -> "LoaderState":
        return cls(int(d["epoch"]), int(d["step"]), [int(p) for p in d["positions"]])


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


class _EpochBatches(IterableDataset):
    """Yields whole batches; one instance per DataLoader worker (or the main process)."""

    def __init__(self, *, source: ShardSource, plan: EpochPlan, rank: int, tokenizer: Any,
                 max_length: int, transform: ImageTransform, seed: int, epoch: int, caption_seed: int,
                 start_step: int, positions: list[int] | None, shuffle_buffer: int,
                 max_consecutive_bad: int):
        super().__init__()
        self.source = source
        self.plan = plan
        self.rank = rank
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.transform = transform
        self.seed = seed
        self.epoch = epoch
        self.caption_seed = caption_seed
        self.start_step = start_step
        self.positions = positions
        self.shuffle_buffer = shuffle_buffer
        self.max_consecutive_bad = max_consecutive_bad

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        # DataLoader worker j serves reader (start_step + j) % K, so that its first batch is
        # batch `start_step` and the in-order round robin reproduces the original sequence.
        reader = (self.start_step + physical) % self.plan.workers
        return self._reader_batches(reader)

    def _reader_batches(self, reader: int) -> Iterator[dict]:
        plan, bsz = self.plan, self.plan.batch_size
        slot = self.rank * plan.workers + reader
        where = f"rank {self.rank} reader {reader}"
        done = _batches_done(self.start_step, reader, plan.workers)
        remaining = plan.batches_per_worker - done
        if remaining <= 0:
            return
        pos = self.positions[reader] if self.positions is not None else done * bsz
        shards = plan.shards_of(self.rank, reader)
        rng = random.Random(_mix(self.seed, self.epoch, slot, _TAG_SAMPLES))
        stream = _reader_stream([self.source.urls[i] for i in shards],
                                [self.source.require_counts()[i] for i in shards],
                                rng, self.shuffle_buffer, where)
        bad_log = _BadSampleLog(where)
        recent: collections.deque[tuple[RawSample, str]] = collections.deque(maxlen=32)
        consecutive = 0
        try:
            for _ in range(pos):  # replay raw bytes only: nothing before `pos` is decoded
                next(stream)
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
                        gen = torch.Generator().manual_seed(
                            _mix(self.seed, self.epoch, slot, pos, _TAG_AUGMENT) >> 1)
                        images.append(self.transform(dec.image, gen))
                    except _BadSample as e:
                        skipped += 1
                        consecutive += 1
                        recent.append((raw, str(e)))
                        bad_log.record(raw, str(e))
                        if consecutive >= self.max_consecutive_bad:
                            raise _consecutive_bad_error(where, recent, self.max_consecutive_bad) from None
                        continue
                    consecutive = 0
                    ids.append(dec.sample_id)
                    caption = choose_caption(dec.captions, caption_seed=self.caption_seed,
                                             epoch=self.epoch, sample_id=dec.sample_id)
                    captions.append(caption)
                    fingerprints.append((text_fingerprint(caption), dec.image_fp, dec.group_fp))
                yield self._collate(images, captions, ids, fingerprints, skipped, reader, pos,
                                    reader + (done + k) * plan.workers)
        finally:
            stream.close()

    def _collate(self, images: list[torch.Tensor], captions: list[str], ids: list[int],
                 fingerprints: list[tuple[int, int, int]], skipped: int, reader: int, pos: int, step: int) -> dict:
        tok = self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        input_ids = tok["input_ids"].to(torch.int64)
        if input_ids.shape != (len(captions), self.max_length):
            raise DataError(f"tokenizer returned input_ids of shape {tuple(input_ids.shape)}, expected "
                            f"({len(captions)}, {self.max_length}); it must pad to max_length")
        return {
            "image": torch.stack(images),
            "input_ids": input_ids,
            "attention_mask": tok["attention_mask"].to(torch.int64),
            "sample_id": torch.tensor(ids, dtype=torch.int64),
            "fingerprints": torch.tensor(fingerprints, dtype=torch.int64).view(len(ids), 3),
            "n_skipped": torch.tensor(skipped, dtype=torch.int64),
            "worker_id": torch.tensor(reader, dtype=torch.int64),
            "worker_pos": torch.tensor(pos, dtype=torch.int64),
            "step": torch.tensor(step, dtype=torch.int64),
        }


def _init_worker(worker_id: int) -> None:
    # Fast tokenizers' thread pool must not run inside forked workers (warning or deadlock);
    # one torch thread per worker keeps W workers from oversubscribing the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(1)


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


def make_loader(source: ShardSource, *, batch_size: int, tokenizer: Any, max_length: int,
                transform: ImageTransform, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                workers: int = 0, start_step: int = 0, positions: Sequence[int] | None = None,
                shuffle_buffer: int = 1000, max_consecutive_bad: int = 1000,
                caption_seed: int | None = None, pin_memory: bool = False,
                prefetch_factor: int = 2) -> EpochLoader:
    """The batches of `epoch` for this rank, starting at batch `start_step`.

    positions: the `LoaderState.positions` saved with `start_step` (one per reader); None
    derives them as batches * batch_size, exact only if no sample was corrupt.
    caption_seed: seed of the per-epoch caption choice (default: `seed`).
    Every rank gets `steps_per_epoch(...)` batches of exactly `batch_size` samples.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if max_length <= 0 or max_consecutive_bad <= 0 or shuffle_buffer < 0:
        raise ValueError("max_length and max_consecutive_bad must be > 0, shuffle_buffer >= 0")
    plan = plan_epoch(source, seed=seed, epoch=epoch, batch_size=batch_size, world_size=world_size,
                      workers=workers)
    if not 0 <= start_step <= plan.steps:
        raise ValueError(f"start_step {start_step} is outside this epoch's {plan.steps} steps")
    pos_list = _check_positions(positions, start_step, plan) if positions is not None else None
    dataset = _EpochBatches(
        source=source, plan=plan, rank=rank, tokenizer=tokenizer, max_length=max_length,
        transform=transform, seed=seed, epoch=epoch,
        caption_seed=seed if caption_seed is None else caption_seed, start_step=start_step,
        positions=pos_list, shuffle_buffer=shuffle_buffer, max_consecutive_bad=max_consecutive_bad)
    if workers > 0:
        # Set before the fork too: the tokenizers library warns in children of a parent
        # that has used its thread pool.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # DataLoader draws its workers' base seed from the global torch RNG unless given a
    # generator; that draw would shift the trainer's RNG (dropout) when a resumed run
    # creates its loader at another step than the uninterrupted run did.
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                        worker_init_fn=_init_worker if workers > 0 else None,
                        prefetch_factor=prefetch_factor if workers > 0 else None,
                        generator=torch.Generator().manual_seed(_mix(seed, epoch, rank)))
    return EpochLoader(loader, plan, start_step)


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
                      max_consecutive_bad: int = 1000) -> Iterator[dict]:
    """Every good sample of `source` once, in shard and tar order (no shuffle, no drop-last).

    Raw sample k (global order, counting corrupt ones) belongs to rank k % world_size;
    `max_samples` keeps the first max_samples raw samples. Batches hold up to batch_size:
        image [b,3,H,W] float32, sample_id [b] int64, captions list[list[str]] (all of them),
        n_skipped int64 [], and with a tokenizer, every caption flattened in order:
        input_ids [c,L] int64, attention_mask [c,L] int64, caption_sample_id [c] int64.
    """
    if tokenizer is not None and not max_length:
        raise ValueError("iter_eval_batches: a tokenizer needs max_length")
    where = f"eval rank {rank}"
    bad_log = _BadSampleLog(where)
    recent: collections.deque[tuple[RawSample, str]] = collections.deque(maxlen=32)
    consecutive = skipped = yielded = 0
    images: list[torch.Tensor] = []
    ids: list[int] = []
    caps: list[list[str]] = []

    def on_error(url: str, exc: BaseException) -> None:
        log.warning("%s: shard %s ended early: %s", where, url, exc)

    def flush() -> dict:
        nonlocal skipped
        batch: dict[str, Any] = {"image": torch.stack(images), "sample_id": torch.tensor(ids, dtype=torch.int64),
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
        caps.clear()
        skipped = 0
        return batch

    counts = source.counts or (None,) * len(source.urls)
    raws = itertools.chain.from_iterable(iter_raw_samples(u, on_error, c) for u, c in zip(source.urls, counts))
    for k, raw in enumerate(raws):
        if max_samples is not None and k >= max_samples:
            break
        if k % world_size != rank:
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
        caps.append(dec.captions)
        if len(images) == batch_size:
            yielded += len(images)
            yield flush()
    if images:
        yielded += len(images)
        yield flush()
    if yielded == 0 and recent:
        raise _consecutive_bad_error(where, recent, len(recent))
