"""run.parallel: fsdp (FSDP2) on the CPU with 2 gloo processes: the same steps as DDP, an
exact sharded EMA, the non-finite skip, sharded checkpoints that survive a kill mid-write
and a damaged newest checkpoint and resume bit-identical, and export / consolidate /
init_weights from them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moco_mm import distributed as D
from moco_mm.config import ConfigError, load_config
from moco_mm.model import tower_blocks
from moco_mm.train import Trainer
from moco_mm.train.checkpoint import CheckpointManager, consolidate
from tests.tiny import VOCAB, tiny_bn_model_config, tiny_model_config
from tests.trainrun import (
    ROOT,
    env,
    free_port,
    run,
    run_and_kill,
    tiny_train_config,
    train_cmd,
    write_config,
)

# --- configuration and the units ----------------------------------------------------------


@pytest.mark.parametrize("override,message", [
    ("run.parallel=zero3", "run.parallel"),
    ("run.compile=true", "run.compile: not supported with run.parallel=fsdp"),
])
def test_bad_parallel_settings_name_the_key(tmp_path, override, message):
    path = write_config({"run": {"parallel": "fsdp"}}, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=message):
        load_config(path, [override])


def test_the_units_are_the_blocks_of_each_tower():
    from moco_mm.model.towers import build_towers

    with torch.device("meta"):  # structure only
        image, text = build_towers(tiny_model_config(), VOCAB, load_weights=False)
        resnet, _ = build_towers(tiny_bn_model_config(), VOCAB, load_weights=False)
    assert [type(b).__name__ for b in tower_blocks(image)] == ["Block", "Block"]  # timm ViT, depth 2
    assert [type(b).__name__ for b in tower_blocks(text)] == ["BertLayer", "BertLayer"]
    assert tower_blocks(resnet) == []  # resnet10t: one block per stage, no list: one unit (warned)


# --- the step: FSDP against DDP -------------------------------------------------------------


@pytest.fixture(scope="module")
def steps(tmp_path_factory) -> Path:
    """tests/scripts/fsdp_steps.py: 10 steps of the demo towers, 2 of a BatchNorm tower with
    accumulation and frozen blocks, 3 in the CLIP mode with gradient checkpointing, 2 in
    bf16, each under DDP and FSDP (one torchrun for all)."""
    out = tmp_path_factory.mktemp("fsdp_steps")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(ROOT / "tests" / "scripts" / "fsdp_steps.py"), "--out", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    return out


@pytest.mark.parametrize("variant,n", [("demo", 10), ("accum_bn", 2), ("clip", 3)])
def test_fsdp_gives_the_losses_and_weights_of_ddp(steps, variant, n):
    logs = json.loads((steps / f"{variant}.json").read_text())
    ddp, fsdp = logs["ddp"], logs["fsdp"]
    assert len(ddp["loss"]) == n and all(ddp["finite"]) and all(fsdp["finite"])
    assert fsdp["loss"] == pytest.approx(ddp["loss"], rel=1e-5)
    assert fsdp["grad_norm"] == pytest.approx(ddp["grad_norm"], rel=1e-4)
    a, b = (load_file(steps / f"{variant}_{mode}.safetensors") for mode in ("ddp", "fsdp"))
    assert a.keys() == b.keys()
    for name in a:  # every tensor: BatchNorm statistics and queues included
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)


def test_each_rank_holds_half_the_weights_and_adamw_states(steps):
    """2 ranks: rank 0 holds about 1/2 of the query and key weights and of AdamW's states
    (the replicated 0-d scalars and FSDP's padding of odd sizes are the rest)."""
    logs = json.loads((steps / "demo.json").read_text())
    ratio = logs["fsdp"]["state_bytes"] / logs["ddp"]["state_bytes"]
    assert 0.45 < ratio < 0.55, ratio


def test_bf16_gathered_blocks_track_ddp_under_bf16_autocast(steps):
    """precision bf16: FSDP gathers and computes the blocks in bf16 (its param_dtype), DDP
    autocasts fp32 weights to bf16 per op: the same arithmetic up to rounding order."""
    logs = json.loads((steps / "bf16.json").read_text())
    assert all(logs["fsdp"]["finite"]) and len(logs["fsdp"]["loss"]) == 2
    assert logs["fsdp"]["loss"] == pytest.approx(logs["ddp"]["loss"], rel=5e-3)


def test_the_sharded_momentum_update_equals_the_whole_one(steps):
    check = json.loads((steps / "momentum.json").read_text())
    assert check["n"] > 50 and check["max_abs_diff"] == 0.0


def test_whole_weights_load_into_sharded_towers_exactly(steps):
    """checkpoint.init_weights under FSDP: another run's whole weights, sharded on load."""
    check = json.loads((steps / "init.json").read_text())
    assert check["n"] > 100 and check["equal"] is True


def test_a_nan_loss_on_one_rank_skips_the_step_on_both(steps):
    assert json.loads((steps / "skip.json").read_text()) == {"finite": [False, False], "unchanged": True}


# --- the trainer: sharded checkpoints -------------------------------------------------------


def fsdp_config(demo: Path, run_dir: Path) -> dict:
    # eval: 48 samples in batches of 16 give the ranks 2 and 1 batches (the gathered eval).
    return tiny_train_config(demo, run_dir, run={"parallel": "fsdp", "steps": 6, "log_every": 1},
                             queue={"size": 20_000}, checkpoint={"every": 2, "keep": 2},
                             data={"workers": 0}, eval={"every": 6, "max_samples": 48})


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m["loss"] for m in map(json.loads, lines) if "loss" in m}


