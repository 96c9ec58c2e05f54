"""Peak GPU memory of one training step, planned before the run (`moco-mm plan-memory`).

    plan(cfg, "a100-40gb", world_size=8) -> MemoryPlan
        .parts               bytes per component of the peak phase; sum(parts) == peak_bytes
        .required_bytes      peak_bytes + margin_bytes; the config fits when <= capacity_bytes
        .max_batch_per_gpu   largest data.batch_size that fits (queue as configured)
        .max_queue_size      largest queue.size that fits (batch as configured)

What one step holds, per rank (B = data.batch_size, W = world size, K = queue.size,
D = model.embed_dim, N = K + W*B negatives per query with in-batch negatives on):

- fp32 master weights of the query towers and of their momentum (key) copies;
- fp32 gradients of the trainable query weights and AdamW's two fp32 states of each;
  under DDP the gradients ARE the buckets (`gradient_as_bucket_view=True`, as the
  trainer wraps it), so the buckets add nothing;
- the two queues (K x D in `queue.dtype`, plus int64 ids and fingerprints);
- activations: what the query towers keep for backward, *measured*, not modelled. Each
  tower is built on the meta device, moved into `FakeTensorMode` (shapes and dtypes,
  no memory, no arithmetic) and run forward and backward under the config's precision
  (bf16 autocast for `auto`/`bf16`: planning is for CUDA) and gradient checkpointing.
  `saved_tensors_hooks` record every tensor autograd saves, deduplicated by storage
  (checkpointed blocks save only their inputs); a dispatch mode records every storage
  an op creates, which gives the backward's transient peak (a checkpointed block's
  recomputation, activation gradients) and the key towers' no-grad forward peak.
  Traces at two batch sizes give `fixed + per_sample * B` (the fixed part: autocast's
  bf16 weight copies). A run of identical blocks (ViT / BERT layers, the repeated
  blocks of an EfficientNet stage) is traced two blocks deep and extrapolated: what the
  second block adds, every further block adds (tests check this against full traces);
- the loss: the negatives bank, the logits [B, N+1] and masks it saves (both
  directions) and the logits' gradients, traced the same way at the exact B and N (the
  searches use a bilinear fit in B and N of four such traces);
- the gathered keys [W*B, 2D+8] (both modalities and the int64 meta — id and 3
  fingerprints — as float32 pairs; held until the enqueue, per micro-batch) and, for
  BatchNorm towers with W > 1, Shuffle-BN's exchanged rows (about B of them whatever W).

Under `run.parallel: fsdp` (moco_mm/train/parallel.py: FSDP2 `fully_shard` on each block
of the four towers, then on each tower, its root unit) the state is per rank instead:

- the fp32 weights of the query AND key towers, the gradients of the trainable query
  weights and AdamW's two states, each sharded: 1/W (buffers and the 0-d temperature stay
  whole); no DDP buckets;
- unsharded transients, gathered in the autocast dtype (bf16): the largest block twice
  (the running one and the prefetched next) in forward and backward; in backward also a
  unit's unsharded gradient (autograd's, bf16) with its fp32 reduce-scatter input, for the
  largest block, or at the end for both query roots (whichever is more); both query
  towers' roots (embeddings, final norm, head), which stay gathered from forward through
  backward; the running key tower's root during the key forward (key towers reshard
  right after their no-grad forward). Gradients are reduce-scattered every micro-batch;
- activations as traced, less autocast's bf16 weight copies, which the trace measures
  (every storage a dtype cast of a parameter makes): the weights are bf16 already, so
  autocast copies none, and what a block saves of its weights is its gathered copy,
  freed when it reshards. The backward's traced transient keeps a checkpointed block's
  recomputed weight copies (conservative: FSDP's gathered block replaces them).

Three phases are costed and the largest is the peak: `forward` (end of the query
forward + the key towers' no-grad forward + the loss; gradients are None), `backward`
(saved activations + every gradient + the largest backward transient + the logits and
their gradients), `optimizer` (the foreach AdamW step's fp32 temporaries; activations
freed). Counting every gradient beside every saved activation is conservative: early
activations are freed before late gradients appear.

Margin (stated, not hidden in the parts): 10% of the peak for allocator rounding and
fragmentation and cuBLAS/cuDNN/attention workspaces, plus 1 GiB fixed for the CUDA
context and NCCL buffers, which live outside PyTorch's allocator.

Tracing uses the CPU's autocast and attention kernels (CUDA autocast cannot be traced
without a GPU). They save the same tensors as the CUDA ones for these towers (linear,
conv and attention inputs in bf16, LayerNorm in fp32; fused attention keeps q, k, v,
out and the log-sum-exp, never the B x H x L x L probabilities). Attention with dropout,
which the CPU cannot fuse, is traced without it: what CUDA's fused kernels keep.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Callable

from moco_mm.config import Config, queue_warnings
from moco_mm.model.dual_queue import N_FINGERPRINTS
from moco_mm.model.losses import learns_temperature, objective_params
from moco_mm.plan.loss import LossFootprint, loss_footprint, loss_model
from moco_mm.plan.profiles import ModelProfile, default_vocab_size, profile_model
from moco_mm.plan.trace import _F32, _I64, _QUEUE_BYTES, GIB, Linear

META_COLUMNS = 1 + N_FINGERPRINTS  # sample id + fingerprints, int64, per key row

# ---------------------------------------------------------------------------------------
# GPUs and the margin
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuSpec:
    name: str
    capacity_bytes: int  # what PyTorch reports as the device's total capacity
    label: str


# Totals as `torch.cuda.get_device_properties(0).total_memory` reports them (the figure
# OOM messages print as "total capacity"), not the marketing GB: 40 GB A100s report
# 39.5-39.6 GiB (the lower one is used), 80 GB A100s 79.25 GiB, 80 GB H100s 79.10 GiB.
GPUS: dict[str, GpuSpec] = {
    "a100-40gb": GpuSpec("a100-40gb", int(39.50 * GIB), "NVIDIA A100 40GB"),
    "a100-80gb": GpuSpec("a100-80gb", int(79.25 * GIB), "NVIDIA A100 80GB"),
    "h100-80gb": GpuSpec("h100-80gb", int(79.10 * GIB), "NVIDIA H100 80GB"),
}


@dataclass(frozen=True)
class Margin:
    """Headroom on top of the estimated peak: `fraction * peak + fixed_bytes`."""

    fraction: float = 0.10  # allocator rounding/fragmentation, cuBLAS/cuDNN/attention workspaces
    fixed_bytes: int = GIB  # CUDA context + NCCL buffers (outside PyTorch's allocator)

    def bytes(self, peak: int) -> int:
        return int(math.ceil(self.fraction * peak)) + self.fixed_bytes

    def describe(self) -> str:
        return f"{self.fraction:.0%} of the peak + {self.fixed_bytes / GIB:.2g} GiB fixed (CUDA context, NCCL)"


# ---------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------


PART_NOTES = {
    "params.query": "fp32 weights + buffers of the query towers (and temperature)",
    "params.key": "fp32 weights + buffers of the momentum (key) towers",
    "grads": "fp32 gradients of the trainable query weights",
    "optimizer.adamw": "AdamW exp_avg + exp_avg_sq (fp32)",
    "optimizer.step_temp": "foreach AdamW temporaries (one fp32 copy)",
    "ddp.buckets": "DDP gradient buckets beyond .grad (0: gradient_as_bucket_view, grads live in them)",
    "queues.features": "2 queues x K x D in queue.dtype",
    "queues.ids": "2 queues x K x (sample id + 3 fingerprints) int64",
    "inputs": "the batch on the GPU (images fp32, token ids, masks)",
    "activations.image": "image query tower: kept for backward (ddp: + autocast weight cache in forward)",
    "activations.text": "text query tower: kept for backward (ddp: + autocast weight cache in forward)",
    "backward.transient": "largest backward transient (recompute, activation grads)",
    "key_forward.transient": "key towers' no-grad forward peak",
    "negatives": "negatives bank kept by q @ bank^T, 2 directions",
    "logits": "logits / log-softmax / masks B x (N+1), 2 directions",
    "logit_grads": "gradients of the logits (one direction at a time)",
    "loss.forward": "loss forward peak incl. banks, 2 directions",
    "gathered.keys": "all-gathered keys + ids (x accum_steps) + local keys",
    "gathered.shuffle": "Shuffle-BN exchanged inputs and keys (BN towers, W > 1; ~constant in W)",
    # run.parallel: fsdp
    "params.sharded": "sharded weights (query+key)/W: fp32 masters of all four towers",
    "params.replicated": "buffers + 0-d scalars (temperature): not sharded, whole on every rank",
    "grads.sharded": "fp32 gradient shards of the trainable query weights (/W)",
    "optimizer.adamw.sharded": "AdamW exp_avg + exp_avg_sq of the shards (fp32, /W)",
    "optimizer.step_temp.sharded": "foreach AdamW temporaries (one fp32 copy of the gradient shards)",
    "fsdp.unsharded_roots": "unsharded roots: both query towers' roots (embeddings, norm, head), forward to backward",
    "fsdp.key_root": "the running key tower's root, gathered for its no-grad forward only",
    "fsdp.gathered_blocks": "all-gathered blocks: the largest block x 2 (running + prefetched), gather dtype",
    "fsdp.unsharded_grads": "a unit's unsharded gradient (param dtype) + its fp32 reduce-scatter input",
}

# Parts that are weights, gradients, optimizer states or gradient buckets: the step's state.
STATE_PREFIXES = ("params.", "grads", "optimizer.", "ddp.")


@dataclass
class MemoryPlan:
    """Estimated peak memory per GPU of one training step, and what fits.

    Invariants: `peak_bytes == sum(parts.values())`; `parts is phases[phase]` and `phase`
    is the phase with the largest total; `required_bytes == peak_bytes + margin_bytes`;
    `fits == (required_bytes <= capacity_bytes)`; `max_batch_per_gpu` is the largest
    per-GPU batch that fits with the configured queue (0: none), `max_queue_size` the
    largest queue that fits with the configured batch (0: none).
    """

    gpu: str
    capacity_bytes: int
    world_size: int
    parallel: str  # run.parallel: "ddp" | "fsdp"
    batch_per_gpu: int
    queue_size: int
    embed_dim: int
    precision: str
    accum_steps: int
    phase: str
    parts: dict[str, int]
    phases: dict[str, dict[str, int]]
    peak_bytes: int
    margin_bytes: int
    required_bytes: int
    fits: bool
    margin_policy: str
    max_batch_per_gpu: int
    max_queue_size: int
    notes: list[str] = field(default_factory=list)

    @property
    def state_bytes(self) -> int:
        """Weights, gradients, optimizer states and buckets at the optimizer step, where all
        of them are held (temporaries included): what the step costs before any activation."""
        return sum(n for k, n in self.phases["optimizer"].items() if k.startswith(STATE_PREFIXES))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["phase_totals"] = {k: sum(v.values()) for k, v in self.phases.items()}
        d["state_bytes"] = self.state_bytes
        return d

    def table(self) -> str:
        """Human-readable breakdown (GiB) of the peak phase and the verdict."""
        w = max(len(k) for k in self.parts)
        lines = [f"memory plan: {self.gpu} ({self.capacity_bytes / GIB:.2f} GiB), world size {self.world_size}, "
                 f"{self.parallel}, "
                 f"batch {self.batch_per_gpu}/GPU, queue {self.queue_size}, embed dim {self.embed_dim}, "
                 f"{self.precision}" + (f", accum {self.accum_steps}" if self.accum_steps > 1 else ""),
                 f"peak phase: {self.phase}", "",
                 f"{'part':<{w}}  {'GiB':>8}  {'share':>6}  what"]
        for name, n in self.parts.items():
            share = n / self.peak_bytes if self.peak_bytes else 0.0
            lines.append(f"{name:<{w}}  {n / GIB:8.3f}  {share:6.1%}  {PART_NOTES.get(name, '')}")
        lines += [
            f"{'peak':<{w}}  {self.peak_bytes / GIB:8.3f}",
            f"{'margin':<{w}}  {self.margin_bytes / GIB:8.3f}          {self.margin_policy}",
            f"{'required':<{w}}  {self.required_bytes / GIB:8.3f}          of {self.capacity_bytes / GIB:.2f} GiB: "
            + ("FITS" if self.fits else "DOES NOT FIT"),
            "",
            "phase totals (GiB): " + ", ".join(f"{k} {sum(v.values()) / GIB:.3f}" for k, v in self.phases.items()),
            f"state (weights, gradients, optimizer, buckets at the optimizer step): {self.state_bytes / GIB:.3f} GiB",
            f"largest per-GPU batch that fits (queue {self.queue_size}): {self.max_batch_per_gpu}",
            f"largest queue that fits (batch {self.batch_per_gpu}): {self.max_queue_size}",
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _ddp_state(profile: ModelProfile) -> dict[str, int]:
    """Per rank under DDP, everything whole: fp32 weights of the query and key towers,
    gradients and AdamW's two states of the trainable query weights. Keys in table order;
    `grads` is the part the forward holds only under gradient accumulation."""
    grads = profile.trainable_bytes
    return {
        "params.query": profile.param_bytes_query,
        "params.key": profile.param_bytes_key,
        "grads": grads,
        "optimizer.adamw": 2 * grads,
        # gradient_as_bucket_view=True: .grad tensors are views into DDP's buckets, so the
        # buckets add nothing beyond the gradients already counted.
        "ddp.buckets": 0,
    }


def _fsdp_state(profile: ModelProfile, world_size: int) -> dict[str, int]:
    """Per rank under FSDP: the towers' parameters (query and key), the gradients of the
    trainable ones and AdamW's states are sharded, 1/W each (rounded up; FSDP's per-tensor
    padding to a multiple of W is not counted: < W elements a tensor). Buffers and the 0-d
    scalars (temperature) stay whole on every rank. Same keys' roles as `_ddp_state`."""
    w = world_size
    towers = 2 if profile.param_bytes_key else 1  # query (+ key) copies of the two towers
    tower_params = _F32 * (profile.image.n_params + profile.text.n_params)
    tower_grads = profile.image.trainable_bytes + profile.text.trainable_bytes
    scalar_grads = profile.trainable_bytes - tower_grads  # a learnt temperature: replicated
    grads = -(-tower_grads // w) + scalar_grads
    return {
        "params.sharded": -(-towers * tower_params // w),
        "params.replicated": profile.param_bytes_query + profile.param_bytes_key - towers * tower_params,
        "grads.sharded": grads,
        "optimizer.adamw.sharded": 2 * grads,
    }


def _fsdp_transients(profile: ModelProfile, momentum_encoder: bool) -> dict[str, dict[str, int]]:
    """Unsharded FSDP parameters and gradients per phase (bytes), as the trainer shards
    (moco_mm/train/parallel.py): each block its own unit, resharded after forward; each
    tower a root unit over the rest; parameters gathered in the autocast dtype (bf16 on
    CUDA; fp32 without autocast), gradients reduced in fp32 every micro-batch.

    forward:  both query roots (kept gathered until backward) + the running key tower's
              root (key towers reshard after their forward) + the largest block and the
              prefetched next one;
    backward: both query roots + the larger of (a) two gathered blocks and one block's
              unsharded gradient (autograd's, in the gather dtype) with its fp32
              reduce-scatter input, (b) at the end, both roots' unsharded gradients and
              one root's fp32 reduce-scatter input (roots reduce last, one after another);
    optimizer: nothing unsharded (roots reshard after backward).
    """
    img, txt = profile.image, profile.text
    gather = 2 if profile.precision == "bf16" else _F32
    block = max(img.largest_block_params, txt.largest_block_params)
    roots = img.root_params + txt.root_params
    blocks_time = {"fsdp.gathered_blocks": 2 * block * gather, "fsdp.unsharded_grads": block * (gather + _F32)}
    roots_time = {"fsdp.gathered_blocks": 0,
                  "fsdp.unsharded_grads": roots * gather + max(img.root_params, txt.root_params) * _F32}
    backward_grads = max(blocks_time, roots_time, key=lambda t: sum(t.values()))
    key_root = max(img.root_params, txt.root_params) * gather if momentum_encoder else 0
    return {
        "forward": {"fsdp.unsharded_roots": roots * gather, "fsdp.key_root": key_root,
                    "fsdp.gathered_blocks": 2 * block * gather},
        "backward": {"fsdp.unsharded_roots": roots * gather, **backward_grads},
        "optimizer": {},
    }


def estimate_phases(cfg: Config, profile: ModelProfile, world_size: int, batch: int,
                    queue_size: int, exact_loss: bool = True) -> dict[str, dict[str, int]]:
    """Bytes per part in each phase of one optimizer step (see the module docstring),
    costed for `cfg.run.parallel` (ddp: whole state on every rank; fsdp: sharded state,
    unsharded transients, no autocast weight copies).

    `exact_loss` traces the loss at these exact sizes; False evaluates `loss_model`.
    """
    m, b, w = cfg.model, batch, world_size
    d = m.embed_dim
    k = queue_size if cfg.queue.enabled else 0
    wb = w * b
    accum = cfg.optim.accum_steps
    fsdp = cfg.run.parallel == "fsdp"
    state = _fsdp_state(profile, w) if fsdp else _ddp_state(profile)
    grads_key = "grads.sharded" if fsdp else "grads"
    # Gradients are None during the forward (zero_grad(set_to_none=True)) except across
    # the micro-batches of gradient accumulation.
    forward_state = {**state, grads_key: state[grads_key] if accum > 1 else 0}
    queues = {
        "queues.features": 2 * k * d * _QUEUE_BYTES[cfg.queue.dtype],
        "queues.ids": 2 * k * META_COLUMNS * _I64,
    }
    inputs = {"inputs": b * (profile.image.input_bytes_per_sample + profile.text.input_bytes_per_sample)}
    # compute_keys: packed all-gather [W*B, 2D+2F] fp32 (F int64 meta columns; a view of the
    # local cat when W=1, plus the send buffer when W>1) and an int64 copy of the meta; each
    # micro-batch's are
    # held until the enqueue after the optimizer step. Local keys [B, D] x 2 (in the CLIP
    # mode the keys are the queries, costed with the towers; the gathered rows get a
    # gradient of their own size in backward).
    clip = not m.momentum_encoder
    row = (2 * d + 2 * META_COLUMNS) * _F32
    packed = wb * row + wb * META_COLUMNS * _I64 + (b * row if w > 1 else 0)
    gathered = {"gathered.keys": accum * packed + (0 if clip else 2 * b * d * _F32)}
    shuffle = 0
    if w > 1:
        for tower in (profile.image, profile.text):
            if tower.has_batchnorm:
                # all-to-all: this rank's inputs reordered (B rows) and the B rows it
                # receives, their keys and the keys sent back: constant in W.
                shuffle += 2 * b * tower.input_bytes_per_sample + 2 * b * d * _F32
    g = wb if m.in_batch_negatives else 0
    bf16 = profile.precision == "bf16"
    learnt_t = learns_temperature(m.loss, m.learn_temperature)
    params = tuple(sorted(objective_params(m).items()))
    distill = m.momentum_encoder and m.distill_alpha > 0
    if exact_loss:
        lf = loss_footprint(m.loss, learnt_t, d, b, k, g, cfg.queue.dtype, bf16, clip, params, distill)
    else:
        fit = loss_model(m.loss, learnt_t, d, m.in_batch_negatives, cfg.queue.dtype, bf16, clip, params, distill)
        lf = LossFootprint(**{name: f.at(b, k + g) for name, f in fit.items()})
    img, txt = profile.image, profile.text

    def kept(traced: Linear, autocast_copies: Linear) -> int:
        # Under FSDP the gathered weights are already bf16: autocast copies none, and the
        # weights a block saves for backward are its gathered ones, freed when it reshards
        # (the query roots' are counted as unsharded roots). The traced copies come out.
        return max(0, traced.at(b) - autocast_copies.at(b)) if fsdp else traced.at(b)

    fsdp_parts = _fsdp_transients(profile, m.momentum_encoder) if fsdp else dict.fromkeys(
        ("forward", "backward", "optimizer"), {})

    forward = {
        **forward_state, **queues, **inputs,
        "activations.image": kept(img.forward_live, img.autocast_live),
        "activations.text": kept(txt.forward_live, txt.autocast_live),
        **fsdp_parts["forward"],
        "key_forward.transient": 0 if clip else max(img.no_grad_peak.at(b), txt.no_grad_peak.at(b)),
        **gathered,
        "gathered.shuffle": shuffle,
        "loss.forward": 2 * lf.forward_peak,
    }
    backward = {
        **state, **queues, **inputs,
        "activations.image": kept(img.saved, img.autocast_saved),
        "activations.text": kept(txt.saved, txt.autocast_saved),
        **fsdp_parts["backward"],
        "backward.transient": max(img.backward_extra.at(b), txt.backward_extra.at(b)),
        "negatives": 2 * lf.negatives,
        "logits": 2 * lf.logits,
        "logit_grads": lf.backward_extra,
        **gathered,
    }
    optimizer = {
        **state, **queues, **inputs,
        ("optimizer.step_temp.sharded" if fsdp else "optimizer.step_temp"): state[grads_key],
        **fsdp_parts["optimizer"],
        **gathered,
    }
    return {"forward": forward, "backward": backward, "optimizer": optimizer}


def _required(cfg: Config, profile: ModelProfile, world_size: int, batch: int, queue_size: int,
              margin: Margin, exact_loss: bool) -> int:
    phases = estimate_phases(cfg, profile, world_size, batch, queue_size, exact_loss)
    peak = max(sum(p.values()) for p in phases.values())
    return peak + margin.bytes(peak)


def _largest(fits: Callable[[int], bool], lo: int) -> int:
    """Largest n >= lo with fits(n), for fits monotone (True then False); lo - 1 if none."""
    if not fits(lo):
        return lo - 1
    hi = max(lo, 1)
    while fits(hi * 2):
        hi *= 2
        if hi > 1 << 40:  # unbounded: nothing in the step grows with n
            return hi
    good, bad = hi, hi * 2
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def _confirmed(fits: Callable[..., bool], guess: int) -> int:
    """The largest n with fits(n, exact=True) (0: none), starting from the fitted search's
    `guess`: usually right or off by a few, so gallop away from it one, two, four ... steps,
    then bisect (a handful of exact traces instead of one per candidate)."""
    exact = functools.partial(fits, exact=True)
    if guess < 1:
        if not exact(1):
            return 0
        guess = 1
    if exact(guess):  # the fit was right or low: gallop up
        step = 1
        while exact(guess + step):
            guess, step = guess + step, step * 2
        return _bisect(exact, guess, guess + step)
    bad, step = guess, 1  # the fit was high: gallop down
    while bad - step >= 1 and not exact(bad - step):
        bad, step = bad - step, step * 2
    if bad - step < 1:
        return _bisect(exact, 1, bad) if exact(1) else 0
    return _bisect(exact, bad - step, bad)


def _bisect(fits: Callable[[int], bool], good: int, bad: int) -> int:
    """Largest n in [good, bad) with fits(n), given fits(good) and not fits(bad)."""
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def resolve_gpu(gpu: str | GpuSpec) -> GpuSpec:
    if isinstance(gpu, GpuSpec):
        return gpu
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; choose one of {', '.join(GPUS)}")
    return GPUS[gpu]


def _fsdp_note(profile: ModelProfile) -> str:
    """The FSDP units the plan costs, per tower (a tower with no block list: no blocks)."""
    units = [f"{kind} tower {t.n_blocks} blocks (largest {t.largest_block_params / 1e6:.1f}M params) + root "
             f"{t.root_params / 1e6:.1f}M" for kind, t in (("image", profile.image), ("text", profile.text))]
    return ("run.parallel=fsdp: state sharded over the ranks; " + "; ".join(units)
            + f"; gathered in {profile.precision}, gradients reduce-scattered in fp32")


def plan(cfg: Config, gpu: str | GpuSpec, world_size: int = 8, *, vocab_size: int | None = None,
         margin: Margin = Margin(), depth_extrapolation: bool = True,
         profile: ModelProfile | None = None) -> MemoryPlan:
    """Plan one training step of `cfg` on `gpu` with `world_size` ranks.

    world_size defaults to 8 (one node): the logits and gathered keys grow with the global
    batch (DDP's buckets are the gradients themselves; Shuffle-BN's exchange stays ~2B rows);
    under `run.parallel: fsdp` the weights, gradients and AdamW states shrink as 1/W.
    """
    spec = resolve_gpu(gpu)
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    from moco_mm.model.clip_towers import resolve_init

    resolve_init(cfg.model, need_weights=False)  # a CLIP start fixes embed_dim and image_size
    notes: list[str] = []
    if vocab_size is None:
        vocab_size, source = default_vocab_size(cfg)
        notes.append(f"text vocabulary {vocab_size} ({source})")
    if profile is None:
        profile = profile_model(cfg, vocab_size, depth_extrapolation)
    notes.append(f"image tower activations: {profile.image.method}; text tower: {profile.text.method}")
    notes.append(f"{profile.n_params_query / 1e6:.1f}M query parameters ({profile.n_trainable / 1e6:.1f}M trained), "
                 "the same again in the key towers")
    if cfg.run.compile:
        notes.append("run.compile: traced in eager mode; torch.compile usually keeps less (the plan is conservative)")
    if cfg.optim.accum_steps > 1:
        notes.append(f"optim.accum_steps={cfg.optim.accum_steps}: one micro-batch's activations at a time; "
                     "gradients persist across micro-batches and each one's gathered keys wait for the enqueue")
    if cfg.run.parallel == "fsdp":
        for kind, tower in (("image", profile.image), ("text", profile.text)):
            if not tower.n_blocks:  # the trainer makes it one FSDP unit: its root is all of it
                notes.append(f"run.parallel=fsdp: the {kind} tower has no list of blocks: one FSDP unit, "
                             "gathered whole for its forward and backward")
        notes.append(_fsdp_note(profile))
    b, k = cfg.data.batch_size, cfg.queue.size
    phases = estimate_phases(cfg, profile, world_size, b, k)
    phase = max(phases, key=lambda p: sum(phases[p].values()))
    parts = phases[phase]
    peak = sum(parts.values())
    margin_bytes = margin.bytes(peak)
    required = peak + margin_bytes

    def batch_fits(n: int, exact: bool = False) -> bool:
        return _required(cfg, profile, world_size, n, k, margin, exact) <= spec.capacity_bytes

    def queue_fits(n: int, exact: bool = False) -> bool:
        return _required(cfg, profile, world_size, b, n, margin, exact) <= spec.capacity_bytes

    # Search with the fitted loss model, then correct the answer with exact traces.
    max_batch = _confirmed(batch_fits, max(0, _largest(batch_fits, 1)))
    if cfg.queue.enabled:
        max_queue = _confirmed(queue_fits, max(0, _largest(queue_fits, 1)))
    else:
        max_queue = 0
        notes.append("queue.enabled is false: no queue is held (max_queue_size 0)")
    notes += queue_warnings(cfg, world_size)
    if max_batch == 0 and cfg.run.parallel == "ddp":
        notes.append("no batch fits: DDP keeps every weight, gradient and AdamW state whole on each GPU "
                     "(the state line above); run.parallel=fsdp (--parallel fsdp) shards them over the ranks")
    return MemoryPlan(
        gpu=spec.name, capacity_bytes=spec.capacity_bytes, world_size=world_size, parallel=cfg.run.parallel,
        batch_per_gpu=b,
        queue_size=k if cfg.queue.enabled else 0, embed_dim=cfg.model.embed_dim, precision=profile.precision,
        accum_steps=cfg.optim.accum_steps, phase=phase, parts=parts, phases=phases, peak_bytes=peak,
        margin_bytes=margin_bytes, required_bytes=required, fits=required <= spec.capacity_bytes,
        margin_policy=margin.describe(), max_batch_per_gpu=max_batch, max_queue_size=max_queue, notes=notes,
    )
