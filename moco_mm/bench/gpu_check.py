"""`moco-mm gpu-check`: the one command to run the first time a GPU machine is available.

    moco-mm gpu-check [--configs NAME[,NAME...]] [--nproc N] [--quick] [--steps 20] [--warmup 5]
                      [--time-budget-s 540] [--out gpu_check] [--no-resume] [--no-openclip]
                      [--dry-run] [dotted.key=value ...]

For each shipped A100 config (configs/a100-*gb-*.yaml, or --configs), scaled to the GPUs
present (world size W = the GPUs visible, or --nproc; more than one: this module re-runs
itself under torchrun and rank 0 reports):

  plan      `moco_mm.plan.plan(cfg, GpuSpec of the GPU found, W)`; the per-GPU batch B is the
            config's when the plan fits, else min(config batch, max_batch_per_gpu); the
            vocabulary is `plan.default_vocab_size` (no tokenizer: random token ids);
  ours      N timed steps after M warm-up of our training step (`moco_mm.train.TrainStep`,
            what `Trainer.train_step` runs: fused AdamW, DDP over `model.query` with
            gradient_as_bucket_view when W > 1, the config's autocast and channels-last,
            clipping, the non-finite check, EMA, enqueue) in the momentum mode (the config
            as is, both queues pre-filled: the steady state) and in the CLIP mode
            (model.momentum_encoder=false, queue.enabled=false);
  openclip  open_clip.CustomTextCLIP + ClipLoss on the same towers (the timm backbone our
            builder makes, registered under an alias; the HF text config we build); a tower
            OpenCLIP cannot express is reported as n/a with the reason;
  memory    torch.cuda.max_memory_allocated over the timed steps (peak reset after warm-up)
            against the plan's peak_bytes (target: within 10 %);
  loss      the first step's loss (before any update, same weights and batch) under bf16
            autocast against fp32 with TF32 off; tolerance LOSS_RTOL (relative);
  gather    median of 50 `all_gather_cat` calls on the packed keys [B, 2D+8] float32 (W >= 2);

and once: kill + resume on the device with `run.deterministic=true` (the demo config on
demo data: an uninterrupted run, then a run SIGKILLed after its first checkpoint and
started again with the same command; the two final model.safetensors compared byte for byte).

Writes OUT/results.json (everything, with GPU name, count, torch/CUDA/NCCL versions) and
OUT/results.md (the README table), and prints the table. A global --time-budget-s (the
whole run, default 540 s) skips the configs it cannot reach and lists them; timed steps
shrink (down to MIN_STEPS) to share what is left. Exit 0 when it ran, whatever the figures
say; 2 when it could not (no GPU without --dry-run, unknown config, bad arguments).

--dry-run: the same code path on the CPU, W = --nproc (default 2: gloo under torchrun),
fp32, tiny towers (a 2-block ViT of width 64, or a tiny BatchNorm EfficientNet for
convolutional configs, and a 2-layer BERT of width 64), batch 8, queue 64, 2 timed steps;
the kill + resume on the CPU with the demo config shrunk (steps 6, checkpoint every 3, 32 px).
Memory figures on the CPU: the plan's peak, "n/a" measured.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moco_mm import distributed as D
from moco_mm import plan as planner
from moco_mm.config import CHECKPOINT_MARKER, Config, ImageTowerConfig, load_config
from moco_mm.model import DualQueueMoCo
from moco_mm.train.step import TrainStep, autocast_dtype, uses_channels_last

ROOT = Path(__file__).resolve().parents[2]
GIB = planner.GIB

# bf16 keeps 8 significant bits (unit roundoff 2**-9 ~ 2e-3 per rounding). The features
# pass through 12-24 blocks of bf16 matmuls and the logits are scaled by 1/T (~14), so
# at init the loss can move by a few 1e-3 relative; 2e-2 (about ten roundoffs) passes
# that and still catches what a precision bug does: a wrong cast, an fp16-style overflow
# or a mask broken by low precision moves the loss by O(1) or makes it non-finite.
LOSS_RTOL = 2e-2
MEM_TARGET = 0.10  # measured peak within 10 % of the plan's
GATHER_CALLS = 50
MIN_STEPS = 3  # fewest timed steps a shrunken budget may leave (fewer is noise)
DEFAULT_BUDGET_S = 540  # the whole run; leaves a minute of the 10 for start-up and slack
# Bounds every collective wait: a rank that failed alone (the others wait in a collective)
# ends the workers after this instead of hanging; rank 0's planning (~10-30 s) fits well inside.
PG_TIMEOUT_S = 300

# Dry-run towers: tiny, but the same kinds (ViT / BatchNorm convnet + BERT).
TINY_VIT = ["model.image.name=vit_tiny_patch16_224", "model.image.image_size=32",
            "model.image.kwargs={patch_size: 8, embed_dim: 64, depth: 2, num_heads: 2}"]
# Channels-last forced on: what `auto` does for a convolutional tower on CUDA (quoted: YAML
# 1.1 reads a bare `on` as true).
TINY_CONV = ["model.image.name=test_efficientnet", "model.image.image_size=32", "model.image.kwargs={}",
             "run.channels_last='on'"]
TINY_COMMON = ["model.image.pretrained=false", "model.text.pretrained=false", "model.text.max_length=16",
               "model.text.overrides={hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 2, "
               "intermediate_size: 128, max_position_embeddings: 64, vocab_size: 1000}",
               "model.embed_dim=32", "model.head_hidden_dim=0", "data.batch_size=8", "queue.size=64",
               "run.precision=fp32"]
CLIP_MODE = ["model.momentum_encoder=false", "queue.enabled=false"]


# ---------------------------------------------------------------------------------------
# The GPU, the clock
# ---------------------------------------------------------------------------------------


def gpu_spec_from_properties(name: str, total_memory: int) -> planner.GpuSpec:
    """A planner GpuSpec for a device as torch reports it: `name` (e.g. "NVIDIA H100 80GB
    HBM3") and `total_memory` in bytes (the capacity OOM messages print). The spec's name is
    a slug of the device name ("nvidia-h100-80gb-hbm3"), its label the name as reported."""
    if total_memory <= 0:
        raise ValueError(f"total_memory must be > 0, got {total_memory}")
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"
    return planner.GpuSpec(slug, int(total_memory), name)


def detect_gpu(index: int = 0) -> planner.GpuSpec:
    """The GpuSpec of CUDA device `index` (creates the CUDA context of this process)."""
    props = torch.cuda.get_device_properties(index)
    return gpu_spec_from_properties(props.name, props.total_memory)


@dataclass
class Budget:
    """Wall-clock budget of the whole run, shared by processes through an absolute
    deadline (`time.time()` seconds: the same on every rank of one machine)."""

    deadline: float
    min_start_s: float = 0.0  # a config is not started with less than this left
    clock: Callable[[], float] = time.time

    def left(self) -> float:
        return self.deadline - self.clock()

    def allows_start(self, need_s: float = 0.0) -> bool:
        """May the next part start, needing about `need_s` seconds whatever its share (what
        a config costs before its timed steps: planning, building)? False once the budget is
        spent or holds less than max(need_s, min_start_s)."""
        left = self.left()
        return left > 0 and left >= max(need_s, self.min_start_s)

    def share(self, parts_left: int) -> float:
        """Seconds each of `parts_left` remaining parts may take (0 when spent)."""
        return max(self.left(), 0.0) / max(parts_left, 1)


def timed_steps(step_s: float, seconds: float, default: int, minimum: int = MIN_STEPS) -> int:
    """Timed steps that fit `seconds` at `step_s` each: at most `default`, at least
    min(minimum, default) (a figure from fewer steps would be noise)."""
    floor = min(minimum, default)
    if step_s <= 0 or not math.isfinite(step_s):
        return default
    return max(floor, min(default, int(seconds // step_s)))


# ---------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------


def shipped_configs() -> list[Path]:
    return sorted((ROOT / "configs").glob("a100-*gb-*.yaml"))


def resolve_configs(spec: list[str] | None) -> list[Path]:
    """Config paths from names ("a100-40gb-vitb16-bertbase"), file names or paths; all
    shipped A100 configs when `spec` is empty. Raises ValueError naming an unknown one."""
    if not spec:
        return shipped_configs()
    out = []
    for item in (s.strip() for entry in spec for s in entry.split(",")):
        if not item:
            continue
        for cand in (Path(item), ROOT / item, ROOT / "configs" / item, ROOT / "configs" / f"{item}.yaml"):
            if cand.is_file():
                out.append(cand.resolve())
                break
        else:
            names = ", ".join(p.stem for p in shipped_configs())
            raise ValueError(f"--configs: no config {item!r} (shipped: {names})")
    return out


def dry_run_overrides(cfg_path: Path) -> list[str]:
    """Tiny towers of the same kinds as the config's: ViT configs get a 2-block ViT of
    width 64, convolutional ones (BatchNorm: Shuffle-BN) timm's tiny test EfficientNet."""
    import timm

    name = load_config(cfg_path).model.image.name
    conv = "vit" not in name and timm.is_model("test_efficientnet")
    return (TINY_CONV if conv else TINY_VIT) + TINY_COMMON


# ---------------------------------------------------------------------------------------
# Synthetic batches
# ---------------------------------------------------------------------------------------


def synthetic_batch(cfg: Config, batch: int, vocab: int, device: torch.device, seed: int,
                    first_id: int, channels_last: bool = False, uint8_images: bool = False) -> dict[str, torch.Tensor]:
    """One batch of the config's shapes, made on `device`.

    image [B,3,S,S] float32 N(0,1) (normalised pixels), or uint8 uniform when `uint8_images`
    (what our loader hands over; the tower normalises on the device), channels-last when
    asked; input_ids [B,L] int64 in [low, vocab) with 0 (BERT's pad id) after each
    caption's length; attention_mask [B,L] int64, lengths uniform in [max(2, L/4), L]
    (real captions are mostly shorter than max_length); sample_id [B] from `first_id`;
    fingerprints [B,3] int64 >= 0, distinct (never a duplicate).
    """
    s, length = cfg.model.image.image_size, cfg.model.text.max_length
    g = torch.Generator(device=device).manual_seed(seed)
    low = min(1000, max(vocab // 2, 1))  # above BERT's special tokens when the vocabulary allows
    ids = torch.randint(low, vocab, (batch, length), generator=g, device=device)
    lengths = torch.randint(max(2, length // 4), length + 1, (batch,), generator=g, device=device)
    mask = (torch.arange(length, device=device)[None, :] < lengths[:, None]).long()
    if uint8_images:
        image = torch.randint(0, 256, (batch, 3, s, s), generator=g, device=device, dtype=torch.uint8)
    else:
        image = torch.randn(batch, 3, s, s, generator=g, device=device)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    sample_id = torch.arange(first_id, first_id + batch, dtype=torch.long, device=device)
    return {"image": image, "input_ids": ids * mask, "attention_mask": mask, "sample_id": sample_id,
            "fingerprints": torch.stack([sample_id + (1 << 40) * k for k in (1, 2, 3)], dim=1)}


# ---------------------------------------------------------------------------------------
# The systems
# ---------------------------------------------------------------------------------------


@dataclass
class Ctx:
    """What every rank knows about this run."""

    device: torch.device
    world: int
    rank: int
    local_rank: int
    dry_run: bool
    warmup: int
    steps: int
    openclip: bool
    budget: Budget
    log: Callable[[str], None] = print
    text_config_dir: Path | None = None  # our text tower's HF config, for OpenCLIP's
    channels_last: bool = False  # what our run of this config chose; OpenCLIP follows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _ddp(module: nn.Module, ctx: Ctx, cfg: Config, broadcast_buffers: bool = True) -> nn.Module:
    if ctx.world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Buckets double as .grad (no second fp32 copy of the gradients).
    return DDP(module, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
               gradient_as_bucket_view=True, **D.ddp_buffer_sync(broadcast_buffers),
               bucket_cap_mb=getattr(cfg.run, "ddp_bucket_mb", 25))


class OurStep:
    """One optimizer step of our trainer on a fixed batch: `TrainStep`, the object
    `Trainer.train_step` runs, on a non-logging step (lr schedule, autocast forward, backward
    with the NaN guard, clip, the one host sync that decides finiteness, AdamW, temperature
    clamp, EMA, enqueue), without the loader. Logging steps (1 in run.log_every) add one
    packed all-reduce: not timed."""

    def __init__(self, model: DualQueueMoCo, cfg: Config, ctx: Ctx):
        self.model = model
        self.train_step = TrainStep(model, cfg, ctx.device, ctx.world, ctx.local_rank)
        self.dtype = self.train_step.autocast_dtype
        self.world = ctx.world
        self.step = 0
        self.bad_steps = 0

    def __call__(self, batch: dict[str, torch.Tensor]) -> None:
        if not self.train_step(self.step, [batch], accum=1).finite:
            self.bad_steps += 1
        self.step += 1
        shift = self.world * batch["sample_id"].shape[0]  # fresh ids and contents every step
        batch["sample_id"] += shift
        batch["fingerprints"] += shift


class OpenClipStep:
    """open_clip.CustomTextCLIP + ClipLoss on our towers: the timm backbone our builder
    makes (registered with timm under an alias, so OpenCLIP's TimmModel builds exactly it)
    and the HF text config of ours. With W > 1: DDP over the whole model and ClipLoss
    with local_loss + gather_with_grad (OpenCLIP's recommended multi-GPU setting)."""

    def __init__(self, cfg: Config, ctx: Ctx, text_config_dir: Path, channels_last: bool):
        import open_clip

        m = cfg.model
        self.notes: list[str] = []
        if m.text.trainable_blocks >= 0:
            self.notes.append("OpenCLIP trains the whole text tower (model.text.trainable_blocks ignored)")
        if m.head == "mlp":
            self.notes.append("OpenCLIP's mlp heads: hidden 2 x embed_dim (image), (width + embed_dim) / 2 (text)")
        else:
            self.notes.append("OpenCLIP's text projection has no bias")
        vision_cfg = dict(timm_model_name=timm_alias(m.image), timm_model_pretrained=False,
                          image_size=m.image.image_size, timm_pool="", timm_proj=m.head, timm_proj_bias=True)
        pooler = {"cls": "cls_last_hidden_state_pooler", "mean": "mean_pooler"}[m.text.pooling]
        # A directory holding only a config: HFTextEncoder builds it with from_config.
        text_cfg = dict(hf_model_name=str(text_config_dir), hf_tokenizer_name=str(text_config_dir),
                        hf_model_pretrained=False, hf_proj_type=m.head, hf_pooler_type=pooler)
        torch.manual_seed(cfg.run.seed)
        model = open_clip.CustomTextCLIP(m.embed_dim, vision_cfg, text_cfg, output_dict=True)
        if m.text.grad_checkpointing:
            model.text.set_grad_checkpointing(True)  # the image side: our builder did it
        model = model.to(ctx.device)
        if channels_last:
            model.visual.to(memory_format=torch.channels_last)
        self.model = model
        self.forward_model = _ddp(model, ctx, cfg)
        self.loss = open_clip.ClipLoss(local_loss=ctx.world > 1, gather_with_grad=ctx.world > 1, cache_labels=True,
                                       rank=ctx.rank, world_size=ctx.world)
        decay, no_decay = [], []
        for n, p in model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "logit_scale" in n else decay).append(p)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        self.params = decay + no_decay
        self.dtype = autocast_dtype(cfg.run.precision, ctx.device)
        self.clip = o.grad_clip
        self.bad_steps = 0

    def __call__(self, batch: dict[str, torch.Tensor]) -> None:
        with _autocast(self.model.logit_scale.device, self.dtype):
            out = self.forward_model(batch["image"], batch["input_ids"])
            loss = self.loss(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        with torch.no_grad():  # OpenCLIP's training loop does this after every step
            self.model.logit_scale.clamp_(0, math.log(100))
        self.optimizer.zero_grad(set_to_none=True)


_ALIASES: dict[str, str] = {}


def timm_alias(image: ImageTowerConfig) -> str:
    """A timm model name that builds exactly our image backbone for `image` (kwargs, input
    size, grad checkpointing, frozen blocks), so that OpenCLIP's TimmModel, which passes
    timm only a name, gets the same tower. Registered once per distinct config."""
    import dataclasses

    import timm
    from timm.models import register_model

    from moco_mm.model.towers import build_timm_backbone

    frozen = dataclasses.replace(image, pretrained=False)
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(frozen), sort_keys=True, default=str).encode()).hexdigest()
    alias = f"gpucheck_{digest[:12]}"  # no '.' or ':' (timm parses those as tag / hub)
    if alias in _ALIASES and timm.is_model(alias):
        return alias

    def entry(pretrained: bool = False, **kwargs) -> nn.Module:  # noqa: ARG001 (timm's signature)
        for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(k, None)
        cfg = dataclasses.replace(frozen, kwargs={**frozen.kwargs, **kwargs})
        return build_timm_backbone(cfg)

    entry.__name__ = entry.__qualname__ = alias
    entry.__module__ = __name__
    register_model(entry)
    _ALIASES[alias] = image.name
    return alias


# ---------------------------------------------------------------------------------------
# Measuring one system
# ---------------------------------------------------------------------------------------


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _error_text(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    kind = "out of memory" if isinstance(e, torch.cuda.OutOfMemoryError) else type(e).__name__
    return f"{kind}: {first[:300]}" if first else kind


def time_steps(step: Callable[[dict], None], batch: dict, ctx: Ctx, seconds: float) -> dict:
    """Warm up, then time N steps (N from `timed_steps`, rank 0's choice on every rank).

    Returns step_ms, the steps timed, and the peak of `max_memory_allocated` over them
    (reset after the warm-up; None on the CPU) on this rank and the largest over ranks.
    """
    t0 = time.perf_counter()
    warm_times = []
    for _ in range(ctx.warmup):
        t = time.perf_counter()
        step(batch)
        _sync(ctx.device)
        warm_times.append(time.perf_counter() - t)
    # The first warm-up step carries allocator growth and kernel selection: estimate from the rest.
    est = statistics.median(warm_times[1:] or warm_times) if warm_times else 0.0
    n = timed_steps(est, seconds - (time.perf_counter() - t0), ctx.steps)
    n = int(D.broadcast_object(n))  # every rank runs the same number of collectives
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    D.barrier()
    _sync(ctx.device)
    t = time.perf_counter()
    for _ in range(n):
        step(batch)
    _sync(ctx.device)
    dt = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda" else None
    peaks = [p for p in D.gather_objects(peak) if p is not None]
    return {"steps": n, "warmup": ctx.warmup, "step_ms": 1e3 * dt / n, "timed_s": dt,
            "peak_alloc_bytes": peak, "peak_alloc_bytes_max_rank": max(peaks) if peaks else None}


@torch.no_grad()
def loss_check(model: DualQueueMoCo, batch: dict, device: torch.device) -> dict:
    """The loss of one forward under bf16 autocast and in fp32 (TF32 off), same weights,
    same batch, before any update. Dropout off (it would draw different masks); BatchNorm
    kept on batch statistics as in training, its running statistics put back after."""
    bn = model.query_bn_state()
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    model.eval()
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.train()
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            low = model(**batch, stats=False).loss.float()
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        ref = model(**batch, stats=False).loss.float()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        model.train()
        model.load_query_bn_state(bn)
    low_v, ref_v = D.all_reduce_mean(low.reshape(1)).item(), D.all_reduce_mean(ref.reshape(1)).item()
    rel = abs(low_v - ref_v) / max(abs(ref_v), 1e-12)
    ok = math.isfinite(low_v) and math.isfinite(ref_v) and rel <= LOSS_RTOL
    return {"autocast": "bfloat16", "loss_bf16": low_v, "loss_fp32": ref_v, "abs_diff": abs(low_v - ref_v),
            "rel_diff": rel, "rtol": LOSS_RTOL, "ok": ok}


def prefill_queues(model: DualQueueMoCo, device: torch.device, seed: int) -> None:
    """Fill both queues with random unit keys (ids disjoint from the batches): the steady
    state, which the run reaches after queue / global-batch steps."""
    for i, q in enumerate((model.image_queue, model.text_queue)):
        if q.size == 0:
            continue
        g = torch.Generator(device=device).manual_seed(seed + i)
        keys = F.normalize(torch.randn(q.size, q.dim, generator=g, device=device), dim=1)
        q.enqueue(keys, torch.arange(1 << 50, (1 << 50) + q.size, device=device))


def run_ours(cfg: Config, vocab: int, ctx: Ctx, seconds: float, mode: str) -> dict:
    """Build, check the first loss, time our step in `mode` ("momentum" | "clip")."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank, as the trainer
    model = DualQueueMoCo(cfg.model, cfg.queue, vocab_size=vocab)
    if ctx.text_config_dir is not None and not (ctx.text_config_dir / "config.json").exists():
        model.query.text.backbone.config.save_pretrained(ctx.text_config_dir)  # for OpenCLIP's HF tower
    channels_last = ctx.channels_last = uses_channels_last(cfg.run.channels_last, model.query.image, ctx.device)
    model = model.to(ctx.device)
    step = OurStep(model, cfg, ctx)  # channels-last weights, DDP, optimizer: as the trainer
    prefill_queues(model, ctx.device, cfg.run.seed)
    # The loader hands our towers uint8 pixels where the tower normalises on the device.
    uint8 = hasattr(model.query.image, "normalize")
    batch = synthetic_batch(cfg, cfg.data.batch_size, vocab, ctx.device, seed=1 + ctx.rank,
                            first_id=ctx.rank * cfg.data.batch_size, channels_last=channels_last, uint8_images=uint8)
    check = loss_check(model, batch, ctx.device)
    build_s = time.perf_counter() - t0
    res = time_steps(step, batch, ctx, seconds - build_s)
    res.update(status="ok", mode=mode, batch_per_gpu=cfg.data.batch_size, build_s=build_s,
               channels_last=channels_last, image_dtype="uint8" if uint8 else "float32", loss_check=check,
               bad_steps=step.bad_steps, autocast=str(step.dtype).replace("torch.", "") if step.dtype else "fp32")
    return res


def run_openclip(cfg: Config, vocab: int, ctx: Ctx, seconds: float) -> dict:
    t0 = time.perf_counter()
    if ctx.text_config_dir is None or not (ctx.text_config_dir / "config.json").exists():
        return {"status": "n/a", "reason": "our text tower's config was not built (our runs failed)"}
    step = OpenClipStep(cfg, ctx, ctx.text_config_dir, ctx.channels_last)
    batch = synthetic_batch(cfg, cfg.data.batch_size, vocab, ctx.device, seed=1 + ctx.rank,
                            first_id=ctx.rank * cfg.data.batch_size, channels_last=ctx.channels_last)
    build_s = time.perf_counter() - t0
    res = time_steps(step, batch, ctx, seconds - build_s)
    res.update(status="ok", batch_per_gpu=cfg.data.batch_size, build_s=build_s, channels_last=ctx.channels_last,
               notes=step.notes)
    return res


def time_gather(cfg: Config, batch: int, ctx: Ctx, calls: int = GATHER_CALLS) -> dict:
    """Median wall time of `all_gather_cat` on the packed keys [B, 2D+8] float32 (the
    model's one collective per step: both modalities + the int64 id and 3 fingerprints)."""
    width = 2 * cfg.model.embed_dim + 8
    x = torch.randn(batch, width, device=ctx.device)
    for _ in range(5):
        D.all_gather_cat(x)
    times = []
    for _ in range(calls):
        _sync(ctx.device)
        t = time.perf_counter()
        D.all_gather_cat(x)
        _sync(ctx.device)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    total = ctx.world * batch * width * 4
    return {"shape": [batch, width], "calls": calls, "median_ms": 1e3 * med, "bytes_per_rank": batch * width * 4,
            "bytes_gathered": total, "algbw_gb_s": total / med / 1e9}


# ---------------------------------------------------------------------------------------
# One config
# ---------------------------------------------------------------------------------------


def _plan_summary(p: planner.MemoryPlan, bucket_view: bool) -> dict:
    """The plan's figures, and its peak as we run DDP: with gradient_as_bucket_view the
    gradients are views of the buckets, which the planner (DDP's default) counts twice."""
    as_run = max(sum(parts.values()) - (min(parts.get("grads", 0), parts.get("ddp.buckets", 0)) if bucket_view else 0)
                 for parts in p.phases.values())
    return {"gpu": p.gpu, "capacity_bytes": p.capacity_bytes, "world_size": p.world_size,
            "batch_per_gpu": p.batch_per_gpu, "queue_size": p.queue_size, "peak_bytes": p.peak_bytes,
            "peak_bytes_bucket_view": as_run, "required_bytes": p.required_bytes, "fits": p.fits,
            "phase": p.phase, "parts": p.parts, "max_batch_per_gpu": p.max_batch_per_gpu,
            "max_queue_size": p.max_queue_size, "notes": p.notes}


def plan_config(path: Path, overrides: list[str], spec: planner.GpuSpec, world: int) -> dict:
    """The batch to run and the plans of both modes at it (rank 0 only: seconds of CPU)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load_config(path, overrides, world_size=world)
        vocab, vocab_source = planner.default_vocab_size(cfg)
        p = planner.plan(cfg, spec, world, vocab_size=vocab)
        batch, source = cfg.data.batch_size, "config"
        if not p.fits:
            batch, source = min(cfg.data.batch_size, p.max_batch_per_gpu), "planner"
        out = {"vocab": vocab, "vocab_source": vocab_source, "config_batch": cfg.data.batch_size, "batch": batch,
               "batch_source": source, "config_fits": p.fits}
        if batch < 1:
            out["plan"] = _plan_summary(p, world > 1)
            return out
        extra = [f"data.batch_size={batch}"] if batch != cfg.data.batch_size else []
        if extra:
            p = planner.plan(load_config(path, overrides + extra, world_size=world), spec, world, vocab_size=vocab)
        out["plan"] = _plan_summary(p, world > 1)
        clip_cfg = load_config(path, overrides + extra + CLIP_MODE, world_size=world)
        out["plan_clip"] = _plan_summary(planner.plan(clip_cfg, spec, world, vocab_size=vocab), world > 1)
        out["extra_overrides"] = extra
    return out


def _memory(res: dict, plan_summary: dict | None) -> None:
    """Add the measured/planned ratio to a variant's result (in place)."""
    if plan_summary is None:
        return
    res["planned_peak_bytes"] = plan_summary["peak_bytes"]
    res["planned_peak_bytes_bucket_view"] = plan_summary["peak_bytes_bucket_view"]
    measured = res.get("peak_alloc_bytes")
    if measured is None:
        res["measured_over_planned"] = None
        res["within_target"] = None
        return
    ratio = measured / plan_summary["peak_bytes"]
    res["measured_over_planned"] = ratio
    res["within_target"] = abs(ratio - 1.0) <= MEM_TARGET


def check_config(path: Path, overrides: list[str], spec: planner.GpuSpec, ctx: Ctx, seconds: float) -> dict:
    """Plan, run the three systems and the gather for one config, within about `seconds`."""
    start = time.perf_counter()
    cell: dict = {"config": path.stem, "path": str(path), "status": "ok", "world_size": ctx.world,
                  "overrides": overrides}
    planned = None
    if ctx.rank == 0:
        try:
            planned = plan_config(path, overrides, spec, ctx.world)
        except Exception as e:  # noqa: BLE001 (reported in the cell; the runs use the config's batch)
            planned = {"error": _error_text(e)}
    planned = D.broadcast_object(planned)
    cell["plan_s"] = time.perf_counter() - start
    if "error" in planned:
        cell["plan_error"] = planned["error"]
        cfg0 = load_config(path, overrides, world_size=ctx.world)
        planned = {"vocab": planner.default_vocab_size(cfg0)[0], "batch": cfg0.data.batch_size,
                   "batch_source": "config (planner failed)", "extra_overrides": []}
    cell.update({k: planned.get(k) for k in ("vocab", "vocab_source", "config_batch", "batch", "batch_source",
                                             "config_fits", "plan", "plan_clip")})
    if planned["batch"] < 1:
        cell["status"] = "skipped"
        cell["reason"] = "does not fit this GPU even at batch 1 (planner)"
        return cell
    extra = planned["extra_overrides"]
    cfg = load_config(path, overrides + extra, world_size=ctx.world)
    cfg_clip = load_config(path, overrides + extra + CLIP_MODE, world_size=ctx.world)
    cell["queue"] = cfg.queue.size if cfg.queue.enabled else 0
    cell["embed_dim"] = cfg.model.embed_dim
    cell["image_tower"] = f"{cfg.model.image.name} {cfg.model.image.image_size}px" + (
        " (grad ckpt)" if cfg.model.image.grad_checkpointing else "")
    cell["text_tower"] = (f"{cfg.model.text.name} {cfg.model.text.overrides.get('hidden_size', '')}w "
                          f"{cfg.model.text.overrides.get('num_hidden_layers', '')}L {cfg.model.text.max_length} tok")
    variants = [("momentum", lambda s: run_ours(cfg, planned["vocab"], ctx, s, "momentum")),
                ("clip", lambda s: run_ours(cfg_clip, planned["vocab"], ctx, s, "clip"))]
    if ctx.openclip:
        variants.append(("openclip", lambda s: run_openclip(cfg, planned["vocab"], ctx, s)))
    cell["variants"] = {}
    if ctx.device.type == "cuda":  # the trainer's kernel setting (run.tf32, default on)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(getattr(cfg.run, "tf32", True))
    ctx.channels_last = False
    with tempfile.TemporaryDirectory(prefix="gpucheck-text-") as tmp:
        ctx.text_config_dir = Path(tmp)
        for i, (name, fn) in enumerate(variants):
            share = max(seconds - (time.perf_counter() - start), 0.0) / (len(variants) - i)
            res = _run_variant(name, fn, share, ctx)
            if name != "openclip":
                _memory(res, planned.get("plan" if name == "momentum" else "plan_clip"))
            cell["variants"][name] = res
            ctx.log(f"  {path.stem}: {name}: " + _variant_line(res))
        ctx.text_config_dir = None
    if "openclip" not in cell["variants"]:
        cell["variants"]["openclip"] = {"status": "n/a", "reason": "--no-openclip"}
    if ctx.world > 1:
        try:
            cell["gather"] = time_gather(cfg, cfg.data.batch_size, ctx)
        except Exception as e:  # noqa: BLE001
            cell["gather"] = {"status": "failed", "reason": _error_text(e)}
    else:
        cell["gather"] = {"status": "n/a", "reason": "one process: no collective"}
    cell["elapsed_s"] = time.perf_counter() - start
    # What the config cost besides its timed steps (planning, building, warm-up): the next
    # one needs about as much before a single step is timed.
    cell["fixed_s"] = cell["elapsed_s"] - sum(v.get("timed_s", 0.0) for v in cell["variants"].values())
    return cell


def _run_variant(name: str, fn: Callable[[float], dict], seconds: float, ctx: Ctx) -> dict:
    """Run one system; an exception becomes a failed (or n/a, for OpenCLIP's "cannot
    express") result agreed on by every rank, never a crash of the whole check."""
    res: dict
    try:
        res = fn(seconds)
    except ImportError as e:
        res = {"status": "n/a", "reason": f"not installed: {e}"}
    except Exception as e:  # noqa: BLE001
        kind = "n/a" if name == "openclip" and not isinstance(e, torch.cuda.OutOfMemoryError) else "failed"
        res = {"status": kind, "reason": _error_text(e)}
    _free(ctx.device)
    statuses = D.gather_objects((res.get("status"), res.get("reason")))
    bad = [(r, s) for r, s in enumerate(statuses) if s[0] != "ok"]
    if bad and res.get("status") == "ok":
        res = {"status": "failed", "reason": f"rank {bad[0][0]}: {bad[0][1][1]}"}
    return res


def _variant_line(res: dict) -> str:
    if res.get("status") != "ok":
        return f"{res.get('status')}: {res.get('reason')}"
    line = f"{res['step_ms']:.1f} ms/step, {samples_per_s(res):.1f} samples/s/GPU over {res['steps']} steps"
    if res.get("peak_alloc_bytes") is not None:
        line += f", peak {res['peak_alloc_bytes'] / GIB:.2f} GiB"
    if "loss_check" in res:
        lc = res["loss_check"]
        line += f", loss bf16 {lc['loss_bf16']:.4f} vs fp32 {lc['loss_fp32']:.4f}"
    return line


def samples_per_s(res: dict) -> float:
    return res["batch_per_gpu"] * 1e3 / res["step_ms"] if res.get("step_ms") else float("nan")


# ---------------------------------------------------------------------------------------
# All configs (one process, or every torchrun rank)
# ---------------------------------------------------------------------------------------


def environment(ctx: Ctx | None = None) -> dict:
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "nccl": None, "timm": version("timm"), "transformers": version("transformers"),
           "open_clip_torch": version("open_clip_torch"), "host_cpus": os.cpu_count()}
    if torch.cuda.is_available():
        with contextlib.suppress(Exception):
            v = torch.cuda.nccl.version()
            env["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        props = torch.cuda.get_device_properties(ctx.local_rank if ctx else 0)
        env.update(gpu_name=props.name, gpu_capacity_bytes=props.total_memory,
                   gpu_compute_capability=f"{props.major}.{props.minor}", gpu_count_visible=torch.cuda.device_count())
    if ctx is not None:
        env["world_size"] = ctx.world
        env["device"] = ctx.device.type
        if ctx.device.type == "cuda":
            env["gpu_names_by_rank"] = D.gather_objects(torch.cuda.get_device_name(ctx.device))
    return env


def run_configs(args: argparse.Namespace, paths: list[Path], budget: Budget,
                on_update: Callable[[dict], None]) -> dict:
    """Every config in turn on this process group; `on_update(results)` after each one
    (rank 0 writes them: a rank that dies later leaves the finished configs behind)."""
    device = "cpu" if args.dry_run else "cuda"
    info = D.init_distributed(device=device, timeout_s=PG_TIMEOUT_S)
    if args.dry_run:
        torch.set_num_threads(1)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(info.world_size, 1)))
    ctx = Ctx(device=info.device, world=info.world_size, rank=info.rank, local_rank=info.local_rank,
              dry_run=args.dry_run, warmup=args.warmup, steps=args.steps, openclip=not args.no_openclip,
              budget=budget, log=(lambda s: print(s, flush=True)) if info.is_main else (lambda s: None))
    if args.dry_run:
        spec_for = (lambda p: planner.resolve_gpu(p.stem[:len("a100-40gb")])
                    if p.stem[:len("a100-40gb")] in planner.GPUS else planner.GPUS["a100-80gb"])
    else:
        spec = detect_gpu(info.local_rank)
        spec_for = lambda p: spec  # noqa: E731
        torch.backends.cudnn.benchmark = False  # PyTorch's default, kept by the trainer
    results: dict = {"environment": environment(ctx), "configs": [], "skipped": []}
    need = 0.0  # the largest fixed cost of a config so far
    for i, path in enumerate(paths):
        go = D.broadcast_object(budget.allows_start(need))
        if not go:
            results["skipped"] = [p.stem for p in paths[i:]]
            for p in paths[i:]:
                results["configs"].append({"config": p.stem, "path": str(p), "status": "skipped",
                                           "reason": "time budget spent (--time-budget-s)"})
            break
        seconds = D.broadcast_object(budget.share(len(paths) - i))
        overrides = (dry_run_overrides(path) if args.dry_run else []) + list(args.overrides)
        ctx.log(f"[{i + 1}/{len(paths)}] {path.stem}: W={ctx.world}, about {seconds:.0f} s")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                cell = check_config(path, overrides, spec_for(path), ctx, seconds)
            except Exception as e:  # noqa: BLE001 (a config that cannot be loaded or built)
                cell = {"config": path.stem, "path": str(path), "status": "failed", "reason": _error_text(e)}
        results["configs"].append(cell)
        need = max(need, cell.get("fixed_s", 0.0))
        if info.is_main:
            on_update(results)
    D.barrier()
    D.shutdown()
    return results


# ---------------------------------------------------------------------------------------
# Kill + resume
# ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(dry_run: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               WANDB_MODE="disabled")
    if dry_run:
        env["OMP_NUM_THREADS"] = "1"
    return env


def _train_cmd(nproc: int, overrides: list[str]) -> list[str]:
    head = [sys.executable, "-m", "moco_mm.train"]
    if nproc > 1:
        head = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={_free_port()}", "-m", "moco_mm.train"]
    return [*head, "--config", str(ROOT / "configs" / "demo.yaml"), *overrides]


def _tail(text: str, n: int = 2000) -> str:
    return text[-n:] if text else ""


class Timeout(Exception):
    """A subprocess ran past its limit (it and its descendants were killed)."""


def _run(cmd: list[str], env: dict, timeout_s: float, on_line: Callable[[str], None] | None = None) -> tuple[int, str]:
    """Run `cmd` in a session of its own -> (return code, stdout + stderr). Past
    `timeout_s`, kill it and every descendant (torchrun's workers live in sessions of
    their own: killing torchrun alone would leave them running on the GPUs) and raise
    Timeout. `on_line` sees each line as it comes."""
    import threading

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=max(timeout_s, 1.0))
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.wait()
        reader.join(timeout=5)
        raise Timeout(f"{' '.join(map(str, cmd))[:200]} ran past {timeout_s:.0f} s: killed") from None
    reader.join(timeout=30)
    return proc.returncode, "".join(lines)


def resume_check(out: Path, nproc: int, dry_run: bool, timeout_s: float) -> dict:
    """Uninterrupted vs killed-and-resumed demo training, final weights compared byte for byte."""
    t0 = time.monotonic()
    steps, every = (6, 3) if dry_run else (30, 10)
    root = out / "resume"
    data = root / "demo-data"
    res: dict = {"config": "configs/demo.yaml", "nproc": nproc, "device": "cpu" if dry_run else "cuda",
                 "steps": steps, "checkpoint_every": every, "deterministic": True, "status": "failed"}

    def left() -> float:
        return max(timeout_s - (time.monotonic() - t0), 10.0)

    # A run directory left by an earlier check would be resumed from (checkpoint.resume=auto).
    shutil.rmtree(root, ignore_errors=True)
    try:
        sizes = (["--train", "256", "--val", "64", "--image-size", "32", "--train-shards", "4", "--val-shards", "2"]
                 # 512 pairs: 16 steps per epoch on one GPU, so the 30 steps cross an epoch boundary.
                 if dry_run else ["--train", "512", "--val", "64", "--workers", "4"])
        cmd = [sys.executable, "-m", "moco_mm.cli", "demo-data", "--out", str(data), *sizes]
        rc, log = _run(cmd, _env(dry_run), left())
        if rc != 0:
            res["reason"], res["log_tail"] = "demo-data failed", _tail(log)
            return res
        common = [f"run.device={'cpu' if dry_run else 'cuda'}", "run.deterministic=true", f"run.steps={steps}",
                  f"checkpoint.every={every}", "checkpoint.keep=2", "eval.every=0", "logging.progress=false",
                  f"run.log_every={every}", f"data.train={data / 'train' / 'manifest.json'}",
                  f"data.val={data / 'val' / 'manifest.json'}", f"model.text.tokenizer={data / 'tokenizer'}",
                  "optim.warmup_steps=2"]
        if dry_run:
            common.append("model.image.image_size=32")
        final = f"step_{steps:08d}"
        runs = {}
        # 1. uninterrupted
        a_dir = root / "uninterrupted"
        rc, log = _run(_train_cmd(nproc, common + [f"run.output_dir={a_dir}"]), _env(dry_run), left())
        runs["uninterrupted"] = {"rc": rc}
        if rc != 0:
            res["reason"], res["log_tail"] = "uninterrupted run failed", _tail(log)
            res["runs"] = runs
            return res
        # 2. killed after its first complete checkpoint, then the same command again
        b_dir = root / "killed"
        cmd_b = common + [f"run.output_dir={b_dir}"]
        killed = _run_and_kill(_train_cmd(nproc, cmd_b), b_dir / "checkpoints", final, _env(dry_run), left())
        runs["killed"] = killed
        if not killed.get("killed"):
            res["reason"] = "the kill point was not reached: " + killed.get("reason", "")
            res["runs"] = runs
            return res
        rc, log = _run(_train_cmd(nproc, cmd_b), _env(dry_run), left())
        resumed_from = _resumed_from(log)
        runs["resumed"] = {"rc": rc, "resumed_from_step": resumed_from}
        res["runs"] = runs
        if rc != 0:
            res["reason"], res["log_tail"] = "resumed run failed", _tail(log)
            return res
        if resumed_from is None or resumed_from >= steps:  # then the comparison would prove nothing
            res["reason"] = f"the restarted run did not resume mid-run (resumed from step {resumed_from})"
            return res
        fa = a_dir / "checkpoints" / final / "model.safetensors"
        fb = b_dir / "checkpoints" / final / "model.safetensors"
        if not (fa.is_file() and fb.is_file()):
            res["reason"] = f"final checkpoint missing: {fa if not fa.is_file() else fb}"
            return res
        ba, bb = fa.read_bytes(), fb.read_bytes()
        res.update(status="ok", identical=ba == bb, bytes=len(ba), sha256_uninterrupted=hashlib.sha256(ba).hexdigest(),
                   sha256_resumed=hashlib.sha256(bb).hexdigest())
    except Timeout as e:
        res["reason"] = f"timed out: {e}"
    except Exception as e:  # noqa: BLE001 (reported; the config figures still come)
        res["reason"] = _error_text(e)
    finally:
        res["elapsed_s"] = time.monotonic() - t0
    return res


def _resumed_from(log: str) -> int | None:
    """The step the trainer says it resumed at (its "resumed from DIR at step N" line)."""
    m = re.search(r"resumed from (\S+) at step (\d+)", log)
    return int(m.group(2)) if m else None


def _process_tree(pid: int) -> list[int]:
    """`pid` and every live descendant (Linux /proc), parents before children."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo += children.get(p, [])
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def kill_tree(pid: int, timeout_s: float = 30.0) -> list[int]:
    """SIGKILL `pid`, every descendant and their process groups at once, as a preemption
    does; returns the pids that were killed. torchrun starts each worker in a session of
    its own, so killing torchrun's process group alone would leave the workers running
    (orphaned, they would finish the run and make the "resume" check vacuous)."""
    tree = _process_tree(pid)  # before any kill: orphans are re-parented and lost to the walk
    mine = os.getpgid(0)
    groups = set()
    for p in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            groups.add(os.getpgid(p))
    for g in groups - {mine}:  # each worker's group holds its DataLoader workers too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(g, signal.SIGKILL)
    for p in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while any(_alive(p) for p in tree[1:]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return tree


def _run_and_kill(cmd: list[str], ckpt_root: Path, final: str, env: dict, timeout_s: float) -> dict:
    """Start `cmd` (in a session of its own) and SIGKILL it and all its descendants as soon
    as a complete checkpoint exists; report what was on disk then."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout_s
    out: dict = {"killed": False}
    try:
        while True:
            done = sorted(p.parent.name for p in ckpt_root.glob(f"step_*/{CHECKPOINT_MARKER}"))
            if done:
                if final in done:  # finished before we could kill it: not a resume test
                    out["reason"] = "the run reached its last step before the kill"
                    return out
                tree = kill_tree(proc.pid)
                out.update(killed=True, processes_killed=len(tree), checkpoints_at_kill=done)
                break
            if proc.poll() is not None:
                out["reason"] = f"run ended (rc={proc.returncode}) before its first checkpoint"
                return out
            if time.monotonic() > deadline:
                out["reason"] = "no checkpoint before the time limit"
                return out
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
        proc.wait()
        out["rc"] = proc.returncode
    time.sleep(1.0)  # a survivor would write on: look again after a moment
    out["checkpoints_after_kill"] = sorted(p.parent.name for p in ckpt_root.glob(f"step_*/{CHECKPOINT_MARKER}"))
    if final in out["checkpoints_after_kill"]:
        out.update(killed=False, reason="a process of the killed run survived and finished it")
    return out


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def _gib(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / GIB:.2f} GiB" if n >= GIB // 10 else f"{n / 2**20:.1f} MiB"


def _ratio(res: dict) -> str:
    r = res.get("measured_over_planned")
    return "n/a" if r is None else f"{r:.3f}" + ("" if res.get("within_target") else " (off)")


def _last_line(text: str | None, n: int = 300) -> str:
    """The last non-empty line of a log tail (where a traceback says what went wrong)."""
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1][:n] if lines else ""


def _rate_cell(res: dict | None, notes: list[str], label: str) -> str:
    if not res:
        return "n/a"
    if res.get("status") != "ok":
        notes.append(f"{label}: {res.get('status')}: {_last_line(res.get('reason'))}")
        return f"{res.get('status')} [{len(notes)}]"
    return f"{samples_per_s(res):.1f}"


def markdown_table(results: dict) -> str:
    """The README table: one row per config (skipped and failed ones included), then notes,
    the kill + resume verdict and the environment."""
    env = results.get("environment", {})
    s = results.get("settings", {})
    notes: list[str] = []
    dry = s.get("dry_run")
    gpu = "CPU (dry run, tiny towers)" if dry else f"{env.get('gpu_name', '?')} x {env.get('world_size', '?')}"
    lines = [
        f"GPU: {gpu}; torch {env.get('torch')}, CUDA {env.get('cuda')}, NCCL {env.get('nccl')}; "
        f"{s.get('steps')} timed steps after {s.get('warmup')} warm-up (fewer when the time budget asks); "
        "synthetic on-device batches, queues pre-filled; samples/s per GPU; memory: "
        f"torch.cuda.max_memory_allocated over the timed steps against the planner's peak (target ±{MEM_TARGET:.0%}).",
        "",
        "| config | batch/GPU | planner peak | measured peak | measured / planned (momentum; CLIP) | ours, momentum | "
        "ours, CLIP mode | OpenCLIP | step time CLIP mode / OpenCLIP | loss bf16 vs fp32 (rel.) | "
        "all_gather [B, 2D+8] |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cell in results.get("configs", []):
        name = cell["config"]
        if cell.get("status") in ("skipped", "failed"):
            notes.append(f"{name}: {cell['status']}: {cell.get('reason')}")
            lines.append(f"| {name} | {cell['status']} [{len(notes)}] |" + " |" * 9)
            continue
        v = cell.get("variants", {})
        mom, clip, oc = v.get("momentum", {}), v.get("clip", {}), v.get("openclip", {})
        source = cell.get("batch_source")
        batch = f"{cell.get('batch')}" + ("" if source == "config" else f" ({source})")
        planned = (cell.get("plan") or {}).get("peak_bytes")
        measured = mom.get("peak_alloc_bytes") if mom.get("status") == "ok" else None
        ratio_s = "; ".join(_ratio(x) for x in (mom, clip))
        r_mom = _rate_cell(mom, notes, f"{name} ours, momentum")
        r_clip = _rate_cell(clip, notes, f"{name} ours, CLIP mode")
        r_oc = _rate_cell(oc, notes, f"{name} OpenCLIP")
        both = clip.get("status") == "ok" and oc.get("status") == "ok"
        speed = f"{clip['step_ms'] / oc['step_ms']:.3f}" if both else "n/a"
        lc = mom.get("loss_check")
        loss = "n/a" if not lc else f"{lc['rel_diff']:.1e} ({'ok' if lc['ok'] else 'OFF'}, tol {lc['rtol']:g})"
        g = cell.get("gather", {})
        gather = f"{g['median_ms']:.3f} ms" if "median_ms" in g else "n/a"
        lines.append(f"| {name} | {batch} | {_gib(planned)} | {_gib(measured)} | {ratio_s} | {r_mom} | {r_clip} | "
                     f"{r_oc} | {speed} | {loss} | {gather} |")
    r = results.get("resume")
    lines.append("")
    if r and r.get("status") == "skipped":
        lines.append(f"Kill + resume: skipped ({r.get('reason')}).")
    elif r:
        head = (f"Kill + resume ({r.get('config')}, {r.get('device')}, {r.get('nproc')} process(es), "
                f"run.deterministic=true, {r.get('steps')} steps, checkpoint every {r.get('checkpoint_every')}): ")
        if r.get("status") == "ok":
            lines.append(head + ("final model.safetensors byte-identical" if r.get("identical") else
                                 "final model.safetensors DIFFERENT") + f" ({r.get('bytes')} bytes).")
        else:
            tail = f": {_last_line(r['log_tail'])}" if r.get("log_tail") else ""
            lines.append(head + f"could not run: {r.get('reason')}{tail}")
    if results.get("skipped"):
        lines.append(f"Skipped (time budget): {', '.join(results['skipped'])}.")
    if any((c.get("plan") or {}).get("parts", {}).get("ddp.buckets", 0) > 0 for c in results.get("configs", [])):
        lines.append("The planner counts DDP's gradient buckets beside the gradients (DDP's default); this check "
                     "runs DDP with gradient_as_bucket_view=True, where they share memory: results.json also gives "
                     "each plan's peak without that double count (planned_peak_bytes_bucket_view).")
    if notes:
        lines.append("")
        lines += [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# Program
# ---------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moco-mm gpu-check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", action="append", metavar="NAMES",
                    help="comma-separated config names or paths (default: every configs/a100-*gb-*.yaml)")
    ap.add_argument("--nproc", type=int, default=None,
                    help="processes (GPUs) to use; default: every visible GPU (--dry-run: 2, gloo)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per system (default 20; --quick 5)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; --quick 2)")
    ap.add_argument("--quick", action="store_true", help="fewer steps (a first look)")
    ap.add_argument("--time-budget-s", type=float, default=DEFAULT_BUDGET_S,
                    help=f"wall-clock budget of the whole run (default {DEFAULT_BUDGET_S}); configs it cannot "
                         "reach are skipped and listed")
    ap.add_argument("--out", default="gpu_check", help="results.json and results.md go here (default gpu_check/)")
    ap.add_argument("--no-resume", action="store_true", help="skip the kill + resume check")
    ap.add_argument("--no-openclip", action="store_true", help="skip OpenCLIP")
    ap.add_argument("--dry-run", action="store_true", help="the same code path on the CPU with tiny towers")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides applied to every config")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return ap


def _finish_args(args: argparse.Namespace) -> None:
    if args.dry_run:
        default_steps, default_warmup = 2, 1
    elif args.quick:
        default_steps, default_warmup = 5, 2
    else:
        default_steps, default_warmup = 20, 5
    args.steps = default_steps if args.steps is None else args.steps
    args.warmup = default_warmup if args.warmup is None else args.warmup


def _worker_main(args: argparse.Namespace) -> int:
    """Body of each torchrun rank: every config; rank 0 writes the results file after each."""
    out = Path(args.worker_out)
    budget = Budget(args.deadline, min_start_s=0.0 if args.dry_run else 20.0)
    run_configs(args, resolve_configs(args.configs), budget, lambda r: _write_json(out, r))
    return 0


def _run_workers(args: argparse.Namespace, nproc: int, paths: list[Path], deadline: float, out: Path) -> dict:
    """Re-run this module under torchrun with `nproc` processes; rank 0's results. The
    workers' output is shown as it comes and kept in OUT/worker.log."""
    res_file = out / "worker_results.json"
    res_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={_free_port()}", "-m", "moco_mm.bench.gpu_check", "--worker",
           "--worker-out", str(res_file), "--deadline", str(deadline), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--configs", ",".join(str(p) for p in paths)]
    cmd += [flag for flag, on in (("--dry-run", args.dry_run), ("--no-openclip", args.no_openclip)) if on]
    cmd += list(args.overrides)
    env = _env(args.dry_run)
    if not args.dry_run:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # A hung collective ends at the process-group timeout; this bounds the whole launch.
    limit = max(deadline - time.time(), 0) + PG_TIMEOUT_S + 60
    with open(out / "worker.log", "w") as log:
        def show(line: str) -> None:
            log.write(line)
            if not re.match(r"\[?[WI]\d{4} ", line):  # torch's glog-style warnings: the log only
                sys.stdout.write(line)
                sys.stdout.flush()

        try:
            rc, _ = _run(cmd, env, limit, on_line=show)
        except Timeout:
            rc = "killed (time limit)"
    results = json.loads(res_file.read_text()) if res_file.exists() else {"configs": [], "skipped": []}
    res_file.unlink(missing_ok=True)
    done = {c["config"] for c in results.get("configs", [])}
    for p in paths:
        if p.stem not in done:
            results.setdefault("configs", []).append(
                {"config": p.stem, "path": str(p), "status": "failed",
                 "reason": f"the workers ended (rc={rc}) before this config; see {out / 'worker.log'}"})
    results["workers_rc"] = rc
    return results


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _finish_args(args)
    if args.worker:
        return _worker_main(args)
    t0 = time.time()
    if args.steps < 1 or args.warmup < 0 or args.time_budget_s <= 0:
        print("gpu-check: --steps must be >= 1, --warmup >= 0, --time-budget-s > 0", file=sys.stderr)
        return 2
    try:
        paths = resolve_configs(args.configs)
    except ValueError as e:
        print(f"gpu-check: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        nproc = args.nproc or 2
    else:
        if not torch.cuda.is_available():
            print("gpu-check: no CUDA GPU is visible (torch.cuda.is_available() is false); "
                  "run with --dry-run to check the program on the CPU", file=sys.stderr)
            return 2
        count = torch.cuda.device_count()
        nproc = args.nproc or count
        if nproc > count:
            print(f"gpu-check: --nproc {nproc} but only {count} GPU(s) visible", file=sys.stderr)
            return 2
    if nproc < 1:
        print("gpu-check: --nproc must be >= 1", file=sys.stderr)
        return 2
    # This program is the launcher: a WORLD_SIZE / SLURM_NTASKS inherited from a job
    # allocation would make the one-process path wait for ranks that never come.
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"):
        os.environ.pop(key, None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = t0 + args.time_budget_s
    budget = Budget(deadline, min_start_s=0.0 if args.dry_run else 20.0)
    results: dict = {
        "tool": "moco-mm gpu-check",
        "settings": {"dry_run": args.dry_run, "quick": args.quick, "nproc": nproc, "steps": args.steps,
                     "warmup": args.warmup, "time_budget_s": args.time_budget_s, "loss_rtol": LOSS_RTOL,
                     "memory_target": MEM_TARGET, "gather_calls": GATHER_CALLS, "min_steps": MIN_STEPS,
                     "configs": [p.stem for p in paths], "overrides": list(args.overrides),
                     "argv": list(sys.argv[1:] if argv is None else argv)},
    }
    print(f"gpu-check: {len(paths)} config(s) on {nproc} {'CPU process(es), dry run' if args.dry_run else 'GPU(s)'}; "
          f"budget {args.time_budget_s:.0f} s; results in {out}/", flush=True)
    # The resume check first: it takes a bounded, known time, and it is the one figure
    # that must not be crowded out by a slow config.
    if args.no_resume:
        results["resume"] = {"status": "skipped", "reason": "--no-resume"}
    else:
        print("kill + resume check (demo config) ...", flush=True)
        limit = min(300.0, max(budget.left() * 0.3, 60.0))
        results["resume"] = resume_check(out, nproc, args.dry_run, limit)
        r = results["resume"]
        print(f"  resume: {r['status']}" + (f", identical={r['identical']}" if r["status"] == "ok" else
                                            f": {r.get('reason')}") + f" ({r['elapsed_s']:.0f} s)", flush=True)
    if nproc == 1:
        part = run_configs(args, paths, budget, lambda r: None)
    else:
        part = _run_workers(args, nproc, paths, deadline, out)
    results.update({k: v for k, v in part.items() if k != "environment"})
    results["environment"] = part.get("environment") or environment()
    results["environment"].setdefault("world_size", nproc)
    results["elapsed_s"] = time.time() - t0
    table = markdown_table(results)
    _write_json(out / "results.json", results)
    (out / "results.md").write_text(table)
    print()
    print(table, end="")
    print(f"\ngpu-check: done in {results['elapsed_s']:.0f} s; wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
