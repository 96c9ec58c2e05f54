"""Contrastive losses over (query, positive key, negatives). Pure functions, no side effects.

All three share one signature so the model can pick one by name:

    loss(q, k, negatives, temperature, q_ids=None, neg_ids=None) -> 0-d tensor

- `q` [B, D]: queries (the only input that receives a gradient);
- `k` [B, D]: each query's positive key;
- `negatives` [N, D]: shared negatives (N may be 0);
- negative j is excluded from row i when `neg_ids[j] == q_ids[i]` (a stale copy of the
  query's own positive, e.g. from the queue or from the gathered batch).

Similarities are computed in float32 whatever the input dtype, so bf16 features with a
temperature of 0.01 (logits up to 100) cannot overflow or lose the positive.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[..., torch.Tensor]


def _similarities(q, k, negatives, q_ids, neg_ids):
    """float32 positive sims [B], negative sims [B, N], and the keep mask [B, N] (or None)."""
    with torch.autocast(q.device.type, enabled=False):  # the trainer runs the loss under autocast
        return _similarities_fp32(q, k, negatives, q_ids, neg_ids)


def _similarities_fp32(q, k, negatives, q_ids, neg_ids):
    q = q.float()
    k = k.detach().float()
    negatives = negatives.detach().float()
    pos = (q * k).sum(dim=1)
    neg = q @ negatives.t()
    keep = None
    if q_ids is not None and neg_ids is not None and negatives.shape[0] > 0:
        keep = q_ids.view(-1, 1) != neg_ids.view(1, -1)
    return pos, neg, keep


def queue_infonce(q, k, negatives, temperature, q_ids=None, neg_ids=None) -> torch.Tensor:
    """InfoNCE with the positive at index 0: mean_i CE([q_i.k_i, q_i.n_j ...] / T, 0)."""
    pos, neg, keep = _similarities(q, k, negatives, q_ids, neg_ids)
    logits = torch.cat([pos.unsqueeze(1), neg], dim=1) / temperature
    if keep is not None:
        # Mask after the division: a -inf divided by a learnable temperature would send
        # 0 * inf = NaN into the temperature's gradient.
        logits = torch.cat([logits[:, :1], logits[:, 1:].masked_fill(~keep, float("-inf"))], dim=1)
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target)


def vse_max(q, k, negatives, temperature=None, q_ids=None, neg_ids=None, margin: float = 0.2) -> torch.Tensor:
    """VSE++ (Faghri et al.): hinge on the hardest negative per query,
    mean_i max_j relu(margin - q_i.k_i + q_i.n_j). `temperature` is accepted and unused."""
    pos, neg, keep = _similarities(q, k, negatives, q_ids, neg_ids)
    if neg.shape[1] == 0:
        return pos.sum() * 0.0
    hinge = (margin - pos.unsqueeze(1) + neg).clamp(min=0)
    if keep is not None:
        hinge = hinge * keep
    return hinge.max(dim=1).values.mean()


def vse_sum(q, k, negatives, temperature=None, q_ids=None, neg_ids=None, margin: float = 0.2) -> torch.Tensor:
    """Hinge summed over negatives: mean_i sum_j relu(margin - q_i.k_i + q_i.n_j).
    `temperature` is accepted and unused."""
    pos, neg, keep = _similarities(q, k, negatives, q_ids, neg_ids)
    hinge = (margin - pos.unsqueeze(1) + neg).clamp(min=0)
    if keep is not None:
        hinge = hinge * keep
    return hinge.sum(dim=1).mean()


LOSSES: dict[str, LossFn] = {"infonce": queue_infonce, "vse_max": vse_max, "vse_sum": vse_sum}
