"""Run a few dual-queue (or, with --clip, CLIP-mode) steps under torchrun (gloo); dump
what the test compares.

Writes OUT/rank{r}_final.safetensors (the whole model state), and from rank 0:
OUT/step{s}_before.safetensors (model state before step s), OUT/losses.json
(per-step loss averaged over ranks). `--loss a,b,c` runs each objective in turn in the
same process group (one torchrun start for all: the start dominates a 2-step run), each
from the same initial weights, into OUT/<loss>/.
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel as DDP

from moco_mm import distributed as D
from moco_mm.config import QueueConfig
from moco_mm.model import DualQueueMoCo
from tests.tiny import tiny_batch, tiny_bn_model_config, tiny_model_config

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--steps", type=int, default=4)
p.add_argument("--batch", type=int, default=3)  # per rank
p.add_argument("--queue", type=int, default=10)  # not a multiple of the global batch
p.add_argument("--bn", action="store_true")
p.add_argument("--clip", action="store_true", help="model.momentum_encoder false, no queue")
p.add_argument("--loss", default="infonce", help="model.loss (learn_temperature stays on, the default)")
args = p.parse_args()
out_dir = Path(args.out)

info = D.init_distributed("cpu")


def run(loss: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)  # identical initial weights on every rank
    cfg = tiny_bn_model_config() if args.bn else tiny_model_config()
    cfg.momentum_encoder = not args.clip
    cfg.loss = loss
    model = DualQueueMoCo(cfg, QueueConfig(size=args.queue, enabled=not args.clip))
    query = DDP(model.query) if info.world_size > 1 else model.query
    opt = torch.optim.SGD([p for p in model.query.parameters() if p.requires_grad], lr=0.5)

    def state():
        return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}

    losses = []
    for step in range(args.steps):
        gb = tiny_batch(args.batch * info.world_size, seed=step, first_id=step * 1000)
        local = {k: v[info.rank * args.batch:(info.rank + 1) * args.batch] for k, v in gb.items()}
        if info.is_main:
            save_file(state(), out / f"step{step}_before.safetensors")
        model.momentum_update(0.9)
        o = model(**local, query=query)
        o.loss.backward()
        opt.step()
        opt.zero_grad()
        model.query.clamp_temperature()
        model.enqueue(o)
        losses.append(D.all_reduce_mean(o.loss.detach()).item())

    save_file(state(), out / f"rank{info.rank}_final.safetensors")
    if info.is_main:
        (out / "losses.json").write_text(json.dumps(losses))


names = args.loss.split(",")
for name in names:
    run(name, out_dir if len(names) == 1 else out_dir / name)
# all_gather_varlen: rank r sends 3 - 3r rows of a [n, 2] float tensor (rank 1 none) and r + 1
# ids; every rank writes what it got.
rows = torch.arange(6, dtype=torch.float32).view(3, 2)[:3 - 3 * info.rank] + 10 * info.rank
ids = torch.arange(info.rank + 1, dtype=torch.int64) + 100 * info.rank
got = D.all_gather_varlen(rows, ids)
(out_dir / f"varlen_rank{info.rank}.json").write_text(json.dumps([t.tolist() for t in got]))
D.shutdown()
