"""The loss's memory (one direction), traced at the exact sizes, and a bilinear fit in
(batch, negatives) for the planner's searches."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache

import torch

from moco_mm.plan.trace import (
    _autocast,
    _fake_mode,
    _key,
    _LiveBytes,
    _SavedBytes,
)


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
                   batch_key_rows: int, queue_dtype: str, bf16: bool, grad_keys: bool = False,
                   params: tuple = (), distill: bool = False) -> LossFootprint:
    """Trace the objective `loss` for one direction as `DualQueueMoCo.forward` calls it:
    with its hyper-parameters `params` ((name, value) pairs), its trained scalars, the
    [rows, 1 + fingerprints] exclusion keys, and (`distill`) a teacher for momentum
    distillation.

    The bank is built by the model's own `negative_bank`: `cat([gathered batch keys
    (float32); queue rows .float()])`. `grad_keys`: the CLIP mode, where the keys and
    the gathered rows (the whole bank: there is no queue) carry gradients. Queries,
    positive keys, gathered keys and queue storage are costed elsewhere and excluded
    here. ~0.1 s (fake tensors, any size).
    """
    from moco_mm.model.dual_queue import N_FINGERPRINTS, negative_bank
    from moco_mm.model.losses import OBJECTIVES

    objective = OBJECTIVES[loss]
    d, f = embed_dim, 1 + N_FINGERPRINTS
    with _fake_mode():
        q = torch.empty(batch, d, requires_grad=True)
        k = torch.empty(batch, d, requires_grad=grad_keys)
        teacher = torch.empty(batch, d) if distill else None
        q_ids = torch.zeros(batch, f, dtype=torch.long)
        gathered = torch.empty(batch_key_rows, d, requires_grad=grad_keys)
        gathered_ids = torch.zeros(batch_key_rows, f, dtype=torch.long)
        queue = torch.empty(queue_rows, d, dtype=torch.bfloat16 if queue_dtype == "bfloat16" else torch.float32)
        queue_ids = torch.zeros(queue_rows, f, dtype=torch.long)
        log_t = torch.zeros((), requires_grad=learn_temperature)
        scalars = {name: torch.tensor(float(init), requires_grad=True) for name, init in objective.learnt}
        seeds = {_key(gathered), _key(queue)}
        ignore = {_key(t) for t in (q, k, q_ids, gathered, gathered_ids, queue, queue_ids, log_t,
                                    *scalars.values(), *([teacher] if distill else []))}
        saved_hook = _SavedBytes(ignore)
        live = _LiveBytes(ignore, derived=set(seeds))
        extra = dict(teacher=teacher, alpha=0.4) if distill else {}
        with saved_hook.hooks(), live:
            live.watch()
            with _autocast(torch.bfloat16 if bf16 else None):
                temperature = log_t.exp()
                bank, ids = negative_bank(gathered, gathered_ids, queue, queue_ids, in_batch=batch_key_rows > 0)
                out = objective.fn(q, k, bank, temperature, q_ids, ids, grad_keys=grad_keys, **dict(params),
                                   **scalars, **extra)
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
               queue_dtype: str, bf16: bool, grad_keys: bool = False, params: tuple = (),
               distill: bool = False) -> dict[str, Bilinear]:
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
            pts[b, n] = loss_footprint(loss, learn_temperature, embed_dim, b, n - g, g, queue_dtype, bf16, grad_keys,
                                       params, distill)
    out = {}
    for f in dataclasses.fields(LossFootprint):
        v = {bn: getattr(fp, f.name) for bn, fp in pts.items()}
        a = (v[b2, n2] - v[b2, n1] - v[b1, n2] + v[b1, n1]) / ((b2 - b1) * (n2 - n1))
        db = (v[b2, n1] - v[b1, n1]) / (b2 - b1) - a * n1  # coefficient of B
        dn = (v[b1, n2] - v[b1, n1]) / (n2 - n1) - a * b1  # coefficient of N
        e = v[b1, n1] - a * b1 * n1 - db * b1 - dn * n1
        out[f.name] = Bilinear(a, db, dn, e)
    return out
