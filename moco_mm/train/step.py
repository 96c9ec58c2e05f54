"""The optimizer step: what one training step does to the model, whatever feeds it.

`TrainStep` owns the model's training wrappers (channels-last, torch.compile, DDP over the
query towers, fused AdamW, the autocast dtype, the NaN guard) and runs one optimizer step
over micro-batches already on the device. The Trainer drives it with loader batches and
adds logging, counters and checkpoints; `moco-mm bench` and `moco-mm gpu-check` time
exactly this object, so what they measure is what trains.

One step (`optim.accum_steps = A` micro-batches): learning rate for the step; for each
micro-batch the forward under autocast and backward of loss / A plus the NaN guard (no
gradient all-reduce before the last micro-batch); gradient clipping; ONE host read, the
finiteness of the gradient norm; then, when finite, AdamW, the temperature clamp, the EMA
of the key towers with the next step's momentum, and the enqueue of every micro-batch's
keys in order. When not finite, nothing changes (the forward's BatchNorm statistics are put
back).

Gradient accumulation (`optim.accum_steps = A`): one optimizer step consumes A loader
batches (micro-batches). The key towers are updated once per optimizer step (after it,
as above), so all A micro-batches of a step see the same key towers. All A micro-batches also see the same
queue (its state at the start of the step): their negatives are that queue plus their
own gathered batch. Their gathered keys are enqueued after the optimizer step, in
micro-batch order (and not at all when the step is skipped as non-finite). The
temperature's gradient, like every other, is the mean of the A micro-batch gradients;
the temperature is clamped once, after the optimizer step.

With `model.momentum_encoder: false` (the CLIP objective) there is no EMA and no queue:
each micro-batch's negatives are its own gathered batch, and its loss back-propagates
through that gather into every rank's towers.

Under `run.parallel: fsdp` (train/parallel.py) the same step runs on sharded towers: each
micro-batch's backward reduce-scatters its gradients (no no_sync: accumulating sharded
gradients keeps memory at 1/W); then ONE packed all-reduce carries the replicated
scalars' gradients, every rank's sum of squared local gradient elements and the count of
non-finite losses, from which every rank gets the same global gradient norm (NaN when any
rank's loss was not finite: the skip needs no NaN guard) and clips its local shards; the
EMA runs on local shards; BatchNorm statistics, which FSDP does not synchronise, are
broadcast from rank 0 after each step, as DDP broadcasts them before each forward.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from moco_mm import distributed as D
from moco_mm.config import Config
from moco_mm.model import DualQueueMoCo, has_batchnorm, momentum_at
from moco_mm.train.parallel import ddp_query, shard_towers, split_sharded

log = logging.getLogger("moco_mm.train")


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up to optim.lr over warmup_steps, then cosine to lr * min_lr_ratio."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(cfg.run.steps - o.warmup_steps, 1)
    floor = o.lr * o.min_lr_ratio
    return floor + (o.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_optimizer(query: torch.nn.Module, cfg: Config, device: torch.device | None = None) -> torch.optim.AdamW:
    """AdamW over trainable query parameters; no weight decay on biases, norms, embeddings
    of position/class tokens and the temperature (ALBEF decays its temperature: a bug).

    Fused (one kernel for all parameters, its step counters on the device: no host read of
    them per step) where torch has it for the device: CUDA, and the CPU since torch 2.4."""
    decay, no_decay = [], []
    for name, p in query.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "dist_token", "log_temperature"))
        (no_decay if skip else decay).append(p)
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Under FSDP the 0-d scalars stay plain tensors beside the sharded DTensors; one fused
    # kernel call cannot take both, so they get a group of their own.
    sharded, replicated = split_sharded(no_decay)
    if sharded:
        groups[1:] = [{"params": sharded, "weight_decay": 0.0}, {"params": replicated, "weight_decay": 0.0}]
    kwargs = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.AdamW(groups, **kwargs)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """run.precision -> the forward's autocast dtype: bf16 for `bf16`, and for `auto` on
    CUDA; None (fp32) otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def uses_channels_last(setting: str, image_tower: torch.nn.Module, device: torch.device) -> bool:
    """run.channels_last for this tower: `on`, or `auto` on CUDA, and only for a
    convolutional tower (ResNet, EfficientNet): a Conv2d that is not a ViT's patch embedding
    (whose kernel equals its stride: a reshaped matmul, no spatial layout to keep)."""
    conv = any(isinstance(m, torch.nn.Conv2d) and m.kernel_size != m.stride for m in image_tower.modules())
    return conv and (setting == "on" or (setting == "auto" and device.type == "cuda"))


