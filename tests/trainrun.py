"""Helpers for tests that run the real training program in subprocesses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def build_demo(out: Path) -> Path:
    """A small demo dataset (32 px, 512 train / 64 held-out pairs) and its tokenizer."""
    subprocess.run([sys.executable, "-m", "moco_mm.cli", "demo-data", "--out", str(out), "--train", "512",
                    "--val", "64", "--image-size", "32", "--train-shards", "8", "--val-shards", "2"],
                   check=True, cwd=ROOT, capture_output=True)
    return out


def tiny_train_config(demo: Path, out_dir: Path, **sections) -> dict:
    cfg = {
        "run": {"output_dir": str(out_dir), "steps": 12, "seed": 3, "device": "cpu", "log_every": 2},
        "model": {
            "image": {"name": "vit_tiny_patch16_224", "image_size": 32,
                      "kwargs": {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}},
            "text": {"name": "bert", "tokenizer": str(demo / "tokenizer"), "pooling": "mean", "max_length": 16,
                     "overrides": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                   "intermediate_size": 128, "max_position_embeddings": 32}},
            "embed_dim": 32, "momentum": 0.9,
        },
        "queue": {"size": 100},
        "data": {"train": str(demo / "train" / "manifest.json"), "val": str(demo / "val" / "manifest.json"),
                 "batch_size": 16, "workers": 1, "shuffle_buffer": 64},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "checkpoint": {"every": 4, "keep": 2},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(config: Path, nproc: int = 1, extra: tuple[str, ...] = (), port: int | None = None) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "moco_mm.train", "--config", str(config), *extra]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={port or free_port()}", "-m", "moco_mm.train", "--config", str(config), *extra]


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-4000:]
    return res


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (torchrun starts its workers in sessions of their
    own, so a process-group kill misses them)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        kids = subprocess.run(["pgrep", "-P", str(p)], capture_output=True, text=True).stdout.split()
        todo += [int(k) for k in kids]
    return out


def run_and_kill(cmd: list[str], ready, timeout: float = 300) -> None:
    """Start `cmd` and SIGKILL it and every process below it once `ready()` (stopped first,
    so none of them runs on while the others are being killed)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"run ended (rc={proc.returncode}) before the kill point")
            if time.monotonic() > deadline:
                raise AssertionError("kill point never reached")
            time.sleep(0.002)
    finally:
        tree = process_tree(proc.pid)
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in tree:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        proc.wait()
