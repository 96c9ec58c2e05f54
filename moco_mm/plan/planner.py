"""Peak GPU memory of one training step, planned before the run (`tools/plan_memory.py`).

    plan(cfg, "a100-40gb", world_size=8) -> MemoryPlan
        .parts               bytes per component of the peak phase; sum(parts) == peak_bytes
        .required_bytes      peak_bytes + margin_bytes; the config fits when <= capacity_bytes
        .max_batch_per_gpu   largest data.batch_size that fits (queue as configured)
        .max_queue_size      largest queue.size that fits (batch as configured)

What one step holds, per rank (B = data.batch_size, W = world size, K = queue.size,
D = model.embed_dim, N = K + W*B negatives per query with in-batch negatives on):

- fp32 master weights of the query towers and of their momentum (key) copies;
- fp32 gradients of the trainable query weights, AdamW's two fp32 states of each, and
  under DDP (W > 1) gradient buckets of the same size (DDP's default
  `gradient_as_bucket_view=False` keeps buckets beside `.grad`);
- the two queues (K x D in `queue.dtype`, plus int64 ids);
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
- the gathered keys [W*B, 2D+2] (held until the enqueue, per micro-batch) and, for
  BatchNorm towers with W > 1, the Shuffle-BN gathered inputs.

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

import copy
import dataclasses
import json
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from moco_mm.config import Config, ConfigError, ModelConfig

GIB = 1 << 30
_F32 = 4
_I64 = 8
_QUEUE_BYTES = {"float32": 4, "bfloat16": 2}


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
# Measuring what a traced step holds
# ---------------------------------------------------------------------------------------


def _key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (views share it; fake and meta tensors have one too)."""
    return t.untyped_storage()._cdata


class _SavedBytes:
    """`saved_tensors_hooks` pack hook that records saved storages, once each.

    Storages in `ignore` (parameters, buffers, inputs: costed elsewhere) are skipped.
    Each record carries `owner()` at pack time (who saved it). `total()` counts only
    the recorded storages still alive, so a storage freed and its address reused is
    never counted twice.
    """

    def __init__(self, ignore: set[int], owner: Callable[[], object] = lambda: None):
        self.ignore = ignore
        self.owner = owner
        self.seen: dict[int, tuple[StorageWeakRef, int, object]] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        k = s._cdata
        if k not in self.ignore:
            old = self.seen.get(k)
            if old is None or old[0].expired():
                self.seen[k] = (StorageWeakRef(s), s.nbytes(), self.owner())
        return t

    def alive(self) -> set[int]:
        return {k for k, (ref, _, _) in self.seen.items() if not ref.expired()}

    def total(self, keys: set[int] | None = None, owner: object = None) -> int:
        return sum(n for k, (ref, n, o) in self.seen.items()
                   if not ref.expired() and (keys is None or k in keys) and (owner is None or o == owner))

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


_aten = torch.ops.aten
_PRIM_DEVICE = torch.ops.prim.device.default


def _plain(*ts) -> bool:
    return all(t is None or (isinstance(t, torch.Tensor) and t.is_contiguous()) for t in ts)


def _fast_outputs(func, args, kwargs):
    """Output tensors (no values) of a few ops whose fake implementation is slow (Python
    decompositions: ~10 ms a call, most of an EfficientNet trace), or None to run the
    real fake implementation. Only for contiguous inputs of one dtype, where the outputs
    are plain `empty` tensors; `tests/test_plan_memory.py` checks shapes, dtypes and
    strides against the fake implementation."""
    if kwargs:
        return None
    if func is _aten.native_batch_norm.default:
        x, w, b, rm, rv, training = args[:6]
        if not _plain(x, w, b):
            return None
        c = x.shape[1] if training else 0
        return torch.empty_like(x), x.new_empty((c,)), x.new_empty((c,))
    if func is _aten.native_batch_norm_backward.default:
        go, x, w = args[:3]
        mask = args[9]
        if not _plain(go, x, w) or go.dtype != x.dtype:
            return None
        stat = (lambda: torch.empty_like(w)) if w is not None else (lambda: x.new_empty((x.shape[1],)))
        return (torch.empty_like(x) if mask[0] else None, stat() if mask[1] else None, stat() if mask[2] else None)
    if func in (_aten.silu_backward.default, _aten.sigmoid_backward.default):
        a, b = args[:2]
        if not _plain(a, b) or a.dtype != b.dtype or a.shape != b.shape:
            return None
        return torch.empty_like(a)
    return None


