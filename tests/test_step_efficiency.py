"""A step that never stalls the GPU, counted on the CPU: host synchronisations per optimizer
step (a dispatch mode sees every tensor->host read), collectives per step under 2 gloo
processes, graph breaks of the compiled step."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moco_mm import distributed as D
from moco_mm.config import QueueConfig, load_config
from moco_mm.model import DualQueueMoCo
from moco_mm.train import Trainer
from tests.tiny import tiny_batch, tiny_model_config
from tests.trainrun import ROOT, free_port, run, tiny_train_config, write_config

HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default}


class CountHostReads(TorchDispatchMode):
    """Counts the ops that copy a tensor's value to the host (`.item()`, `int()`, `bool()`,
    `if tensor:`): on CUDA each one waits for the device to finish."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))



def _trainer(demo, tmp_path, clip: bool, accum: int) -> Trainer:
    model = {"momentum_encoder": not clip}
    cfg = tiny_train_config(demo, tmp_path / "run", data={"batch_size": 8, "workers": 0},
                            optim={"accum_steps": accum, "warmup_steps": 1},
                            queue={"enabled": not clip, "size": 64}, model=model)
    tmp_path.mkdir(parents=True, exist_ok=True)
    return Trainer(load_config(write_config(cfg, tmp_path / "c.yaml")), D.init_distributed("cpu"))


@pytest.mark.parametrize("clip", [False, True], ids=["momentum", "clip"])
@pytest.mark.parametrize("accum", [1, 2])
def test_at_most_one_host_sync_per_optimizer_step(demo, tmp_path, clip, accum):
    t = _trainer(demo, tmp_path, clip, accum)
    # Loading is not the step: fetch the batches first (with workers it is another process).
    batches = [b for _, b in zip(range(5 * accum), t._batches())]
    it = iter(batches)
    t.train_step(it, stats=False)  # first step: lazy optimizer state
    counter = CountHostReads()
    with counter:
        for _ in range(3):
            assert t.train_step(it, stats=False)["finite"]
    assert counter.count <= 3, f"{counter.count} host syncs in 3 optimizer steps"
    logging = CountHostReads()
    with logging:
        m = t.train_step(it, stats=True)
    # a logging step reads its metrics back once (plus the finiteness decision)
    assert logging.count <= 2 and "loss" in m and "neg_sim" in m


def test_the_dual_queue_step_compiles_without_graph_breaks():
    """`run.compile`: the whole step (towers, keys, gather, negatives, loss) as one graph,
    with the same loss as eager."""
    torch.manual_seed(0)
    m = DualQueueMoCo(tiny_model_config(), QueueConfig(size=32))
    m.enqueue(m(**tiny_batch(4, 1, first_id=100)))  # a partly filled queue
    batch = tiny_batch(4, 2)
    explained = torch._dynamo.explain(m)(**batch)
    assert explained.graph_break_count == 0, explained.break_reasons
    eager = m(**batch).loss
    compiled = torch.compile(m, backend="aot_eager")(**batch).loss
    assert compiled.item() == pytest.approx(eager.item(), abs=1e-5)


@pytest.mark.parametrize("accum", [1, 2])
def test_collectives_per_step_under_two_processes(demo, tmp_path, accum):
    """Non-logging steps: one all_gather per micro-batch and DDP's gradient buckets, nothing
    else (no per-step all-reduce of counters or losses, no buffer broadcast for LayerNorm
    towers); a logging step adds one packed all-reduce. DDP's static graph only without
    accumulation (with no_sync() torch mishandles it)."""
    cfg = tiny_train_config(demo, tmp_path / "run", data={"batch_size": 4, "workers": 0},
                            optim={"accum_steps": accum, "warmup_steps": 1})
    config = write_config(cfg, tmp_path / "c.yaml")
    out = tmp_path / "counts.json"
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         str(ROOT / "tests/scripts/count_collectives.py"), "--config", str(config), "--out", str(out)], timeout=240)
    counts = json.loads(out.read_text())
    assert counts["plain"] == {"all_gather": accum * 3}, counts  # 3 steps x accum micro-batches
    assert counts["logging"] == {"all_gather": accum, "all_reduce": 1}, counts
    assert counts["static_graph"] == (accum == 1)
