"""`moco-mm compare-objectives`: when does the queue pay? Trains every variant for the same
steps on the same data and prints held-out R@1/R@5 both ways and the step time.

    moco-mm compare-objectives [--config configs/demo.yaml] [--steps 300] [--batch-size 16]
        [--variants infonce,queue-off,...] [--nproc 1] [--out runs/compare] [--json OUT]

Variants (each a set of dotted overrides of the config; one run and one seed per cell):

    infonce            the dual queue with InfoNCE, duplicates masked (the default)
    <objective>        the same with model.loss=<objective> (every name in model.losses.OBJECTIVES)
    queue-off          InfoNCE, momentum keys, in-batch negatives only (MoCo v3 style)
    distill            InfoNCE with ALBEF momentum distillation (model.distill_alpha 0.4)
    no-dedup           InfoNCE without duplicate masking (model.mask_duplicates none)
    clip               the CLIP mode: no key towers, no queue

Runs go to OUT/NAME (a finished run is reused, so an interrupted comparison continues);
R@k comes from the run's own held-out evaluation at its last step, the step time from its
`samples_per_s` (the median of the logged windows after the first).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from moco_mm.model.losses import OBJECTIVES

FIXED = {
    "queue-off": ["queue.enabled=false"],
    "distill": ["model.distill_alpha=0.4"],
    "no-dedup": ["model.mask_duplicates=none"],
    "clip": ["model.momentum_encoder=false", "queue.enabled=false"],
}
ALL = ["infonce", *(n for n in OBJECTIVES if n != "infonce"), *FIXED]


def variant_overrides(name: str) -> list[str]:
    if name in FIXED:
        return FIXED[name]
    if name in OBJECTIVES:
        return [f"model.loss={name}"]
    raise SystemExit(f"compare-objectives: unknown variant {name!r}; choose from {', '.join(ALL)}")


def _command(args: argparse.Namespace, name: str, out: Path) -> list[str]:
    train = ["-m", "moco_mm.train", "--config", args.config]
    if args.nproc > 1:
        train = ["-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", f"--master_port={args.port}", *train]
    return [sys.executable, *train, *variant_overrides(name),
            f"run.steps={args.steps}", f"run.output_dir={out}", f"data.batch_size={args.batch_size}",
            f"optim.warmup_steps={max(1, args.steps // 10)}", f"eval.every={args.steps}",
            f"checkpoint.every={args.steps}", "checkpoint.resume=auto", "logging.progress=false",
            f"run.log_every={max(1, args.steps // 20)}", *args.overrides]


def read_result(run_dir: Path, steps: int, global_batch: int) -> dict | None:
    """The run's final held-out metrics and median step time, or None if it did not finish."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    final = [r for r in rows if r.get("step") == steps and "eval/i2t_R@1" in r]
    if not final:
        return None
    sps = [r["samples_per_s"] for r in rows if "samples_per_s" in r][1:] or [r["samples_per_s"] for r in rows
                                                                              if "samples_per_s" in r]
    ev = final[-1]
    return {k: ev[f"eval/{k}"] for k in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5")} | {
        "step_s": global_batch / statistics.median(sps), "final_loss": ev.get("loss")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moco-mm compare-objectives", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16, help="per rank (small batches are where a queue pays)")
    ap.add_argument("--variants", default=",".join(ALL), help=f"comma-separated, from: {', '.join(ALL)}")
    ap.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun, gloo on the CPU)")
    ap.add_argument("--port", type=int, default=29531)
    ap.add_argument("--out", default="runs/compare", help="one run directory per variant under this")
    ap.add_argument("--json", help="write the table here as JSON")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides for every variant")
    args = ap.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    for name in names:
        variant_overrides(name)  # unknown names stop before any training
    out = Path(args.out) / f"b{args.batch_size}_s{args.steps}"
    global_batch = args.batch_size * args.nproc
    results: dict[str, dict] = {}
    for name in names:
        run_dir = out / name
        res = read_result(run_dir, args.steps, global_batch)
        if res is None:
            t0 = time.perf_counter()
            print(f"[{name}] training {args.steps} steps -> {run_dir}", flush=True)
            proc = subprocess.run(_command(args, name, run_dir), capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"[{name}] failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
                return 1
            res = read_result(run_dir, args.steps, global_batch)
            print(f"[{name}] done in {time.perf_counter() - t0:.0f} s", flush=True)
        results[name] = res
    print(f"\n{args.steps} steps, batch {args.batch_size} x {args.nproc} process(es), one seed per cell "
          f"({args.config}); held-out R@k in percent")
    print(f"{'variant':<18}{'i2t R@1':>9}{'i2t R@5':>9}{'t2i R@1':>9}{'t2i R@5':>9}{'s/step':>8}")
    for name, r in results.items():
        print(f"{name:<18}{r['i2t_R@1']:9.2f}{r['i2t_R@5']:9.2f}{r['t2i_R@1']:9.2f}{r['t2i_R@5']:9.2f}"
              f"{r['step_s']:8.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": args.steps, "batch_size": args.batch_size,
                                               "nproc": args.nproc, "results": results}, indent=1))
    return 0