class _LiveBytes(TorchDispatchMode):
    """Bytes of every storage created by an op under this mode that is still alive.

    While `watching`, `peak` is the maximum over op boundaries of the bytes allocated
    since `watch()` and still alive, minus `offset` (the trainer's gradients, costed as
    their own part): the transient above whatever already existed (saved activations),
    so it does not depend on how much of that is still alive. Exact but cheap: a full
    recount only happens when an upper bound (last count + everything allocated since)
    could beat the peak.

    `owner` (set by the caller, e.g. from module hooks) tags each new storage with who
    created it; `derived` (optional) follows storages computed only from a seed set.
    """

    def __init__(self, ignore: set[int], derived: set[int] | None = None):
        super().__init__()
        self.ignore = ignore
        self.derived = derived
        self.refs: dict[int, tuple[StorageWeakRef, int, object]] = {}
        self.owner: object = None
        self.watching = False
        self.peak = 0
        self.offset = 0
        self._bound = 0
        self._before: set[int] = set()  # storages alive at watch(): not transients

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _PRIM_DEVICE:  # a metadata query, the most frequent call: nothing to record
            return func(*args, **(kwargs or {}))
        out = _fast_outputs(func, args, kwargs)
        if out is None:
            out = func(*args, **(kwargs or {}))
        from_seed = False
        if self.derived is not None:
            ins = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            from_seed = bool(ins) and all(_key(a) in self.derived for a in ins)
        added = 0
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            s = t.untyped_storage()
            k = s._cdata
            if from_seed:
                self.derived.add(k)
            if k in self.ignore:
                continue
            old = self.refs.get(k)
            if old is None or old[0].expired():
                n = s.nbytes()
                self.refs[k] = (StorageWeakRef(s), n, self.owner)
                added += n
        if added and self.watching:
            self._bound += added
            if self._bound - self.offset > self.peak:
                self._bound = self.live(new_only=True)
                self.peak = max(self.peak, self._bound - self.offset)
        return out

    def live(self, owner: object = None, keys: set[int] | None = None, new_only: bool = False) -> int:
        """Live bytes (of one owner's storages / of `keys` / allocated since `watch()`)."""
        dead = [k for k, (ref, _, _) in self.refs.items() if ref.expired()]
        for k in dead:
            del self.refs[k]
            self._before.discard(k)
        return sum(n for k, (_, n, o) in self.refs.items()
                   if (owner is None or o == owner) and (keys is None or k in keys)
                   and not (new_only and k in self._before))

    def watch(self) -> None:
        """Start tracking the peak of what is allocated from now on."""
        self.live()
        self._before = set(self.refs)
        self._bound = 0
        self.peak = 0
        self.watching = True


@contextmanager
def _fused_attention() -> Iterator[None]:
    """Trace attention as CUDA's fused kernels hold it.

    On CUDA, `scaled_dot_product_attention` with dropout runs fused (flash / memory-
    efficient) and keeps q, k, v, out, the log-sum-exp and an RNG seed; the CPU cannot
    fuse dropout and keeps the B x H x L x L probabilities and mask instead. While
    tracing, attention therefore runs without dropout, which keeps what the fused CUDA
    kernel keeps. The function is swapped on the module (timm and transformers look it
    up at call time) rather than through a TorchFunctionMode, because a checkpoint's
    recomputation during backward does not see function modes.
    """
    original = F.scaled_dot_product_attention

    def without_dropout(*args, **kwargs):
        if len(args) > 4:
            args = (*args[:4], 0.0, *args[5:])
        else:
            kwargs["dropout_p"] = 0.0
        return original(*args, **kwargs)

    F.scaled_dot_product_attention = without_dropout
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    # Non-fake inputs are allowed only so that `to_empty` can read the meta parameters.
    return FakeTensorMode(allow_non_fake_inputs=True)


def _autocast(dtype: torch.dtype | None):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else nullcontext()


# ---------------------------------------------------------------------------------------
# Tower profiles: activations as fixed + per_sample * B
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Linear:
    """`fixed + per_sample * batch` bytes, never negative."""

    fixed: float
    per_sample: float

    def at(self, batch: int) -> int:
        return max(0, int(round(self.fixed + self.per_sample * batch)))

    @staticmethod
    def fit(b1: int, v1: float, b2: int, v2: float) -> "Linear":
        slope = (v2 - v1) / (b2 - b1)
        return Linear(v1 - slope * b1, slope)


@dataclass(frozen=True)
class _Trace:
    """One traced forward/backward of a tower at one batch size (bytes)."""

    saved: int  # kept for backward at the end of the forward
    forward_live: int  # alive at the end of the forward, inside autocast (adds its weight cache)
    backward_extra: int  # peak allocated during backward above what the forward left, gradients excluded
    no_grad_peak: int  # peak of the same forward without autograd (the key tower)


@dataclass(frozen=True)
class TowerProfile:
    """What one query tower (and its key copy) costs beyond its weights, per batch B.

    Invariant: every field is a `Linear` in the per-GPU batch; `saved.at(B)` is what the
    step keeps for this tower's backward.
    """

    saved: Linear
    forward_live: Linear
    backward_extra: Linear
    no_grad_peak: Linear
    input_bytes_per_sample: int
    has_batchnorm: bool
    method: str  # "full trace" | "depth-extrapolated (...)"
    weight_bytes: int  # parameters + buffers of one copy (fp32 masters)
    n_params: int
    trainable_bytes: int  # fp32 bytes of the parameters that require grad
    n_trainable: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "TowerProfile":
        d = dict(d)
        for name in ("saved", "forward_live", "backward_extra", "no_grad_peak"):
            d[name] = Linear(**d[name])
        return TowerProfile(**d)


@dataclass
class _RepeatedRun:
    """`length` structurally identical consecutive children of `parent` from `start`."""

    parent: nn.Module
    start: int
    length: int

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.parent._modules.values())[self.start:self.start + self.length]


