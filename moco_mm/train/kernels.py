"""Kernel settings of a run, applied once before the model is built (`moco-mm train`).

    configure_kernels(run_cfg, device)

- TF32 (`run.tf32`, default on): float32 matmuls and convolutions on Ampere and newer use
  TF32 tensor cores (the bf16 autocast paths are unaffected). Off: full fp32.
- Determinism (`run.deterministic`, default off): `torch.use_deterministic_algorithms(True)`,
  cuDNN autotuning off, and `CUBLAS_WORKSPACE_CONFIG=:4096:8` (cuBLAS reads it when its
  first handle is created, so it is set here, before any CUDA work, unless the user set
  it). With the same world size and NCCL topology, a resumed run is then bit-identical on
  CUDA too; without it, only on the CPU (see the README's exact-resume section).
"""

from __future__ import annotations

import os

import torch

from moco_mm.config import RunConfig


def configure_kernels(run: RunConfig, device: torch.device) -> None:
    if run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = run.tf32
        torch.backends.cudnn.allow_tf32 = run.tf32
