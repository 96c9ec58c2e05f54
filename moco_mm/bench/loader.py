"""Loader throughput (read + decode + augment + tokenise + batch + hand-over) on the demo shards.

    moco-mm bench-loader [--data data/demo] [--workers 0,1,2] [--batch-size 64] [--epochs 2]
                         [--repeats 3] [--compare-legacy] [--device cpu]

Builds the demo dataset first if `--data` holds no complete build (a few seconds). For each
worker count it runs `--epochs` whole epochs, as a training run consumes them, `--repeats`
times, and prints the median samples/s (worker start-up included) and the bytes of one batch
as handed from a worker to the main process:

  stream  make_stream: uint8 images collated into shared memory in the worker, int metadata,
          ONE DataLoader (persistent workers) for all epochs; the consumer normalises on
          `--device` (transform.normalize), pinning on CUDA.
  legacy  (--compare-legacy) the pipeline before: float32 images normalised in the worker,
          batches copied into shared memory at hand-over, 0-d tensor metadata, a new
          DataLoader (new worker processes) every epoch, no pinned memory.

Both pipelines yield the same samples and, once normalised, the same float values. The
repeats alternate between the pipelines, so that a load change on a shared machine hits both.
Last, the hand-over alone: what pickling a batch for the main process costs inside a worker
(the legacy batch is copied into shared memory there; the stream's already lives in it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def batch_bytes(batch: dict) -> tuple[int, int]:
    """(bytes, tensors) of a batch's tensors: what crosses from a worker to the main process
    (each tensor is one shared-memory segment; ints travel inside the pickle)."""
    import torch

    tensors = [v for v in batch.values() if isinstance(v, torch.Tensor)]
    return sum(t.nbytes for t in tensors), len(tensors)


def handover_seconds(dataset, batches: int) -> list[float]:
    """Seconds ForkingPickler.dumps takes per batch inside one DataLoader worker: the work the
    hand-over to the main process does there (tensors not yet in shared memory are copied
    into it; shared ones pass as handles). The batches themselves are dropped."""
    from multiprocessing.reduction import ForkingPickler

    from torch.utils.data import DataLoader, IterableDataset

    class Probe(IterableDataset):
        def __iter__(self):
            for _, batch in zip(range(batches), dataset):
                start = time.perf_counter()
                ForkingPickler.dumps(batch)
                yield time.perf_counter() - start

    return list(DataLoader(Probe(), batch_size=None, num_workers=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moco-mm bench-loader", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/demo", help="demo folder (built if missing)")
    ap.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2, help="whole epochs per measurement (>= 2 shows the "
                                                          "per-epoch worker start-up of the legacy loader)")
    ap.add_argument("--repeats", type=int, default=3, help="measurements per setting; the median is shown")
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--compare-legacy", action="store_true",
                    help="also measure the previous pipeline (float32 in the worker, a loader per epoch)")
    ap.add_argument("--device", default="cpu", help="where the consumer moves (and normalises) the images")
    args = ap.parse_args(argv)
    if args.epochs < 1 or args.repeats < 1:
        ap.error("--epochs and --repeats must be >= 1")

    import torch
    from transformers import AutoTokenizer

    from moco_mm.data import LoaderState, ShardSource, build_transforms, make_stream, pin_memory_for, steps_per_epoch
    from moco_mm.data.demo import DemoParams, build_demo
    from moco_mm.data.loader import make_legacy_loader

    device = torch.device(args.device)
    paths = build_demo(args.data)
    image_size = DemoParams().image_size
    tokenizer = AutoTokenizer.from_pretrained(str(paths.tokenizer))
    source = ShardSource.from_spec(paths.train)
    transform = build_transforms(image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), train=True)
    torch.set_num_threads(1)  # the main process only receives batches; keep the comparison fair
    common = dict(batch_size=args.batch_size, tokenizer=tokenizer, max_length=args.max_length, transform=transform,
                  seed=0, shuffle_buffer=1000)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run_stream(workers: int, n: int) -> tuple[float, dict]:
        start = time.perf_counter()
        stream = make_stream(source, state=LoaderState.start(0, workers), workers=workers,
                             pin_memory=pin_memory_for("auto", device), **common)
        with stream:
            for i, batch in enumerate(stream):
                transform.normalize(batch["image"].to(device, non_blocking=True))
                if i + 1 == n:
                    break
            sync()
        return time.perf_counter() - start, batch

    def run_legacy(workers: int, n: int) -> tuple[float, dict]:
        start = time.perf_counter()
        for epoch in range(args.epochs):  # a DataLoader, and its worker processes, per epoch
            for batch in make_legacy_loader(source, epoch=epoch, workers=workers, **common):
                batch["image"].to(device)
        sync()
        return time.perf_counter() - start, batch

    pipelines = [("stream", run_stream)] + ([("legacy", run_legacy)] if args.compare_legacy else [])
    print(f"data={paths.train} samples={source.total_samples} image={image_size}px batch={args.batch_size} "
          f"max_length={args.max_length} epochs={args.epochs} repeats={args.repeats} device={device} "
          f"cpus={os.cpu_count()}")
    for workers in (int(w) for w in args.workers.split(",")):
        n = steps_per_epoch(source, batch_size=args.batch_size, workers=workers) * args.epochs
        rates: dict[str, list[float]] = {name: [] for name, _ in pipelines}
        last: dict[str, dict] = {}
        for _ in range(args.repeats):
            for name, run in pipelines:
                seconds, last[name] = run(workers, n)
                rates[name].append(n * args.batch_size / seconds)
        for name, _ in pipelines:
            nbytes, ntensors = batch_bytes(last[name])
            r = rates[name]
            print(f"workers={workers} {name:6s}: {statistics.median(r):8.0f} samples/s median "
                  f"(min {min(r):.0f}, max {max(r):.0f}) over {n} batches; "
                  f"{nbytes / 2**20:7.3f} MiB in {ntensors} tensors per batch handed over")
    probes = [("stream", make_stream(source, state=LoaderState.start(0, 1), workers=1, **common).loader.dataset)]
    if args.compare_legacy:
        probes.append(("legacy", make_legacy_loader(source, epoch=0, workers=1, **common).loader.dataset))
    for name, dataset in probes:
        ms = [1e3 * t for t in handover_seconds(dataset, 16)]
        print(f"hand-over in the worker, {name:6s}: {statistics.median(ms):7.3f} ms per batch median "
              f"(pickling for the main process, 16 batches)")
    return 0