def _signature(m: nn.Module) -> tuple:
    """Everything about a block that can change what it saves: module types and their
    hyper-parameters (extra_repr: stride, drop rates, ...), parameter shapes and flags."""
    mods = tuple((n, type(s).__name__, s.extra_repr(), bool(getattr(s, "gradient_checkpointing", False)))
                 for n, s in m.named_modules())
    params = tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in m.named_parameters())
    bufs = tuple((n, tuple(b.shape), b.dtype) for n, b in m.named_buffers())
    return mods, params, bufs


def _repeated_runs(tower: nn.Module) -> list[_RepeatedRun]:
    """Disjoint runs (>= 3 long) of identical blocks: a ViT's or BERT's layer stack, the
    repeated blocks of each EfficientNet stage. Outer containers win over inner ones."""
    runs: list[_RepeatedRun] = []
    inside: set[int] = set()  # modules within a selected run's blocks
    for mod in tower.modules():
        if id(mod) in inside or not isinstance(mod, (nn.Sequential, nn.ModuleList)):
            continue
        children = list(mod._modules.values())
        sigs = [_signature(c) for c in children]
        i = 0
        while i < len(children):
            j = i + 1
            while j < len(children) and sigs[j] == sigs[i]:
                j += 1
            if j - i >= 3:
                run = _RepeatedRun(mod, i, j - i)
                runs.append(run)
                inside.update(id(x) for blk in run.blocks for x in blk.modules())
            i = j
    return runs


@contextmanager
def _shallow(runs: list[_RepeatedRun], depth: int) -> Iterator[None]:
    """Temporarily keep only the first `depth` blocks of every run."""
    originals = []
    for run in runs:
        modules = run.parent._modules
        children = list(modules.values())
        kept = children[: run.start + depth] + children[run.start + run.length:]
        originals.append((run.parent, modules))
        run.parent._modules = dict((str(i), c) for i, c in enumerate(kept))
    try:
        yield
    finally:
        for parent, modules in originals:
            parent._modules = modules


def _trace_once(tower: nn.Module, inputs: tuple, autocast_dtype: torch.dtype | None,
                windows: list[tuple[nn.Module, nn.Module]] = ()) -> tuple[_Trace, list[tuple[int, int]]]:
    """Forward + backward with autograd, then a no-grad forward, of a fake tower.

    For each (first, second) block pair in `windows`, also returns the (saved,
    forward_live) bytes that belong to the window from the end of `first` to the end of
    `second`: what is saved in it (`second`'s activations and the input it keeps, even
    when a checkpoint wrapper saves that input before `second` starts) and what is
    created in it and kept alive unsaved (autocast's weight copies). That is exactly
    what one more identical block adds to a run.
    """
    ignore = {_key(t) for t in (*tower.parameters(), *tower.buffers(), *inputs)}
    trained = [p for p in tower.parameters() if p.requires_grad]
    live = _LiveBytes(ignore)
    saved_hook = _SavedBytes(ignore, owner=lambda: live.owner)

    def on_grad(p: torch.Tensor) -> None:
        live.offset += p.grad.untyped_storage().nbytes()

    def set_owner(owner):
        def hook(module, args, out):
            if not live.watching:  # the forward only, not the recomputation in backward
                live.owner = owner
        return hook

    handles = [p.register_post_accumulate_grad_hook(on_grad) for p in trained]
    for i, (first, second) in enumerate(windows):
        handles += [first.register_forward_hook(set_owner(i)), second.register_forward_hook(set_owner(None))]
    try:
        with saved_hook.hooks(), live, _fused_attention():
            with _autocast(autocast_dtype):
                out = tower(*inputs)
                saved_keys = saved_hook.alive()
                forward_live = live.live()
                unsaved_kept = [live.live(owner=i) - live.live(owner=i, keys=saved_keys)
                                for i in range(len(windows))]
            saved = saved_hook.total()
            per_window = [(saved_hook.total(owner=i), saved_hook.total(owner=i) + unsaved_kept[i])
                          for i in range(len(windows))]
            live.watch()
            if out.requires_grad:
                # Any scalar of the output gives every activation its gradient.
                out.float().sum().backward()
            backward_extra = live.peak
            del out
    finally:
        for h in handles:
            h.remove()
        for p in trained:
            p.grad = None
    # The key tower: same architecture, no parameter requires grad (so autocast keeps no
    # weight cache), no autograd.
    flags = [(p, p.requires_grad) for p in tower.parameters()]
    tower.requires_grad_(False)
    try:
        idle = _LiveBytes(ignore)
        with torch.no_grad(), idle, _fused_attention():
            idle.watch()
            with _autocast(autocast_dtype):
                tower(*inputs)
        no_grad_peak = idle.peak
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return _Trace(saved, forward_live, backward_extra, no_grad_peak), per_window


# Traced at two batch sizes; (2, 4) rather than (1, 2) so the slope is not skewed by
# batch-independent transients (a bf16 weight gradient) that a batch of one can expose.
_TRACE_BATCHES = (2, 4)


