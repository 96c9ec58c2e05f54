"""Under torchrun: build the Trainer from --config and count, per kind, the collectives
its steps issue through torch.distributed's Python API (DDP's gradient all-reduce runs in
its C++ reducer and is not counted; its buffer broadcast goes through
`dist._broadcast_coalesced` and is). Rank 0 writes {"plain": ..., "logging": ...}."""

import collections
import functools
import json

import torch.distributed as dist
from script_trainer import trainer_from_args

from moco_mm import distributed as D

KINDS = {"all_gather_into_tensor": "all_gather", "all_gather_single": "all_gather", "all_gather": "all_gather",
         "all_reduce": "all_reduce", "broadcast": "broadcast", "_broadcast_coalesced": "broadcast",
         "all_to_all_single": "all_to_all", "barrier": "barrier", "all_gather_object": "object",
         "broadcast_object_list": "object", "reduce_scatter_tensor": "reduce_scatter"}
counts: collections.Counter = collections.Counter()


def counted(fn, kind):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        counts[kind] += 1
        return fn(*args, **kwargs)
    return wrapper


trainer, info, args = trainer_from_args()
accum = trainer.cfg.optim.accum_steps
batches = [b for _, b in zip(range(6 * accum), trainer._batches())]
it = iter(batches)
trainer.train_step(it, stats=False)  # warm-up: lazy state
for name, kind in KINDS.items():
    if hasattr(dist, name):
        setattr(dist, name, counted(getattr(dist, name), kind))
for _ in range(3):
    trainer.train_step(it, stats=False)
    trainer.preemption.should_stop(trainer.step)  # the loop's per-step preemption check: a store call
plain = dict(counts)
counts.clear()
trainer.train_step(it, stats=True)
logging = dict(counts)
if info.is_main:
    with open(args.out, "w") as f:
        json.dump({"plain": plain, "logging": logging,
                   "static_graph": bool(getattr(trainer.stepper.query, "static_graph", None))}, f)
D.shutdown()
