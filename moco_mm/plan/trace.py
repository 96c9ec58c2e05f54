"""Measuring what a traced step holds: saved tensors, live storages, repeated blocks.

A tower is built on the meta device, moved into `FakeTensorMode` (shapes and dtypes, no
memory, no arithmetic) and run forward and backward under the config's precision and
gradient checkpointing. `saved_tensors_hooks` record every tensor autograd saves,
deduplicated by storage (checkpointed blocks save only their inputs); a dispatch mode
records every storage an op creates, which gives the backward's transient peak and the
no-grad forward's peak. Traces at two batch sizes give `fixed + per_sample * B`. A run of
identical blocks is traced two blocks deep and extrapolated: what the second block adds,
every further block adds.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

GIB = 1 << 30
_F32 = 4
_I64 = 8
_QUEUE_BYTES = {"float32": 4, "bfloat16": 2}


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
_TO_COPY = _aten._to_copy.default  # what autocast's casts (and .to(dtype)) dispatch to


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
    `weight_copies` collects the storages that are dtype copies of a storage in `params`
    (autocast's bf16 weight copies: under FSDP the weights are gathered in bf16 and
    autocast makes none, so the planner takes them back out).
    """

    def __init__(self, ignore: set[int], derived: set[int] | None = None, params: set[int] = frozenset()):
        super().__init__()
        self.ignore = ignore
        self.derived = derived
        self.params = params
        self.weight_copies: set[int] = set()
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
        if func is _TO_COPY and _key(args[0]) in self.params:
            self.weight_copies.add(_key(out))
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
    autocast_saved: int  # of `saved`: autocast's low-precision copies of the weights
    autocast_live: int  # of `forward_live`: the same copies (saved or only cached)


@dataclass(frozen=True)
class TowerProfile:
    """What one query tower (and its key copy) costs beyond its weights, per batch B.

    Invariant: every activation field is a `Linear` in the per-GPU batch; `saved.at(B)` is
    what the step keeps for this tower's backward. `autocast_saved <= saved` and
    `autocast_live <= forward_live` are the parts of those that are autocast's copies of
    the weights (batch-independent; 0 without autocast). `root_params +
    largest_block_params * n_blocks >= n_params` (equal when the blocks are identical):
    the FSDP units (`moco_mm.model.tower_blocks`).
    """

    saved: Linear
    forward_live: Linear
    backward_extra: Linear
    no_grad_peak: Linear
    autocast_saved: Linear
    autocast_live: Linear
    input_bytes_per_sample: int
    has_batchnorm: bool
    method: str  # "full trace" | "depth-extrapolated (...)"
    weight_bytes: int  # parameters + buffers of one copy (fp32 masters)
    n_params: int
    trainable_bytes: int  # fp32 bytes of the parameters that require grad
    n_trainable: int
    buffer_bytes: int  # of weight_bytes: buffers (FSDP leaves them whole on every rank)
    n_blocks: int  # FSDP units below the tower (0: none found)
    largest_block_params: int  # parameters of the largest of them
    root_params: int  # parameters in no block: the tower's own FSDP unit (embeddings, norm, head)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "TowerProfile":
        d = dict(d)
        for name in _LINEAR_FIELDS:
            d[name] = Linear(**d[name])
        return TowerProfile(**d)


_LINEAR_FIELDS = tuple(f.name for f in dataclasses.fields(_Trace))


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
    forward_live, autocast_saved, autocast_live) bytes that belong to the window from
    the end of `first` to the end of `second`: what is saved in it (`second`'s
    activations and the input it keeps, even when a checkpoint wrapper saves that input
    before `second` starts) and what is created in it and kept alive unsaved (autocast's
    weight copies), and of each, autocast's weight copies. That is exactly what one more
    identical block adds to a run.
    """
    params = {_key(p) for p in tower.parameters()}
    ignore = params | {_key(t) for t in (*tower.buffers(), *inputs)}
    trained = [p for p in tower.parameters() if p.requires_grad]
    live = _LiveBytes(ignore, params=params)
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
                copies = live.weight_copies
                autocast_live = live.live(keys=copies)
                unsaved_kept = [(live.live(owner=i) - live.live(owner=i, keys=saved_keys),
                                 live.live(owner=i, keys=copies) - live.live(owner=i, keys=copies & saved_keys))
                                for i in range(len(windows))]
            saved = saved_hook.total()
            autocast_saved = saved_hook.total(keys=copies)
            per_window = []
            for i, (kept, kept_copies) in enumerate(unsaved_kept):
                s, s_copies = saved_hook.total(owner=i), saved_hook.total(owner=i, keys=copies)
                per_window.append((s, s + kept, s_copies, s_copies + kept_copies))
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
    return _Trace(saved, forward_live, backward_extra, no_grad_peak, autocast_saved, autocast_live), per_window


# Traced at two batch sizes; (2, 4) rather than (1, 2) so the slope is not skewed by
# batch-independent transients (a bf16 weight gradient) that a batch of one can expose.
_TRACE_BATCHES = (2, 4)


def _profile_fake_tower(tower: nn.Module, make_inputs: Callable[[int], tuple],
                        autocast_dtype: torch.dtype | None, depth_extrapolation: bool) -> tuple[dict, str]:
    """Trace a fake tower at `_TRACE_BATCHES`; -> {field: Linear}, method.

    With `depth_extrapolation`, every run of L >= 3 identical blocks is cut to 2 blocks
    and what the second block adds is measured (see `_trace_once` windows): each of the
    L - 2 blocks left out would add exactly that, so the sums (saved, forward_live and
    their autocast weight copies) of the full tower are the shallow tower's plus (L - 2)
    times it. The transients (backward_extra, no_grad_peak) are set by one block at a
    time and are the shallow tower's.
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
        # per_block[i] holds the window's share of the extrapolated fields, in this order.
        summed = ("saved", "forward_live", "autocast_saved", "autocast_live")
        traces[b] = dataclasses.replace(shallow, **{
            name: getattr(shallow, name) + sum(n * window[j] for n, window in zip(extra, per_block))
            for j, name in enumerate(summed)})
    b1, b2 = _TRACE_BATCHES
    fits = {name: Linear.fit(b1, getattr(traces[b1], name), b2, getattr(traces[b2], name))
            for name in _LINEAR_FIELDS}
    if not runs:
        method = "full trace"
    else:
        lengths = "+".join(str(r.length) for r in runs)
        method = f"depth-extrapolated ({len(runs)} run(s) of identical blocks, {lengths} blocks, traced at 2 each)"
    return fits, method