def _profile_fake_tower(tower: nn.Module, make_inputs: Callable[[int], tuple],
                        autocast_dtype: torch.dtype | None, depth_extrapolation: bool) -> tuple[dict, str]:
    """Trace a fake tower at `_TRACE_BATCHES`; -> {field: Linear}, method.

    With `depth_extrapolation`, every run of L >= 3 identical blocks is cut to 2 blocks
    and what the second block adds is measured (see `_trace_once` windows): each of the
    L - 2 blocks left out would add exactly that, so the sums (saved, forward_live) of
    the full tower are the shallow tower's plus (L - 2) times it. The transients
    (backward_extra, no_grad_peak) are set by one block at a time and are the shallow
    tower's.
    """
    runs = _repeated_runs(tower) if depth_extrapolation else []
    traces: dict[int, _Trace] = {}
    for b in _TRACE_BATCHES:
        inputs = make_inputs(b)
        if not runs:
            traces[b] = _trace_once(tower, inputs, autocast_dtype)[0]
            continue
        with _shallow(runs, 2):
            windows = [(run.blocks[0], run.blocks[1]) for run in runs]
            shallow, per_block = _trace_once(tower, inputs, autocast_dtype, windows)
        extra = [run.length - 2 for run in runs]
        traces[b] = dataclasses.replace(
            shallow,
            saved=shallow.saved + sum(n * s for n, (s, _) in zip(extra, per_block)),
            forward_live=shallow.forward_live + sum(n * f for n, (_, f) in zip(extra, per_block)),
        )
    b1, b2 = _TRACE_BATCHES
    fits = {f.name: Linear.fit(b1, getattr(traces[b1], f.name), b2, getattr(traces[b2], f.name))
            for f in dataclasses.fields(_Trace)}
    if not runs:
        method = "full trace"
    else:
        lengths = "+".join(str(r.length) for r in runs)
        method = f"depth-extrapolated ({len(runs)} run(s) of identical blocks, {lengths} blocks, traced at 2 each)"
    return fits, method


# ---------------------------------------------------------------------------------------
# The model profile (batch-independent facts + tower profiles)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelProfile:
    """Weights and per-tower activation profiles of one model config at one precision.

    `param_bytes_query` counts the query towers' parameters and buffers (and the
    temperature); `param_bytes_key` the key copies'; `trainable_bytes` the fp32 bytes of
    the parameters the optimizer sees (gradients, each AdamW state, DDP buckets).
    """

    precision: str  # "bf16" | "fp32"
    vocab_size: int
    param_bytes_query: int
    param_bytes_key: int
    trainable_bytes: int
    n_params_query: int
    n_trainable: int
    image: TowerProfile
    text: TowerProfile


def autocast_dtype_for(cfg: Config) -> torch.dtype | None:
    """The step's autocast dtype on a GPU: `auto` means bf16 there (the planner plans for CUDA)."""
    return None if cfg.run.precision == "fp32" else torch.bfloat16


def _offline_model_config(m: ModelConfig) -> ModelConfig:
    """Same architecture with nothing to load: weights are never needed to plan."""
    m = copy.deepcopy(m)
    m.image.pretrained = False
    m.text.pretrained = False
    return m


def default_vocab_size(cfg: Config) -> tuple[int, str]:
    """The text tower's vocabulary as the trainer will build it, and where it came from.

    The trainer passes `len(tokenizer)`; without the tokenizer at hand, an explicit
    `overrides.vocab_size` or the Hugging Face config's default stands in.
    """
    import os

    t = cfg.model.text
    if "vocab_size" in t.overrides:
        return int(t.overrides["vocab_size"]), "model.text.overrides.vocab_size"
    tokenizer = t.tokenizer or t.name
    if os.path.isdir(tokenizer):  # only a local tokenizer: planning never goes online
        try:
            from moco_mm.encoders import load_tokenizer

            return len(load_tokenizer(t)), f"tokenizer {tokenizer}"
        except (ConfigError, OSError, ValueError):
            pass
    from transformers import AutoConfig, CONFIG_MAPPING

    if t.name in CONFIG_MAPPING:
        return int(AutoConfig.for_model(t.name).vocab_size), f"default of Hugging Face '{t.name}' (tokenizer not found)"
    return int(AutoConfig.from_pretrained(t.name).vocab_size), f"config of {t.name}"


def _param_bytes(module: nn.Module, trainable_only: bool = False) -> tuple[int, int]:
    """(bytes, count) of parameters (+ buffers unless trainable_only), fp32 masters."""
    n_bytes = n = 0
    for p in module.parameters():
        if trainable_only and not p.requires_grad:
            continue
        n += p.numel()
        n_bytes += p.numel() * (4 if trainable_only else p.element_size())
    if not trainable_only:
        n_bytes += sum(b.numel() * b.element_size() for b in module.buffers())
    return n_bytes, n


# Bump when the tracing changes what it measures: cached profiles then stop matching.
PROFILE_VERSION = 1

_TOWERS: dict[str, TowerProfile] = {}


