"""The training program end to end: config errors, a 2-process run, exact resume after
SIGKILL (1 and 2 processes, mid-run, mid-checkpoint, via torchrun's elastic restart), and
two torchrun invocations with --nnodes=2 training together."""

from __future__ import annotations

import json
import math
import random
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moco_mm.config import ConfigError, load_config
from moco_mm.train.checkpoint import CheckpointManager
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

FIELDS = {"step", "loss", "loss_i2t", "loss_t2i", "lr", "temperature", "samples_per_s", "queue_fill",
          "pos_sim", "neg_sim", "grad_norm", "skipped_samples", "data_wait_frac"}



def final_weights(run_dir: Path, step: int) -> bytes:
    return (run_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors").read_bytes()


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize("override,key", [
    ("run.stepz=5", "run.stepz"),
    ("data.batch_size=many", "data.batch_size"),
    ("model.loss=hinge", "model.loss"),
    ("optim.warmup_steps=500", "optim.warmup_steps"),
    ("queue.size=8", "queue.size"),  # with in_batch_negatives off: smaller than a global batch
    ("checkpoint.keep=0", "checkpoint.keep"),
    ("model.momentum_encoder=false", "model.momentum_encoder"),  # with the queue still on
    ("checkpoint.resume=/no/such/step_00000001", "checkpoint.resume"),
    ("checkpoint.init_weights=/no/such/dir", "checkpoint.init_weights"),
])
def test_config_errors_name_the_key(demo, tmp_path, override, key):
    cfg = write_config(tiny_train_config(demo, tmp_path / "run", model={"in_batch_negatives": False}),
                       tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(cfg, [override])


def test_bad_config_stops_the_program_before_any_compute(demo, tmp_path):
    cfg = write_config(tiny_train_config(demo, tmp_path / "run"), tmp_path / "c.yaml")
    res = subprocess.run(train_cmd(cfg, extra=("model.embed_dimm=3",)), cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "model.embed_dimm: unknown key" in res.stderr
    assert not (tmp_path / "run").exists()


def test_resolved_config_round_trips(demo, tmp_path):
    from moco_mm.config import dump_config

    cfg = load_config(write_config(tiny_train_config(demo, tmp_path / "r"), tmp_path / "c.yaml"), ["run.seed=9"])
    dump_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


# --- single process: exact resume ------------------------------------------------------


def test_single_process_exact_resume_after_sigkill_and_sigusr1(demo, tmp_path):
    """SIGKILL mid-run, then the same command, preempted with SIGUSR1 (SLURM's --signal)
    at a later step: a checkpoint of exactly that step, PREEMPTED, exit 75; then the same
    command again finishes with the uninterrupted run's weights."""
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    ref = write_config(tiny_train_config(demo, ref_dir, run={"log_every": 1}), tmp_path / "ref.yaml")
    cut = write_config(tiny_train_config(demo, cut_dir, run={"log_every": 1}), tmp_path / "cut.yaml")
    run(train_cmd(ref))
    # Kill right after a step between the step-4 checkpoint and the next one.
    kill_after = random.Random().randint(5, 7)
    log = cut_dir / "metrics.jsonl"

    def ready():
        return log.exists() and f'"step": {kill_after},' in log.read_text()

    run_and_kill(train_cmd(cut), ready)
    assert not (cut_dir / "checkpoints" / "step_00000012").exists()
    # checkpoint.every=100 (no weight depends on it): the preemption's is the only new one.
    step = preempt_at(train_cmd(cut, extra=("checkpoint.every=100",)), cut_dir, "SIGUSR1", nproc=1)
    assert step < 12
    run(train_cmd(cut))  # the same command again
    assert final_weights(cut_dir, 12) == final_weights(ref_dir, 12)
    steps = [m["step"] for m in metrics(cut_dir) if "loss" in m]
    assert steps == sorted(set(steps)), "metrics.jsonl repeats steps after the resume"


def test_incompatible_resume_is_refused_and_weights_only_loads(demo, tmp_path):
    base = tiny_train_config(demo, tmp_path / "a", run={"steps": 4}, checkpoint={"every": 4})
    run(train_cmd(write_config(base, tmp_path / "a.yaml")))
    wider = tiny_train_config(demo, tmp_path / "a", run={"steps": 8}, model={"embed_dim": 48})
    res = subprocess.run(train_cmd(write_config(wider, tmp_path / "b.yaml")), cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "model.embed_dim" in res.stderr and "init_weights" in res.stderr
    # Same towers, new run directory: weights only, fresh optimizer and queues.
    ckpt = tmp_path / "a" / "checkpoints" / "step_00000004"
    fresh = tiny_train_config(demo, tmp_path / "c", run={"steps": 4},
                              checkpoint={"every": 4, "resume": "none", "init_weights": str(ckpt)})
    run(train_cmd(write_config(fresh, tmp_path / "c.yaml")))
    tensors, state = CheckpointManager.load(tmp_path / "c" / "checkpoints" / "step_00000004")
    assert state["step"] == 4


def test_clip_mode_trains_and_seeds_the_key_towers_of_a_momentum_run(demo, tmp_path):
    """model.momentum_encoder false: no key towers, queue or momentum in the run; its
    weights, loaded into a momentum run, become the key towers' start too."""
    clip = tiny_train_config(demo, tmp_path / "clip", run={"steps": 4, "log_every": 1}, checkpoint={"every": 4},
                             model={"momentum_encoder": False}, queue={"enabled": False})
    run(train_cmd(write_config(clip, tmp_path / "clip.yaml")))
    logged = [m for m in metrics(tmp_path / "clip") if "loss" in m]
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    assert all(FIELDS <= m.keys() and "momentum" not in m and m["queue_fill"] == 0 for m in logged)
    ckpt = tmp_path / "clip" / "checkpoints" / "step_00000004"
    clip_tensors, _ = CheckpointManager.load(ckpt)
    assert clip_tensors and not any(k.startswith("key.") for k in clip_tensors)
    # momentum 1.0: the key towers never move, so they must still hold the CLIP weights.
    moco = tiny_train_config(demo, tmp_path / "moco", run={"steps": 4}, model={"momentum": 1.0},
                             checkpoint={"every": 4, "resume": "none", "init_weights": str(ckpt)})
    run(train_cmd(write_config(moco, tmp_path / "moco.yaml")))
    tensors, _ = CheckpointManager.load(tmp_path / "moco" / "checkpoints" / "step_00000004")
    keys = [k for k in tensors if k.startswith("key.")]
    assert keys
    for k in keys:
        assert torch.equal(tensors[k], clip_tensors["query." + k[len("key."):]]), k


# --- two processes ---------------------------------------------------------------------


def two_proc_config(demo: Path, run_dir: Path, **extra) -> dict:
    # A large queue makes each checkpoint big enough to be killed while it is written.
    return tiny_train_config(demo, run_dir, run={"steps": 24, "log_every": 4},
                             queue={"size": 250_000}, checkpoint={"every": 4, "keep": 2}, **extra)


def labelled_folder(root: Path, per_class: int = 13) -> tuple[Path, Path]:
    """An ImageFolder of 3 classes x `per_class` 32 px PNGs (noise around a colour) and its
    classes file."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        (root / "images" / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.integers(-40, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "images" / f"c{c}" / f"{i:02d}.png")
    (root / "classes.txt").write_text("red\ngreen\nblue\n")
    return root / "images", root / "classes.txt"


@pytest.fixture(scope="module")
def multinode_reference(demo, tmp_path_factory) -> Path:
    """The reference 2-rank run: two torchrun invocations with --nnodes=2 on 127.0.0.1.
    It evaluates at its last step, divided between the ranks: 56 held-out samples in
    batches of 16 (rank 0 embeds 16 + 16, rank 1 16 + 8) and 39 labelled images (16 + 7 and
    16); training itself is the same as without the eval (the other runs compare weights)."""
    tmp = tmp_path_factory.mktemp("multinode")
    images, classes = labelled_folder(tmp / "zs")
    cfg = write_config(two_proc_config(demo, tmp / "run", eval={
        "every": 24, "max_samples": 56, "zeroshot": {"data": str(images), "classes": str(classes)}}), tmp / "c.yaml")
    port = free_port()
    node = ["-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=moco_mm_test", "-m", "moco_mm.train", "--config", str(cfg)]
    import sys

    procs = [subprocess.Popen([sys.executable, *node], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    return tmp / "run"


def test_two_ranks_train_loss_falls_and_checkpoints_rotate(multinode_reference):
    rows = [m for m in metrics(multinode_reference) if "loss" in m]
    assert [m["step"] for m in rows] == [4, 8, 12, 16, 20, 24]
    assert all(FIELDS <= m.keys() for m in rows)
    # The queue fills as training goes, so the raw InfoNCE loss rises with ln(#negatives);
    # learning shows as the loss falling relative to chance, 2 * ln(1 + negatives).
    def vs_chance(m):
        negatives = m["queue_fill"] * 250_000 + 2 * 16 - 1
        return m["loss"] / (2 * math.log(1 + negatives))

    assert vs_chance(rows[-1]) < vs_chance(rows[0]) - 0.05
    ckpts = sorted(p.name for p in (multinode_reference / "checkpoints").iterdir())
    assert ckpts == ["step_00000020", "step_00000024"]
    tensors = load_file(multinode_reference / "checkpoints" / "step_00000024" / "model.safetensors")
    assert {"query.log_temperature", "image_queue.feature_store", "text_queue.id_store"} <= tensors.keys()
    assert any(k.startswith("key.image.") for k in tensors) and any(k.startswith("query.text.") for k in tensors)
    state = torch.load(multinode_reference / "checkpoints" / "step_00000024" / "train_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and len(state["loader"]) == 2


def test_two_rank_eval_equals_one_process_eval_of_the_same_weights(multinode_reference, tmp_path):
    """The eval divided between 2 ranks and gathered logs exactly (bit for bit) the numbers
    one process computes from the same checkpoint."""
    from moco_mm import distributed as D
    from moco_mm.train import Trainer

    rows = [m for m in metrics(multinode_reference) if "eval/i2t_R@1" in m]
    assert [m["step"] for m in rows] == [24]
    logged = {k.removeprefix("eval/"): v for k, v in rows[0].items() if k.startswith("eval/")}
    assert logged["n_images"] == 56 and logged["zeroshot_n_images"] == 39
    cfg = load_config(multinode_reference / "config.yaml", [f"run.output_dir={tmp_path / 'one'}"])
    trainer = Trainer(cfg, D.init_distributed("cpu"))
    assert trainer.info.world_size == 1
    tensors, _ = CheckpointManager.load(multinode_reference / "checkpoints" / "step_00000024")
    trainer.model.load_state_dict(tensors)
    assert trainer.evaluate() == logged


def preempt_at(cmd: list[str], run_dir: Path, signame: str, nproc: int, last: int = 9) -> int:
    """Run `cmd`, send `signame` (to rank nproc - 1 only) once rank 0 has logged a random
    step (seeded, printed) past those already in metrics.jsonl; check the stop: every rank
    stopped after the same step, a checkpoint of exactly that step is the newest, the
    PREEMPTED marker names it, the workers exited 75. Returns the step."""
    import os
    import re
    import signal

    from moco_mm.train.preempt import EXIT_PREEMPTED

    logged = max([m["step"] for m in metrics(run_dir) if "loss" in m], default=0)
    seed = random.randrange(1 << 30)
    at = random.Random(seed).randint(logged + 1, max(logged + 1, last))
    print(f"preemption: seed {seed}: {signame} to rank {nproc - 1} once step {at} is logged")
    log = run_dir / "metrics.jsonl"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (log.exists() and f'"step": {at},' in log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-4000:]
        time.sleep(0.005)
    os.kill(proc.pid if nproc == 1 else _worker_of_rank(proc.pid, nproc - 1), getattr(signal, signame))
    out = proc.communicate(timeout=300)[0]
    stops = {int(r): (sig, int(s)) for r, sig, s in re.findall(
        r"rank (\d+): preempted \((\w+)\): checkpoint of step (\d+) written, exiting with status "
        + str(EXIT_PREEMPTED), out)}
    assert sorted(stops) == list(range(nproc)), out[-4000:]
    step = stops[0][1]
    assert all(s == step for _, s in stops.values()) and step >= at, (at, stops)
    assert stops[nproc - 1][0] == signame and all(sig == "peer" for r, (sig, _) in stops.items() if r < nproc - 1)
    if nproc == 1:
        assert proc.returncode == EXIT_PREEMPTED, out[-4000:]
    else:  # torchrun exits with its own status; its failure report names the workers' one
        assert proc.returncode != 0 and re.search(rf"exitcode\s*:\s*{EXIT_PREEMPTED}\b", out), out[-4000:]
    marker = json.loads((run_dir / "PREEMPTED").read_text())
    assert marker["step"] == step and marker["exit_code"] == EXIT_PREEMPTED
    newest = CheckpointManager(run_dir / "checkpoints").latest()
    assert newest is not None and newest.name == f"step_{step:08d}" and CheckpointManager.step_of(newest) == step
    assert any(m.get("checkpoint_stall_s", -1) >= 0 and m["step"] == step for m in metrics(run_dir))
    return step


def _worker_of_rank(agent_pid: int, rank: int) -> int:
    """The torchrun worker process whose environment says RANK=`rank`."""
    for pid in _children(agent_pid):
        if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return pid
    raise AssertionError(f"no worker of rank {rank} under torchrun {agent_pid}")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(x) for x in out]


def test_two_process_exact_resume_killed_while_writing_a_checkpoint_then_preempted(demo, tmp_path,
                                                                                 multinode_reference):
    """SIGKILL while rank 0's background writer writes step 8; then the same command with
    SIGTERM to rank 1 only, at a random step: through the c10d store rank 0 (never
    signalled) stops after the same step, writes that step's checkpoint (checkpoint.every
    is 100 in that run) and PREEMPTED, both exit 75; then the same command again ends with
    the reference run's weights, tensor for tensor."""
    cut_dir = tmp_path / "cut"
    cfg = write_config(two_proc_config(demo, cut_dir), tmp_path / "c.yaml")
    ckpts = cut_dir / "checkpoints"

    def writing_step_8():
        return ckpts.exists() and any(p.name.startswith(".tmp-step_00000008") for p in ckpts.iterdir())

    run_and_kill(train_cmd(cfg, nproc=2), writing_step_8)
    assert not (ckpts / "step_00000008").exists() or (ckpts / "step_00000008" / "COMPLETE").exists()
    time.sleep(2)  # were every rank really killed, nothing may have moved since
    assert not (ckpts / "step_00000016").exists() and not (ckpts / "step_00000024").exists()
    # log_every=1 to watch the steps, checkpoint.every=100: neither changes a weight.
    step = preempt_at(train_cmd(cfg, nproc=2, extra=("checkpoint.every=100", "run.log_every=1")), cut_dir,
                      "SIGTERM", nproc=2, last=18)
    res = run(train_cmd(cfg, nproc=2))
    assert f"resumed from {ckpts / f'step_{step:08d}'} at step {step}" in res.stderr
    assert not (cut_dir / "PREEMPTED").exists()
    got, want = (load_file(d / "checkpoints" / "step_00000024" / "model.safetensors")
                 for d in (cut_dir, multinode_reference))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert final_weights(cut_dir, 24) == final_weights(multinode_reference, 24)


def test_elastic_restart_after_a_rank_dies_is_exact(demo, tmp_path, multinode_reference):
    """torchrun --max-restarts brings the group back; resume=auto continues exactly."""
    import os
    import signal
    import sys

    cut_dir = tmp_path / "elastic"
    cfg = write_config(two_proc_config(demo, cut_dir), tmp_path / "c.yaml")
    # c10d rendezvous, as launch/multinode.sh uses: each restart is a fresh rendezvous
    # round (with the static --master_port store, the restarted group hangs in gloo's
    # connect on the previous round's keys).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1",
           "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}", "-m", "moco_mm.train",
           "--config", str(cfg)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (cut_dir / "checkpoints" / "step_00000008").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    workers = _children(proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)  # one rank dies; the agent restarts the group
    out = proc.communicate(timeout=400)[0]
    assert proc.returncode == 0, out[-4000:]
    assert final_weights(cut_dir, 24) == final_weights(multinode_reference, 24)


def test_divergence_stops_with_a_message_and_a_checkpoint_of_the_last_good_state(demo, tmp_path):
    # An absurd learning rate without clipping turns the weights to inf after the first
    # step; from then on every loss is NaN.
    cfg = tiny_train_config(demo, tmp_path / "run", run={"steps": 12, "log_every": 1},
                            optim={"lr": 1e30, "grad_clip": 0.0, "max_bad_steps": 3, "warmup_steps": 0})
    res = subprocess.run(train_cmd(write_config(cfg, tmp_path / "c.yaml")), cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "3 consecutive steps with a non-finite loss" in res.stderr
    last = CheckpointManager(tmp_path / "run" / "checkpoints").latest()
    assert last is not None
    tensors, state = CheckpointManager.load(last)
    assert state["counters"]["bad_steps"] == 3
    rows = [r for r in metrics(tmp_path / "run") if "bad_steps" in r]  # not the checkpoint_stall_s rows
    assert rows[-1]["bad_steps"] == 3


def test_eval_during_training_and_wandb_offline(demo, tmp_path):
    cfg = tiny_train_config(demo, tmp_path / "run", run={"steps": 4, "log_every": 2},
                            eval={"every": 2, "max_samples": 64}, logging={"wandb": "offline"})
    res = run(train_cmd(write_config(cfg, tmp_path / "c.yaml")))
    rows = metrics(tmp_path / "run")
    evals = [r for r in rows if "eval/i2t_R@1" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert {"eval/i2t_R@5", "eval/t2i_R@10", "eval/t2i_medr"} <= evals[0].keys()
    assert "held-out retrieval at step 4" in res.stdout
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))

