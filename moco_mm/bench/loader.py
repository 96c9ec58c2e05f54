"""Loader throughput (read + decode + augment + tokenise + batch) on the demo shards.

    moco-mm bench-loader [--data data/demo] [--workers 0,1,2] [--batch-size 64] [--batches 48]

Builds the demo dataset first if `--data` holds no complete build (a few seconds). For each
worker count it prints samples/s over the whole epoch slice (worker start-up included) and
in steady state (from the second batch of every worker on), and steady samples/s per worker.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moco-mm bench-loader", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/demo", help="demo folder (built if missing)")
    ap.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=48, help="batches per measurement (at most one epoch)")
    ap.add_argument("--max-length", type=int, default=32)
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from moco_mm.data import ShardSource, build_transforms, make_loader
    from moco_mm.data.demo import DemoParams, build_demo

    paths = build_demo(args.data)
    image_size = DemoParams().image_size
    tokenizer = AutoTokenizer.from_pretrained(str(paths.tokenizer))
    source = ShardSource.from_spec(paths.train)
    transform = build_transforms(image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), train=True)
    torch.set_num_threads(1)  # the main process only receives batches; keep the comparison fair
    print(f"data={paths.train} samples={source.total_samples} image={image_size}px "
          f"batch={args.batch_size} max_length={args.max_length} cpus={os.cpu_count()}")
    for workers in (int(w) for w in args.workers.split(",")):
        loader = make_loader(source, batch_size=args.batch_size, tokenizer=tokenizer,
                             max_length=args.max_length, transform=transform, seed=0, epoch=0,
                             workers=workers, shuffle_buffer=1000)
        n = min(args.batches, len(loader))
        warm = max(workers, 1)  # the first batch of each worker carries its start-up
        start = time.perf_counter()
        steady_start = start
        for i, _ in enumerate(loader):
            if i + 1 == warm:
                steady_start = time.perf_counter()
            if i + 1 == n:
                break
        end = time.perf_counter()
        total = n * args.batch_size / (end - start)
        steady = (n - warm) * args.batch_size / (end - steady_start) if n > warm else float("nan")
        print(f"workers={workers}: {total:8.0f} samples/s overall, {steady:8.0f} samples/s steady, "
              f"{steady / max(workers, 1):8.0f} samples/s per worker")
    return 0