def tower_profile_key(kind: str, m: ModelConfig, autocast_dtype: torch.dtype | None, vocab_size: int,
                      depth_extrapolation: bool = True) -> str:
    """Short stable id of what a tower profile depends on in our code and config: the
    tower's config, the head, the precision, the vocabulary, the method and the tracer's
    version. Library versions are deliberately not in it: a newer timm or transformers
    usually saves the same tensors, and a test re-traces the shipped towers and compares
    the numbers (tests/tower_profiles.py), which catches the releases that do not."""
    import hashlib

    m = _offline_model_config(m)
    tower_cfg = m.image if kind == "image" else m.text
    blob = json.dumps([PROFILE_VERSION, kind, dataclasses.asdict(tower_cfg), m.embed_dim, m.head,
                       m.head_hidden_dim, vocab_size if kind == "text" else None, str(autocast_dtype),
                       depth_extrapolation],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def register_tower_profile(key: str, profile: TowerProfile | dict) -> None:
    """Seed the in-process cache (e.g. with profiles traced earlier: `TowerProfile.to_dict`)."""
    _TOWERS[key] = profile if isinstance(profile, TowerProfile) else TowerProfile.from_dict(profile)


def tower_profile(kind: str, m: ModelConfig, autocast_dtype: torch.dtype | None, vocab_size: int,
                  depth_extrapolation: bool = True) -> TowerProfile:
    """Profile the `kind` ("image" | "text") tower of model config `m` (cached per tower).

    Built on the meta device (no weights, no download), traced with fake tensors.
    """
    from moco_mm.encoders import ImageTower, TextTower, has_batchnorm

    key = tower_profile_key(kind, m, autocast_dtype, vocab_size, depth_extrapolation)
    if key in _TOWERS:
        return _TOWERS[key]
    m = _offline_model_config(m)
    try:
        with torch.device("meta"):
            if kind == "image":
                tower = ImageTower(m.image, m.embed_dim, m.head, m.head_hidden_dim)
            else:
                tower = TextTower(m.text, m.embed_dim, m.head, m.head_hidden_dim, vocab_size)
    except ConfigError:
        raise
    except Exception as e:  # a model whose constructor computes with tensor values
        name = m.image.name if kind == "image" else m.text.name
        raise ConfigError(f"model.{kind}.name: cannot build {name!r} without weights for planning: {e!r}") from e
    weight_bytes, n_params = _param_bytes(tower)
    trainable_bytes, n_trainable = _param_bytes(tower, trainable_only=True)
    if kind == "image":
        size = m.image.image_size

        def make_inputs(b: int) -> tuple:
            return (torch.empty(b, 3, size, size),)

        input_bytes = 3 * size * size * _F32
    else:
        length = m.text.max_length

        def make_inputs(b: int) -> tuple:
            return torch.zeros(b, length, dtype=torch.long), torch.ones(b, length, dtype=torch.long)

        input_bytes = 2 * length * _I64 + _I64  # input_ids + attention_mask + sample_id
    with _fake_mode():
        tower = tower.to_empty(device="cpu")
        fits, method = _profile_fake_tower(tower, make_inputs, autocast_dtype, depth_extrapolation)
    profile = TowerProfile(**fits, input_bytes_per_sample=input_bytes, has_batchnorm=has_batchnorm(tower),
                           method=method, weight_bytes=weight_bytes, n_params=n_params,
                           trainable_bytes=trainable_bytes, n_trainable=n_trainable)
    _TOWERS[key] = profile
    return profile


def profile_model(cfg: Config, vocab_size: int | None = None, depth_extrapolation: bool = True) -> ModelProfile:
    """Both towers' profiles and the weights of the whole model (towers cached).

    Costs seconds, allocates no tensor memory, downloads nothing.
    """
    if vocab_size is None:
        vocab_size = default_vocab_size(cfg)[0]
    dtype = autocast_dtype_for(cfg)
    image = tower_profile("image", cfg.model, dtype, vocab_size, depth_extrapolation)
    text = tower_profile("text", cfg.model, dtype, vocab_size, depth_extrapolation)
    temperature = _F32  # QueryTowers.log_temperature: a parameter if learnt, else a buffer
    learnt = 1 if cfg.model.learn_temperature else 0
    return ModelProfile(
        precision="fp32" if dtype is None else "bf16",
        vocab_size=vocab_size,
        param_bytes_query=image.weight_bytes + text.weight_bytes + temperature,
        param_bytes_key=image.weight_bytes + text.weight_bytes if cfg.model.momentum_encoder else 0,
        trainable_bytes=image.trainable_bytes + text.trainable_bytes + learnt * _F32,
        n_params_query=image.n_params + text.n_params + learnt,
        n_trainable=image.n_trainable + text.n_trainable + learnt,
        image=image,
        text=text,
    )


# ---------------------------------------------------------------------------------------
# The loss (one direction), traced at the exact sizes
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossFootprint:
    """One direction's loss (bytes): the bank of negatives it keeps (float32 [N,D] or its
    autocast copy), the rest it keeps (logits, log-softmax, masks), the backward's peak
    above those (the logits' gradients), and its forward peak (bank included)."""

    negatives: int
    logits: int
    backward_extra: int
    forward_peak: int


@lru_cache(maxsize=256)
def loss_footprint(loss: str, learn_temperature: bool, embed_dim: int, batch: int, queue_rows: int,
                   batch_key_rows: int, queue_dtype: str, bf16: bool, grad_keys: bool = False) -> LossFootprint:
    """Trace `LOSSES[loss]` for one direction as `DualQueueMoCo.forward` calls it.

    The bank is built by the model's own `negative_bank`: `cat([gathered batch keys
    (float32); queue rows .float()])`. `grad_keys`: the CLIP mode, where the keys and
    the gathered rows (the whole bank: there is no queue) carry gradients. Queries,
    positive keys, gathered keys and queue storage are costed elsewhere and excluded
    here. ~0.1 s (fake tensors, any size).
    """
    from moco_mm.losses import LOSSES
    from moco_mm.model import negative_bank

    fn = LOSSES[loss]
    d = embed_dim
    with _fake_mode():
        q = torch.empty(batch, d, requires_grad=True)
        k = torch.empty(batch, d, requires_grad=grad_keys)
        q_ids = torch.zeros(batch, dtype=torch.long)
        gathered = torch.empty(batch_key_rows, d, requires_grad=grad_keys)
        gathered_ids = torch.zeros(batch_key_rows, dtype=torch.long)
        queue = torch.empty(queue_rows, d, dtype=torch.bfloat16 if queue_dtype == "bfloat16" else torch.float32)
        queue_ids = torch.zeros(queue_rows, dtype=torch.long)
        log_t = torch.zeros((), requires_grad=learn_temperature)
        seeds = {_key(gathered), _key(queue)}
        ignore = {_key(t) for t in (q, k, q_ids, gathered, gathered_ids, queue, queue_ids, log_t)}
        saved_hook = _SavedBytes(ignore)
        live = _LiveBytes(ignore, derived=set(seeds))
        with saved_hook.hooks(), live:
            live.watch()
            with _autocast(torch.bfloat16 if bf16 else None):
                temperature = log_t.exp()
                bank, ids = negative_bank(gathered, gathered_ids, queue, queue_ids, in_batch=batch_key_rows > 0)
                out = fn(q, k, bank, temperature, q_ids, ids, grad_keys=grad_keys)
                del bank, ids
            forward_peak = live.peak
            negatives = saved_hook.total(live.derived)
            logits = saved_hook.total() - negatives
            live.watch()
            out.backward()
            backward_extra = live.peak
    return LossFootprint(negatives, logits, backward_extra, forward_peak)


@dataclass(frozen=True)
class Bilinear:
    """`a*B*N + b*B + c*N + e` bytes for batch B and N negatives per query."""

    a: float
    b: float
    c: float
    e: float

    def at(self, batch: int, negatives: int) -> int:
        return max(0, int(round(self.a * batch * negatives + self.b * batch + self.c * negatives + self.e)))


# Fit points of the loss model: large enough that no term is a rounding artefact.
_LOSS_FIT_B = (8, 16)
_LOSS_FIT_N = (512, 1024)


@lru_cache(maxsize=64)
def loss_model(loss: str, learn_temperature: bool, embed_dim: int, in_batch_negatives: bool,
               queue_dtype: str, bf16: bool, grad_keys: bool = False) -> dict[str, Bilinear]:
    """Each `LossFootprint` field as a bilinear function of (B, N), from 4 exact traces.

    Every tensor the loss holds is [B, N(+1)], [N, D], [B, D] or a scalar, so the saved
    parts are exactly bilinear; the peaks are a maximum over time of such sums, and the
    time that maximises them does not move with B and N. Used by the searches, which
    would otherwise trace the loss a hundred times; `plan` reports exact traces.
    """
    (b1, b2), (n1, n2) = _LOSS_FIT_B, _LOSS_FIT_N
    pts = {}
    for b in (b1, b2):
        for n in (n1, n2):
            g = b if in_batch_negatives else 0  # gathered keys of a single rank
            pts[b, n] = loss_footprint(loss, learn_temperature, embed_dim, b, n - g, g, queue_dtype, bf16, grad_keys)
    out = {}
    for f in dataclasses.fields(LossFootprint):
        v = {bn: getattr(fp, f.name) for bn, fp in pts.items()}
        a = (v[b2, n2] - v[b2, n1] - v[b1, n2] + v[b1, n1]) / ((b2 - b1) * (n2 - n1))
        db = (v[b2, n1] - v[b1, n1]) / (b2 - b1) - a * n1  # coefficient of B
        dn = (v[b1, n2] - v[b1, n1]) / (n2 - n1) - a * b1  # coefficient of N
        e = v[b1, n1] - a * b1 * n1 - db * b1 - dn * n1
        out[f.name] = Bilinear(a, db, dn, e)
    return out


# ---------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------


PART_NOTES = {
    "params.query": "fp32 weights + buffers of the query towers (and temperature)",
    "params.key": "fp32 weights + buffers of the momentum (key) towers",
    "grads": "fp32 gradients of the trainable query weights",
    "optimizer.adamw": "AdamW exp_avg + exp_avg_sq (fp32)",
    "optimizer.step_temp": "foreach AdamW temporaries (one fp32 copy)",
    "ddp.buckets": "DDP gradient buckets (world size > 1)",
    "queues.features": "2 queues x K x D in queue.dtype",
    "queues.ids": "2 queues x K int64 sample ids",
    "inputs": "the batch on the GPU (images fp32, token ids, masks)",
    "activations.image": "image query tower: kept for backward (+ autocast weight cache in forward)",
    "activations.text": "text query tower: kept for backward (+ autocast weight cache in forward)",
    "backward.transient": "largest backward transient (recompute, activation grads)",
    "key_forward.transient": "key towers' no-grad forward peak",
    "negatives": "negatives bank kept by q @ bank^T, 2 directions",
    "logits": "logits / log-softmax / masks B x (N+1), 2 directions",
    "logit_grads": "gradients of the logits (one direction at a time)",
    "loss.forward": "loss forward peak incl. banks, 2 directions",
    "gathered.keys": "all-gathered keys + ids (x accum_steps) + local keys",
    "gathered.shuffle": "Shuffle-BN gathered inputs and outputs (BN towers, W > 1)",
}


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

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["phase_totals"] = {k: sum(v.values()) for k, v in self.phases.items()}
        return d

    def table(self) -> str:
        """Human-readable breakdown (GiB) of the peak phase and the verdict."""
        w = max(len(k) for k in self.parts)
        lines = [f"memory plan: {self.gpu} ({self.capacity_bytes / GIB:.2f} GiB), world size {self.world_size}, "
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
            f"largest per-GPU batch that fits (queue {self.queue_size}): {self.max_batch_per_gpu}",
            f"largest queue that fits (batch {self.batch_per_gpu}): {self.max_queue_size}",
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def estimate_phases(cfg: Config, profile: ModelProfile, world_size: int, batch: int,
                    queue_size: int, exact_loss: bool = True) -> dict[str, dict[str, int]]:
    """Bytes per part in each phase of one optimizer step (see the module docstring).

    `exact_loss` traces the loss at these exact sizes; False evaluates `loss_model`.
    """
    m, b, w = cfg.model, batch, world_size
    d = m.embed_dim
    k = queue_size if cfg.queue.enabled else 0
    wb = w * b
    accum = cfg.optim.accum_steps
    grads = profile.trainable_bytes
    weights = {
        "params.query": profile.param_bytes_query,
        "params.key": profile.param_bytes_key,
    }
    ddp = {"ddp.buckets": grads if w > 1 else 0}
    queues = {
        "queues.features": 2 * k * d * _QUEUE_BYTES[cfg.queue.dtype],
        "queues.ids": 2 * k * _I64,
    }
    inputs = {"inputs": b * (profile.image.input_bytes_per_sample + profile.text.input_bytes_per_sample)}
    # compute_keys: packed all-gather [W*B, 2D+2] fp32 (a view of the local cat when W=1,
    # plus the send buffer when W>1) and an int64 copy of the ids; each micro-batch's are
    # held until the enqueue after the optimizer step. Local keys [B, D] x 2 (in the CLIP
    # mode the keys are the queries, costed with the towers; the gathered rows get a
    # gradient of their own size in backward).
    clip = not m.momentum_encoder
    packed = wb * (2 * d + 2) * _F32 + wb * _I64 + (b * (2 * d + 2) * _F32 if w > 1 else 0)
    gathered = {"gathered.keys": accum * packed + (0 if clip else 2 * b * d * _F32)}
    shuffle = 0
    if w > 1:
        for tower in (profile.image, profile.text):
            if tower.has_batchnorm:
                # gathered inputs [W*B,...], this rank's shuffled slice, gathered outputs x2
                shuffle += (wb + b) * tower.input_bytes_per_sample + 2 * wb * d * _F32
    g = wb if m.in_batch_negatives else 0
    bf16 = profile.precision == "bf16"
    if exact_loss:
        lf = loss_footprint(m.loss, m.learn_temperature, d, b, k, g, cfg.queue.dtype, bf16, clip)
    else:
        fit = loss_model(m.loss, m.learn_temperature, d, m.in_batch_negatives, cfg.queue.dtype, bf16, clip)
        lf = LossFootprint(**{name: f.at(b, k + g) for name, f in fit.items()})
    img, txt = profile.image, profile.text

    forward = {
        # Gradients are None during the forward (zero_grad(set_to_none=True)) except
        # across the micro-batches of gradient accumulation.
        **weights, "grads": grads if accum > 1 else 0, "optimizer.adamw": 2 * grads, **ddp, **queues, **inputs,
        "activations.image": img.forward_live.at(b),
        "activations.text": txt.forward_live.at(b),
        "key_forward.transient": 0 if clip else max(img.no_grad_peak.at(b), txt.no_grad_peak.at(b)),
        **gathered,
        "gathered.shuffle": shuffle,
        "loss.forward": 2 * lf.forward_peak,
    }
    backward = {
        **weights, "grads": grads, "optimizer.adamw": 2 * grads, **ddp, **queues, **inputs,
        "activations.image": img.saved.at(b),
        "activations.text": txt.saved.at(b),
        "backward.transient": max(img.backward_extra.at(b), txt.backward_extra.at(b)),
        "negatives": 2 * lf.negatives,
        "logits": 2 * lf.logits,
        "logit_grads": lf.backward_extra,
        **gathered,
    }
    optimizer = {
        **weights, "grads": grads, "optimizer.adamw": 2 * grads, **ddp, **queues, **inputs,
        "optimizer.step_temp": grads,
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


def resolve_gpu(gpu: str | GpuSpec) -> GpuSpec:
    if isinstance(gpu, GpuSpec):
        return gpu
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; choose one of {', '.join(GPUS)}")
    return GPUS[gpu]


def plan(cfg: Config, gpu: str | GpuSpec, world_size: int = 8, *, vocab_size: int | None = None,
         margin: Margin = Margin(), depth_extrapolation: bool = True,
         profile: ModelProfile | None = None) -> MemoryPlan:
    """Plan one training step of `cfg` on `gpu` with `world_size` ranks.

    world_size defaults to 8 (one node): from 2 ranks on DDP adds gradient buckets, and
    the logits and gathered keys grow with the global batch.
    """
    spec = resolve_gpu(gpu)
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
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

    # Search with the fitted loss model, then confirm the answer with an exact trace.
    max_batch = max(0, _largest(batch_fits, 1))
    while max_batch > 0 and not batch_fits(max_batch, exact=True):
        max_batch -= 1
    while batch_fits(max_batch + 1, exact=True):
        max_batch += 1
    if cfg.queue.enabled:
        max_queue = max(0, _largest(queue_fits, 1))
        while max_queue > 0 and not queue_fits(max_queue, exact=True):
            max_queue = max(0, max_queue - max(1, max_queue // 1000))
    else:
        max_queue = 0
        notes.append("queue.enabled is false: no queue is held (max_queue_size 0)")
    return MemoryPlan(
        gpu=spec.name, capacity_bytes=spec.capacity_bytes, world_size=world_size, batch_per_gpu=b,
        queue_size=k if cfg.queue.enabled else 0, embed_dim=cfg.model.embed_dim, precision=profile.precision,
        accum_steps=cfg.optim.accum_steps, phase=phase, parts=parts, phases=phases, peak_bytes=peak,
        margin_bytes=margin_bytes, required_bytes=required, fits=required <= spec.capacity_bytes,
        margin_policy=margin.describe(), max_batch_per_gpu=max_batch, max_queue_size=max_queue, notes=notes,
    )


# ---------------------------------------------------------------------------------------
# Validation: what a real step holds on the CPU
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepMeasurement:
    """Bytes one real forward/backward/AdamW step holds (CPU, no autocast).

    `params` covers query + key towers (weights and buffers), `grads` every `.grad`
    after backward, `optimizer` every tensor in AdamW's state after the step,
    `saved_towers` the storages autograd saved while the query towers ran (params,
    buffers and the batch excluded), `saved_loss` those saved after them (bank, logits).
    """

    params: int
    grads: int
    optimizer: int
    saved_towers: int
    saved_loss: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.saved_towers


def measure_step(cfg: Config, vocab_size: int, seed: int = 0) -> StepMeasurement:
    """Run one real step of `DualQueueMoCo` on the CPU (fp32) with full queues and measure.

    Independent of the planner's tracing: real tensors, the real model, the real loss,
    a real `torch.optim.AdamW` over the trainable query parameters.
    """
    from moco_mm.model import DualQueueMoCo

    torch.manual_seed(seed)
    model = DualQueueMoCo(cfg.model, cfg.queue, vocab_size=vocab_size)
    b, d, length, size = cfg.data.batch_size, cfg.model.embed_dim, cfg.model.text.max_length, cfg.model.image.image_size
    if cfg.queue.enabled:
        for queue in (model.image_queue, model.text_queue):
            rows = torch.nn.functional.normalize(torch.randn(queue.size, d), dim=1)
            queue.enqueue(rows, torch.arange(queue.size) + 10 ** 9)
    # Captions of different lengths, as the collate pads them: with padding the text
    # tower materialises its attention mask (an all-ones mask may be skipped).
    lengths = torch.randint(max(1, length // 2), length + 1, (b,))
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    batch = {
        "image": torch.randn(b, 3, size, size),
        "input_ids": torch.randint(1, vocab_size, (b, length)) * mask,
        "attention_mask": mask,
        "sample_id": torch.arange(b),
    }
    towers = [*model.query.parameters(), *model.query.buffers()]
    if model.key is not None:
        towers += [*model.key.parameters(), *model.key.buffers()]
    ignore = {_key(t) for t in (*towers, *model.buffers(), *batch.values())}
    saved = _SavedBytes(ignore)
    in_towers: set[int] = set()

    def after_towers(module, args, out):
        in_towers.update(saved.seen)

    handle = model.query.register_forward_hook(after_towers)
    trained = [p for p in model.query.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-4)
    try:
        with saved.hooks():
            out = model(**batch)
        saved_towers = saved.total(in_towers)
        saved_loss = saved.total() - saved_towers
        out.loss.backward()
        opt.step()
    finally:
        handle.remove()
    unique = {_key(t): t.untyped_storage().nbytes() for t in towers}
    grads = sum(p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None)
    # AdamW's per-parameter `step` counters live on the CPU even on a GPU run: not counted.
    state = sum(v.untyped_storage().nbytes() for s in opt.state.values() for name, v in s.items()
                if isinstance(v, torch.Tensor) and name != "step")
    return StepMeasurement(sum(unique.values()), grads, state, saved_towers, saved_loss)