def test_sharded_checkpoints_resume_exactly_after_a_kill_mid_write_and_a_damaged_newest(demo, tmp_path):
    """A straight FSDP run, and the same run SIGKILLed while its ranks write the step-4
    checkpoint, given a damaged copy of a step-4 checkpoint (a shard's bytes flipped, size
    kept) and run again: it warns, falls back to step 2, and ends bit-identical."""
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    run(train_cmd(write_config(fsdp_config(demo, ref_dir), tmp_path / "ref.yaml"), nproc=2))
    ref_ckpt = ref_dir / "checkpoints" / "step_00000006"
    marker = json.loads((ref_ckpt / "COMPLETE").read_text())
    assert marker["layout"] == "sharded" and marker["world_size"] == 2
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "train_state.pt"} == set(marker["files"])
    assert any("eval/i2t_R@1" in json.loads(line) for line in (ref_dir / "metrics.jsonl").read_text().splitlines())

    cfg = write_config(fsdp_config(demo, cut_dir), tmp_path / "cut.yaml")
    ckpts = cut_dir / "checkpoints"

    def writing_step_4():
        return ckpts.exists() and any(p.name.startswith(".tmp-step_00000004") for p in ckpts.iterdir())

    run_and_kill(train_cmd(cfg, nproc=2), writing_step_4)
    assert [p.name for p in CheckpointManager(ckpts).complete_checkpoints()] == ["step_00000002"]
    damaged = ckpts / "step_00000004"
    shutil.copytree(ref_dir / "checkpoints" / "step_00000004", damaged)
    shard = damaged / "dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    res = run(train_cmd(cfg, nproc=2))
    assert "skipping checkpoint" in res.stderr and "__1_0.distcp does not match its sha256" in res.stderr
    assert f"resumed from {ckpts / 'step_00000002'} at step 2" in res.stderr
    got, _ = CheckpointManager.load(ckpts / "step_00000006")
    want, _ = CheckpointManager.load(ref_ckpt)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert losses(cut_dir) == losses(ref_dir)

    # Whole tensors out of the shards: consolidate, export, and no DDP resume from them.
    whole = consolidate(ref_ckpt, tmp_path / "whole" / "step_00000006")
    assert CheckpointManager.layout_of(whole) == "full"
    tensors = load_file(whole / "model.safetensors")
    assert tensors.keys() == want.keys() and all(torch.equal(tensors[k], want[k]) for k in want)
    from moco_mm.search.cli import export_main

    assert export_main(["--checkpoint", str(ref_ckpt), "--out", str(tmp_path / "export")]) == 0
    exported = load_file(tmp_path / "export" / "image_tower.safetensors")
    assert all(torch.equal(v, want["query.image." + k]) for k, v in exported.items())
    ddp = Trainer(load_config(tmp_path / "ref.yaml", ["run.parallel=ddp", "run.steps=12"]), D.init_distributed("cpu"))
    with pytest.raises(SystemExit, match=r"written by a sharded \(run.parallel=fsdp\) run"):
        ddp.restore()
