"""Training-step benchmark: our dual-queue step against CLIP (OpenCLIP) and a MoCo/ALBEF-style step.

    moco-mm bench [--quick] [--json OUT] [--no-dist] [--threads 1]

All variants use the same towers (a small timm ViT registered here, a small random-init
BERT), the same batch, fp32 on the CPU and the same thread count. Variants are timed
interleaved (A B C D E A B C D E ...) so that load from other processes on a shared
machine hits all of them alike; figures are medians over the timed rounds, and ratios
are medians of the per-round ratios (each round's variants ran seconds apart).

    (a) ours       DualQueueMoCo, queue of --queue rows per modality (pre-filled)
    (b) ours/clip  the CLIP mode: model.momentum_encoder=false, queue.enabled=false (no key
                   towers; in-batch negatives gathered with gradient: the CLIP objective)
    (c) openclip   open_clip.CustomTextCLIP on the same towers + open_clip.ClipLoss
    (d) reference  MoCo/ALBEF style, written here: per-parameter momentum loop, one
                   all_gather per modality, queues as buffers of the (DDP-wrapped) model
    (e) key fwd    one no-grad forward of both towers; floor of (a) = (c) + (e)

Components, each against its twin: momentum update (our fused `_foreach_lerp_` EMA; the
reference per-parameter loop; the copy floors: `_foreach_copy_` of the same tensors and one
flat copy of the same number of bytes); the queue loss (ours, id-masked, against ALBEF's
pre-training loss, which ignores ids, and ALBEF's id-aware retrieval loss, its twin);
every objective of `model.loss` against queue InfoNCE (`loss_<name>_over_infonce`: both
directions, forward + backward, the batch against its queue, published defaults);
with 2 processes: one gather of both modalities vs one per modality, and the queue
broadcast DDP does when the whole model (queues as buffers) is wrapped.

The 2-process part re-runs this module under `torchrun --nproc_per_node=2` (gloo) with the
same per-rank batch; rank 0 writes its medians to a JSON file the parent reads.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from moco_mm import distributed as D
from moco_mm.bench.components import Components
from moco_mm.bench.systems import OpenClipStep, OurStep, RefStep, Sizes, _register_vit, gather_each, make_batch
from moco_mm.bench.timing import interleaved, med, paired_ratio, spread
from moco_mm.model.losses import OBJECTIVES

ROOT = Path(__file__).resolve().parents[2]


def step_fns(steps: dict[str, Callable], s: Sizes) -> dict[str, Callable[[], None]]:
    """Closures feeding each step a fresh batch of ids (the batch tensors themselves are
    reused: data loading is measured separately)."""
    batch = make_batch(s, seed=1, first_id=D.rank() * s.batch)
    world = D.world_size()

    def bind(step: Callable) -> Callable[[], None]:
        def run() -> None:
            batch["sample_id"] += world * s.batch
            step(batch)
        return run

    return {name: bind(fn) for name, fn in steps.items()}


def save_bert_config(ours: OurStep, directory: Path) -> Path:
    """Our BERT's config (random init: config only) where OpenCLIP's HF path can read it."""
    ours.model.query.text.backbone.config.save_pretrained(directory)
    return directory


def run_single(s: Sizes, rounds: int, warmup: int) -> dict:
    a, b, d = OurStep(s, queue_on=True), OurStep(s, queue_on=False), RefStep(s)
    with tempfile.TemporaryDirectory() as tmp:
        c = OpenClipStep(s, save_bert_config(a, Path(tmp)))
    comp = Components(a, s)
    key = a.model.key
    batch_e = make_batch(s, seed=2, first_id=0)

    def key_forward() -> None:
        with torch.no_grad():
            key.image(batch_e["image"])
            key.text(batch_e["input_ids"], batch_e["attention_mask"])

    fns = step_fns({"a": a, "b": b, "c": c, "d": d}, s)
    fns["e"] = key_forward
    t = interleaved(fns, rounds, warmup)
    # Components are fast: more repetitions, interleaved among themselves.
    ct = interleaved({"ema_ours": comp.ema_ours, "ema_copy": comp.ema_copy, "ema_copy_flat": comp.ema_copy_flat,
                      "ema_loop": comp.ema_loop}, rounds * 5, warmup * 5)
    ct |= interleaved({"loss_ours": comp.loss_ours, "loss_ours_batch": comp.loss_ours_batch,
                       "loss_ref": comp.loss_ref, "loss_ref_ids": comp.loss_ref_ids}, rounds * 5, warmup * 5)
    # The objectives among themselves: each one's loss against queue InfoNCE's, same inputs.
    ct |= interleaved({f"loss_{name}": comp.loss_objective(name) for name in OBJECTIVES}, rounds * 5, warmup * 5)
    n_params = sum(p.numel() for p in a.model.query.parameters())
    return {"steps": t, "components": ct, "ema_bytes": comp.bytes, "query_params": n_params}


# ---------------------------------------------------------------------------------------
# 2 processes
# ---------------------------------------------------------------------------------------


def dist_worker(args: argparse.Namespace) -> int:
    """Body of each torchrun rank: (a) and (b) with DDP over the query towers, (c) with
    DDP over OpenCLIP's model, (d) with DDP over everything, and the gather / broadcast
    components."""
    torch.set_num_threads(args.threads)
    D.init_distributed(device="cpu")
    s = Sizes.quick() if args.quick else Sizes()
    _register_vit(s)
    a, b, d = OurStep(s, queue_on=True, ddp=True), OurStep(s, queue_on=False, ddp=True), RefStep(s)
    with tempfile.TemporaryDirectory() as tmp:
        c = OpenClipStep(s, save_bert_config(a, Path(tmp)))
    fns = step_fns({"a": a, "b": b, "c": c, "d": d}, s)
    t = interleaved(fns, args.rounds, args.warmup)

    # Gather: ours packs both modalities and the ids into one collective.
    k = F.normalize(torch.randn(s.batch, s.embed_dim), dim=1)
    ids = torch.arange(s.batch)

    def gather_ours() -> None:
        ids_f = ids.view(torch.float32).view(-1, 2)
        D.all_gather_cat(torch.cat([k, k, ids_f], dim=1))

    def gather_ref() -> None:
        gather_each(k), gather_each(k), gather_each(ids.view(-1, 1))

    # DDP's buffer broadcast, alone: what `broadcast_buffers=True` sends each forward
    # (coalesced, as DDP does); our layout sends nothing, its twin is zero.
    bufs = list(d.model.buffers())

    def broadcast_queues() -> None:
        flat = torch._utils._flatten_dense_tensors(bufs)
        torch.distributed.broadcast(flat, src=0)
        for b, f in zip(bufs, torch._utils._unflatten_dense_tensors(flat, bufs)):
            b.copy_(f)

    ct = interleaved({"gather_ours": gather_ours, "gather_ref": gather_ref, "broadcast_queues": broadcast_queues},
                     args.rounds * 5, args.warmup * 5)
    if D.rank() == 0:
        Path(args.dist_out).write_text(json.dumps({"steps": t, "components": ct,
                                                   "broadcast_bytes": sum(b.numel() * b.element_size() for b in bufs)}))
    D.barrier()
    D.shutdown()
    return 0


def run_dist(args: argparse.Namespace) -> dict | None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "dist.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               "-m", "moco_mm.bench.step", "--dist-worker", "--dist-out", str(out),
               "--rounds", str(args.rounds), "--warmup", str(args.warmup), "--threads", str(args.threads)]
        if args.quick:
            cmd.append("--quick")
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        if res.returncode != 0 or not out.exists():
            print("2-process part failed:\n" + res.stdout[-2000:] + res.stderr[-2000:], file=sys.stderr)
            return None
        return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------
# Loader (the measurement of `moco-mm bench-loader`, one worker count, as a number)
# ---------------------------------------------------------------------------------------


def loader_samples_per_s(data: str, batch_size: int, batches: int, workers: int) -> float:
    """Steady-state samples/s of the training loader on the demo shards (built if missing)."""
    from transformers import AutoTokenizer

    from moco_mm.data import ShardSource, build_transforms, make_loader
    from moco_mm.data.demo import DemoParams, build_demo

    paths = build_demo(data)
    tokenizer = AutoTokenizer.from_pretrained(str(paths.tokenizer))
    source = ShardSource.from_spec(paths.train)
    transform = build_transforms(DemoParams().image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), train=True)
    loader = make_loader(source, batch_size=batch_size, tokenizer=tokenizer, max_length=32, transform=transform,
                         seed=0, epoch=0, workers=workers, shuffle_buffer=1000)
    n = min(batches, len(loader))
    warm = max(workers, 1)  # each worker's first batch carries its start-up
    start = time.perf_counter()
    for i, _ in enumerate(loader):
        if i + 1 == warm:
            start = time.perf_counter()
        if i + 1 == n:
            break
    return (n - warm) * batch_size / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def summarise(single: dict, dist: dict | None, loader: float | None) -> dict:
    t, ct = single["steps"], single["components"]
    e_plus_c = [c + e for c, e in zip(t["c"], t["e"])]
    res: dict = {
        "a_over_c": paired_ratio(t["a"], t["c"]),
        "b_over_c": paired_ratio(t["b"], t["c"]),
        "a_over_d": paired_ratio(t["a"], t["d"]),
        # The floor of the momentum update: one flat copy of the same bytes (the strictest).
        "ema_over_copy": paired_ratio(ct["ema_ours"], ct["ema_copy_flat"]),
        "ema_over_foreach_copy": paired_ratio(ct["ema_ours"], ct["ema_copy"]),
        "floor_ratio": paired_ratio(e_plus_c, t["c"]),
        "ema_loop_over_ours": paired_ratio(ct["ema_loop"], ct["ema_ours"]),
        # (a) adds the key towers' forward to the CLIP step: (c)+(e) is its floor. (b) has
        # no key towers: its floor is (c) itself.
        "a_over_floor": paired_ratio(t["a"], e_plus_c),
        # What scoring the queue adds (loss components, medians): the floor plus it is
        # everything the dual-queue algorithm must add to the CLIP step.
        "queue_loss_ms": 1e3 * (med(ct["loss_ours"]) - med(ct["loss_ours_batch"])),
        "a_over_floor_with_queue_loss": med(t["a"]) / (med(e_plus_c) + med(ct["loss_ours"])
                                                        - med(ct["loss_ours_batch"])),
        "loss_ours_over_ref": paired_ratio(ct["loss_ours"], ct["loss_ref"]),
        "loss_ours_over_ref_ids": paired_ratio(ct["loss_ours"], ct["loss_ref_ids"]),
        # Each objective's loss (both directions, fwd + bwd, batch against queue) over InfoNCE's.
        **{f"loss_{name}_over_infonce": paired_ratio(ct[f"loss_{name}"], ct["loss_infonce"])
           for name in OBJECTIVES if name != "infonce"},
        "times_ms": {k: 1e3 * med(v) for k, v in {**t, **ct}.items()},
        "spread_iqr_over_median": {k: spread(v) for k, v in {**t, **ct}.items()},
        "ema_bytes": single["ema_bytes"],
        "query_params": single["query_params"],
    }
    res["targets"] = {
        # One-sided: (a) may beat the floor (fused AdamW, no host syncs; OpenCLIP's loop has
        # neither), it must not exceed it by more than 0.05.
        "a_over_c_within_0.05_of_floor": res["a_over_c"] - res["floor_ratio"] <= 0.05,
        "b_over_c_le_1.05": res["b_over_c"] <= 1.05,
        "a_not_slower_than_d": res["a_over_d"] <= 1.0,
        "ema_faster_than_loop": res["ema_loop_over_ours"] > 1.0,
        "ema_within_2x_copy": res["ema_over_copy"] <= 2.0,
    }
    if dist is not None:
        dt, dct = dist["steps"], dist["components"]
        res["dist"] = {
            **{f"{k}_2proc_ms": 1e3 * med(dt[k]) for k in ("a", "b", "c", "d")},
            "a_2proc_over_1proc": med(dt["a"]) / med(t["a"]),
            "b_2proc_over_1proc": med(dt["b"]) / med(t["b"]),
            "a_over_d_2proc": paired_ratio(dt["a"], dt["d"]),
            "b_over_c_2proc": paired_ratio(dt["b"], dt["c"]),
            "a_over_c_2proc": paired_ratio(dt["a"], dt["c"]),
            "gather_ours_ms": 1e3 * med(dct["gather_ours"]), "gather_ref_ms": 1e3 * med(dct["gather_ref"]),
            "gather_ref_over_ours": paired_ratio(dct["gather_ref"], dct["gather_ours"]),
            "broadcast_queues_ms": 1e3 * med(dct["broadcast_queues"]),
            "broadcast_bytes": dist["broadcast_bytes"],
        }
        res["targets"]["a_not_slower_than_d_2proc"] = res["dist"]["a_over_d_2proc"] <= 1.0
        res["targets"]["b_over_c_le_1.05_2proc"] = res["dist"]["b_over_c_2proc"] <= 1.05
        res["targets"]["one_gather_faster_than_three"] = res["dist"]["gather_ref_over_ours"] > 1.0
    if loader is not None:
        res["loader_samples_per_s"] = loader
    return res


def print_table(res: dict, s: Sizes, args: argparse.Namespace) -> None:
    ms, sp = res["times_ms"], res["spread_iqr_over_median"]
    c = ms["c"]
    print(f"towers: ViT {s.image}px/{s.patch} w{s.width} d{s.depth} + BERT w{s.width} d{s.depth} L{s.seq}; "
          f"embed {s.embed_dim}; batch {s.batch}; queue {s.queue}/modality; fp32 CPU; threads {args.threads}; "
          f"{args.rounds} timed rounds after {args.warmup} warm-up; query params {res['query_params']:,}")
    print(f"{'variant':<46}{'median ms':>10}{'IQR/med':>9}{'/ (c)':>8}")
    rows = [("(a) ours, dual queue", "a"), ("(b) ours, CLIP mode (no key towers, no queue)", "b"),
            ("(c) OpenCLIP CustomTextCLIP + ClipLoss", "c"), ("(d) MoCo/ALBEF reference style", "d"),
            ("(e) key towers no-grad forward", "e")]
    for label, k in rows:
        print(f"{label:<46}{ms[k]:>10.2f}{sp[k]:>9.2f}{ms[k] / c:>8.3f}")
    print(f"{'floor of (a) = (c)+(e)':<46}{c + ms['e']:>10.2f}{'':>9}{(c + ms['e']) / c:>8.3f}")
    q = res["queue_loss_ms"]
    print(f"{'floor + scoring the queue (loss components)':<46}{c + ms['e'] + q:>10.2f}{'':>9}"
          f"{(c + ms['e'] + q) / c:>8.3f}")
    mb = res["ema_bytes"] / 2**20
    print(f"momentum update over {mb:.1f} MiB of key parameters:")
    for label, k in (("ours: _foreach_lerp_ (+ buffer copy)", "ema_ours"),
                     ("floor: one flat copy of the same bytes", "ema_copy_flat"),
                     ("floor: _foreach_copy_ of the same tensors", "ema_copy"),
                     ("reference: per-parameter loop", "ema_loop")):
        print(f"  {label:<44}{ms[k]:>10.3f}{sp[k]:>9.2f}{ms[k] / ms['ema_copy_flat']:>8.2f}x flat copy")
    print(f"queue loss, both directions, fwd+bwd, {s.queue} queue rows + batch:")
    for label, k in (("ours: queue_infonce, id-masked", "loss_ours"),
                     ("ours over the gathered batch only", "loss_ours_batch"),
                     ("reference: ALBEF retrieval, id-aware targets", "loss_ref_ids"),
                     ("reference: ALBEF pre-training, ids ignored", "loss_ref")):
        print(f"  {label:<44}{ms[k]:>10.3f}{sp[k]:>9.2f}")
    print(f"objectives (model.loss), both directions, fwd+bwd, batch {s.batch} against {s.queue} queue rows + batch:")
    print(f"  {'objective':<44}{'median ms':>10}{'IQR/med':>9}{'/ infonce':>10}")
    for name in OBJECTIVES:
        ratio = 1.0 if name == "infonce" else res[f"loss_{name}_over_infonce"]
        print(f"  {name:<44}{ms['loss_' + name]:>10.3f}{sp['loss_' + name]:>9.2f}{ratio:>10.2f}")
    print("ratios (median of per-round ratios):")
    for k in ("a_over_c", "b_over_c", "a_over_d", "floor_ratio", "a_over_floor", "a_over_floor_with_queue_loss",
              "ema_over_copy",
              "ema_over_foreach_copy", "ema_loop_over_ours", "loss_ours_over_ref_ids", "loss_ours_over_ref"):
        print(f"  {k:<30}{res[k]:.3f}")
    if "dist" in res:
        d = res["dist"]
        print("2 processes (gloo, same per-rank batch):")
        print(f"  (a) {d['a_2proc_ms']:.2f} ms = {d['a_2proc_over_1proc']:.3f}x 1 process; "
              f"(d) with DDP over the whole model {d['d_2proc_ms']:.2f} ms; (a)/(d) {d['a_over_d_2proc']:.3f}; "
              f"(a)/(c) {d['a_over_c_2proc']:.3f}")
        print(f"  (b) {d['b_2proc_ms']:.2f} ms = {d['b_2proc_over_1proc']:.3f}x 1 process; "
              f"(c) OpenCLIP under DDP {d['c_2proc_ms']:.2f} ms; (b)/(c) {d['b_over_c_2proc']:.3f}")
        print(f"  gather: ours (one collective) {d['gather_ours_ms']:.3f} ms, reference (one per modality + ids) "
              f"{d['gather_ref_ms']:.3f} ms, ratio {d['gather_ref_over_ours']:.2f}")
        print(f"  DDP queue-buffer broadcast per step {d['broadcast_queues_ms']:.3f} ms "
              f"({d['broadcast_bytes'] / 2**20:.2f} MiB); ours broadcasts nothing")
    if "loader_samples_per_s" in res:
        print(f"loader (demo shards, steady, workers={args.loader_workers}): "
              f"{res['loader_samples_per_s']:.0f} samples/s")
    print("targets: " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in res["targets"].items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moco-mm bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="thin towers and few rounds (smoke test, < 60 s)")
    ap.add_argument("--json", metavar="OUT", help="write the ratios and medians here")
    ap.add_argument("--no-dist", action="store_true", help="skip the 2-process part")
    ap.add_argument("--no-loader", action="store_true", help="skip the loader figure")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process, same for every variant")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 30, quick 6)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 4, quick 2)")
    ap.add_argument("--data", default="data/demo", help="demo shards for the loader figure")
    ap.add_argument("--loader-workers", type=int, default=0)
    ap.add_argument("--dist-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dist-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rounds is None:
        args.rounds = 6 if args.quick else 30
    if args.warmup is None:
        args.warmup = 2 if args.quick else 4
    if args.dist_worker:
        return dist_worker(args)

    torch.set_num_threads(args.threads)
    s = Sizes.quick() if args.quick else Sizes()
    _register_vit(s)
    single = run_single(s, args.rounds, args.warmup)
    dist = None if args.no_dist else run_dist(args)
    loader = None
    if not args.no_loader:
        loader = loader_samples_per_s(str(ROOT / args.data) if not os.path.isabs(args.data) else args.data,
                                      batch_size=32, batches=8 if args.quick else 40, workers=args.loader_workers)
    res = summarise(single, dist, loader)
    res["sizes"] = asdict(s)
    res["threads"], res["rounds"], res["warmup"] = args.threads, args.rounds, args.warmup
    print_table(res, s, args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
