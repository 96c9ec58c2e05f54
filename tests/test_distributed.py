"""Two gloo processes under torchrun: one gather, identical queues and key towers, and the
2-process loss equal to the single-process loss on the concatenated global batch; in the
CLIP mode, the 2-process training equal to one process training on the global batch."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moco_mm import distributed as D
from moco_mm.config import QueueConfig
from moco_mm.model import LOSSES, DualQueueMoCo
from tests.tiny import tiny_batch, tiny_model_config
from tests.trainrun import ROOT, free_port, run, tiny_train_config, write_config


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: int = 240) -> None:
    run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
         f"--master_port={free_port()}", str(script), *args], timeout=timeout)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    torchrun(ROOT / "tests/scripts/dist_steps.py", "--out", str(out), "--steps", "4")
    return out


def test_ranks_hold_identical_queues_and_towers(two_rank_run):
    r0 = load_file(two_rank_run / "rank0_final.safetensors")
    r1 = load_file(two_rank_run / "rank1_final.safetensors")
    assert r0.keys() == r1.keys()
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name
    # 4 steps x global batch 6 = 24 keys through a queue of 10: full and wrapped.
    assert int(r0["image_queue.filled"]) == 10 and int(r0["text_queue.filled"]) == 10
    assert sorted(r0["text_queue.id_store"].tolist()) == sorted([3000 + i for i in range(6)] + [2002, 2003, 2004, 2005])


def test_all_gather_varlen_concatenates_uneven_shares_in_rank_order(two_rank_run):
    """Rank 0 sends 3 rows and 1 id, rank 1 no rows and 2 ids: every rank gets them all."""
    want = [[[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]], [0, 100, 101]]
    for r in (0, 1):
        assert json.loads((two_rank_run / f"varlen_rank{r}.json").read_text()) == want
    x = torch.ones(2, 3)
    assert D.all_gather_varlen(x)[0] is x  # one process: identity


def test_two_process_loss_equals_single_process_loss_on_global_batch(two_rank_run):
    losses = json.loads((two_rank_run / "losses.json").read_text())
    assert len(D.gather_objects(0)) == 1  # this process has no process group
    torch.manual_seed(0)
    single = DualQueueMoCo(tiny_model_config(), QueueConfig(size=10))
    for step, want in enumerate(losses):
        single.load_state_dict(load_file(two_rank_run / f"step{step}_before.safetensors"))
        single.momentum_update(0.9)
        with torch.no_grad():
            got = single(**tiny_batch(6, seed=step, first_id=step * 1000)).loss.item()
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), f"step {step}"


def test_shuffle_bn_tower_keeps_ranks_identical(tmp_path):
    torchrun(ROOT / "tests/scripts/dist_steps.py", "--out", str(tmp_path), "--steps", "2", "--bn")
    r0 = load_file(tmp_path / "rank0_final.safetensors")
    r1 = load_file(tmp_path / "rank1_final.safetensors")
    # BatchNorm running statistics are rank-local between DDP's buffer broadcasts (each
    # rank's forward updates them from its own batch) and never enter a key's value: the
    # key tower normalises with batch statistics. Everything else must be identical.
    stats = ("running_mean", "running_var", "num_batches_tracked")
    compared = [n for n in r0 if not n.endswith(stats)]
    assert any(n.startswith("key.image.backbone.bn1") for n in compared)
    for name in compared:
        assert torch.equal(r0[name], r1[name]), name
    assert int(r0["image_queue.filled"]) == 10


def test_clip_mode_two_processes_train_like_one_process_on_the_global_batch(tmp_path):
    """The gather carries gradients: each rank's loss also trains the towers on the other
    rank, and after DDP's averaging the update is that of the global batch's mean loss."""
    torchrun(ROOT / "tests/scripts/dist_steps.py", "--out", str(tmp_path), "--steps", "3", "--clip")
    r0 = load_file(tmp_path / "rank0_final.safetensors")
    r1 = load_file(tmp_path / "rank1_final.safetensors")
    assert not any(k.startswith("key.") for k in r0)
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name
    losses = json.loads((tmp_path / "losses.json").read_text())
    torch.manual_seed(0)
    single = DualQueueMoCo(tiny_model_config(momentum_encoder=False), QueueConfig(enabled=False))
    opt = torch.optim.SGD([p for p in single.query.parameters() if p.requires_grad], lr=0.5)
    for step, want in enumerate(losses):
        out = single(**tiny_batch(6, seed=step, first_id=step * 1000))
        assert out.loss.item() == pytest.approx(want, rel=1e-5, abs=1e-6), f"step {step}"
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        single.query.clamp_temperature()
    moved = 0
    for name, value in single.state_dict().items():
        start = load_file(tmp_path / "step0_before.safetensors")[name]
        assert torch.allclose(r0[name], value, rtol=1e-4, atol=1e-5), name
        moved += not torch.equal(start, value)
    assert moved > 10  # the comparison is between trained weights, not initial ones


def test_every_loss_trains_under_ddp_with_a_learnable_temperature(tmp_path):
    """DDP stops a run whose trained parameter gets no gradient; the margin losses ignore
    the temperature, so it must not be a trained parameter for them. Every objective runs
    in one torchrun (a fresh model and DDP wrapper each, in the same process group)."""
    names = sorted(LOSSES)
    torchrun(ROOT / "tests/scripts/dist_steps.py", "--out", str(tmp_path), "--steps", "2", "--loss", ",".join(names))
    for loss in names:
        r0 = load_file(tmp_path / loss / "rank0_final.safetensors")
        r1 = load_file(tmp_path / loss / "rank1_final.safetensors")
        for name in r0:
            assert torch.equal(r0[name], r1[name]), f"{loss}: {name}"
        losses = json.loads((tmp_path / loss / "losses.json").read_text())
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses), f"{loss}: {losses}"


def test_ranks_draw_their_own_dropout_masks_with_identical_weights(tmp_path, demo):
    """The trainer seeds construction identically on every rank and each rank's
    generators differently afterwards: same input, train mode (dropout 0.1, drop-path)
    -> different outputs per rank; weights and key towers identical."""
    cfg = tiny_train_config(demo, tmp_path / "run", data={"batch_size": 4, "workers": 0})
    cfg["model"]["image"]["kwargs"]["drop_path_rate"] = 0.2
    cfg["model"]["text"]["overrides"].update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    config = write_config(cfg, tmp_path / "c.yaml")
    torchrun(ROOT / "tests/scripts/rank_rng.py", "--config", str(config), "--out", str(tmp_path / "out.json"))
    res = json.loads((tmp_path / "out.json").read_text())
    assert res["weights_equal"], "ranks built different weights"
    assert not res["train_outputs_equal"], "every rank drew the same dropout masks"
    assert res["eval_outputs_equal"]  # no dropout in eval mode: the difference is the masks


@pytest.mark.parametrize("batch", [3, 4])
def test_shuffle_bn_exchange_matches_a_single_process_reproduction(tmp_path, batch):
    """Every rank's BatchNorm batch holds rows from every rank (B of them, B % W != 0
    included), the keys come back to their own rows: reproduced by hand here."""
    from moco_mm.model.dual_queue import _hash64, shuffle_splits
    from tests.tiny import tiny_bn_model_config

    out = tmp_path / "keys.safetensors"
    torchrun(ROOT / "tests/scripts/shuffle_bn_keys.py", "--out", str(out), "--batch", str(batch))
    got = load_file(out)["keys"]
    torch.manual_seed(0)
    model = DualQueueMoCo(tiny_bn_model_config(), QueueConfig(size=8))
    w, b = 2, batch
    gb = tiny_batch(b * w, seed=5, first_id=1000)
    images, ids = gb["image"].view(w, b, *gb["image"].shape[1:]), gb["sample_id"].view(w, b)
    orders = [torch.argsort(_hash64(ids[r])) for r in range(w)]
    sends = [shuffle_splits(b, w, r)[0] for r in range(w)]
    pieces = {}  # (sender, receiver) -> global row indices
    for r in range(w):
        start = 0
        for j in range(w):
            pieces[r, j] = [r * b + int(i) for i in orders[r][start:start + sends[r][j]]]
            start += sends[r][j]
    want = torch.empty(w * b, got.shape[1])
    with torch.no_grad():
        for j in range(w):
            rows = [i for r in range(w) for i in pieces[r, j]]
            assert len(rows) == b  # every rank normalises a batch of B rows
            want[rows] = model.key.image(gb["image"][rows]).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert images.shape[0] == w


@pytest.mark.parametrize("b,world", [(32, 256), (3, 2), (192, 8), (5, 5), (1, 4)])
def test_shuffle_splits_send_and_receive_b_rows_on_every_rank(b, world):
    from moco_mm.model.dual_queue import shuffle_splits

    splits = [shuffle_splits(b, world, r) for r in range(world)]
    for r, (send, recv) in enumerate(splits):
        assert sum(send) == b and sum(recv) == b
        assert all(recv[i] == splits[i][0][r] for i in range(world))  # what i sends r, r receives