@dataclass
class StepResult:
    """One optimizer step. Tensors stay on the device (reading them is a host sync): the
    means over micro-batches of each output, and the gradient norm (all-reduced)."""

    finite: bool
    lr: float
    grad_norm: torch.Tensor
    loss: torch.Tensor
    loss_i2t: torch.Tensor
    loss_t2i: torch.Tensor
    pos_sim: torch.Tensor | float
    neg_sim: torch.Tensor | float


class TrainStep:
    """The optimizer step of `model` (see the module docstring).

    world_size > 1, run.parallel ddp: the query towers go into DDP (only they are trained:
    the key towers and queues are never broadcast; see model/dual_queue.py), gradients
    living in the buckets (no second copy), buffers broadcast only where ranks can differ
    (BatchNorm statistics), a static graph when there is no accumulation.
    world_size > 1, run.parallel fsdp: query and key towers sharded per block (FSDP2,
    train/parallel.py), gathered in the autocast dtype, gradients reduced in fp32.
    run.compile: the towers compile in place (state-dict names unchanged); in one process
    the whole forward (towers, keys, gather, loss) is one graph.
    """

    def __init__(self, model: DualQueueMoCo, cfg: Config, device: torch.device, world_size: int = 1,
                 local_rank: int = 0):
        self.model, self.cfg, self.device = model, cfg, device
        if uses_channels_last(cfg.run.channels_last, model.query.image, device):
            for towers in (model.query, model.key):
                if towers is not None:
                    towers.image.use_channels_last()
        if cfg.run.compile:
            # Under DDP dynamo splits the query at DDP's bucket boundaries by design.
            for towers in (model.query, model.key):
                if towers is not None:
                    towers.compile()
        # static_graph: the parameters our step uses never change, so DDP can skip its
        # per-iteration bookkeeping. Not with no_sync() accumulation: there current torch
        # crashes or silently stops all-reducing from the second step on (pytorch#187732);
        # not under compile, where dynamo's DDPOptimizer splits the graph at the buckets.
        static = cfg.optim.accum_steps == 1 and not cfg.run.compile
        self.autocast_dtype = autocast_dtype(cfg.run.precision, device)
        self.sharded = cfg.run.parallel == "fsdp" and world_size > 1
        if cfg.run.parallel == "fsdp" and world_size == 1:
            log.info("run.parallel=fsdp with one process: nothing to shard, the towers train whole")
        if self.sharded:
            shard_towers(model, self.autocast_dtype)
            self.query = model.query
        else:
            self.query = (ddp_query(model, cfg.run.ddp_bucket_mb, static, device, local_rank)
                          if world_size > 1 else model.query)
        self.forward = torch.compile(model) if cfg.run.compile and world_size == 1 else model
        self.optimizer = build_optimizer(model.query, cfg, device)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # The trained scalar the NaN guard feeds: the first trained parameter.
        self._anchor = self.params[0] if self.params else None
        self.sharded_params, self.replicated_params = split_sharded(self.params)
        # FSDP does not synchronise buffers: BatchNorm statistics go from rank 0 to all.
        self._bn_sync = self.sharded and has_batchnorm(model.query)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def nan_guard(self, loss: torch.Tensor) -> torch.Tensor:
        """0 when `loss` is finite, NaN times a trained scalar otherwise: added to the loss
        before backward, it makes that scalar's gradient NaN on this rank, DDP's all-reduce
        spreads it to every rank and the gradient norm turns non-finite everywhere — so the
        ranks agree to skip without a collective of their own. Exact when finite (+0.0)."""
        bad = torch.where(torch.isfinite(loss.detach()), 0.0, float("nan"))
        return bad * self._anchor[(0,) * self._anchor.ndim]  # an element; any memory layout

    def __call__(self, step: int, micro_batches: Iterable[dict[str, torch.Tensor]], *, accum: int,
                 distill_alpha: float = 0.0, stats: bool = False) -> StepResult:
        """Optimizer step number `step` (0-based) over `accum` micro-batches: dicts of the
        model's inputs (image, input_ids, attention_mask, sample_id[, fingerprints]) on the
        device, drawn one at a time (the caller may time its loader inside the iterator).
        stats: also compute the similarity statistics (logging steps)."""
        cfg = self.cfg
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # The forward updates BatchNorm running statistics before anyone knows whether the
        # step is finite: keep a copy to put back if it is not (a few KiB per tower).
        bn_before = self.model.query_bn_state()
        sums: dict[str, torch.Tensor | float] = dict.fromkeys(("loss", "loss_i2t", "loss_t2i", "pos_sim", "neg_sim"),
                                                              0.0)
        outs = []
        batches = iter(micro_batches)
        n_bad = torch.zeros((), device=self.device) if self.sharded else None  # this rank's non-finite losses
        for i in range(accum):
            inputs = next(batches)
            # No gradient all-reduce until the last micro-batch.
            last = i == accum - 1
            sync = self.query.no_sync() if isinstance(self.query, DDP) and not last else contextlib.nullcontext()
            with sync:
                with self.autocast():
                    out = self.forward(**inputs, query=self.query, distill_alpha=distill_alpha, stats=stats)
                if self.sharded:
                    (out.loss / accum).backward()
                    n_bad = n_bad + (~torch.isfinite(out.loss.detach())).float()
                else:
                    (out.loss / accum + self.nan_guard(out.loss)).backward()
            outs.append(out)
            for name in sums:
                value = getattr(out, name)
                if value is not None:
                    sums[name] = sums[name] + value.detach() / accum
        if self.sharded:
            grad_norm = self._reduce_sharded(n_bad, cfg.optim.grad_clip)
        elif cfg.optim.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip)
        else:
            grad_norm = torch.linalg.vector_norm(
                torch.stack([p.grad.detach().norm() for p in self.params if p.grad is not None]))
        # The gradient is all-reduced and the NaN guard puts any rank's non-finite loss into
        # it, so this one value decides for every rank alike: the step's only host sync.
        finite = bool(torch.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
            self.model.query.clamp_temperature()
            if self._bn_sync:  # before the EMA, which copies them into the key towers
                D.broadcast_coalesced(self.model.query_bn_buffers())
            # The EMA that MoCo runs before the next step's keys, run here so that a skipped
            # step cannot move the key towers (same trajectory: key(t+1) is computed from
            # the query after step t, with the momentum of step t+1).
            m = cfg.model
            self.model.momentum_update(momentum_at(step + 1, cfg.run.steps, m.momentum, m.momentum_schedule))
            for out in outs:
                self.model.enqueue(out)
        else:
            self.model.load_query_bn_state(bn_before)
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(finite=finite, lr=lr, grad_norm=grad_norm, **sums)

    @torch.no_grad()
    def _reduce_sharded(self, n_bad: torch.Tensor, clip: float) -> torch.Tensor:
        """FSDP: average the replicated scalars' gradients and get the global gradient norm
        in ONE all-reduce of [replicated grads..., sum of squares of the local shards'
        gradients, non-finite losses]; clip every local gradient by it when `clip` > 0.
        -> the norm (0-d, the same on every rank; NaN when any rank's loss was not finite)."""
        reps = self.replicated_params
        rep_grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in reps]
        local = [D.local_shard(p.grad) for p in self.sharded_params if p.grad is not None]
        local_sq = (torch.stack(torch._foreach_norm(local)).float().pow(2).sum() if local
                    else torch.zeros((), device=self.device))
        packed = D.all_reduce_sum(torch.cat([g.detach().float().reshape(-1) for g in rep_grads]
                                            + [local_sq.reshape(1), n_bad.reshape(1)]))
        n = sum(g.numel() for g in rep_grads)
        mean_rep = packed[:n] / D.world_size()
        for p, g in zip(reps, mean_rep.split([g.numel() for g in rep_grads])):
            p.grad = g.view_as(p).to(p.dtype)
        norm = (packed[n] + mean_rep.pow(2).sum()).sqrt()
        norm = torch.where(packed[n + 1] > 0, torch.full_like(norm, float("nan")), norm)
        if clip > 0:
            # As clip_grad_norm_: scale by clip / (norm + 1e-6) when that is below 1.
            coef = (clip / (norm + 1e-6)).clamp(max=1.0)
            grads = local + [p.grad for p in reps]
            if grads:
                torch._foreach_mul_(grads, coef)
        return norm
