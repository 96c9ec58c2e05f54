"""Contrastive losses over (query, positive key, negatives). Pure functions, no side effects.

All three share one signature so the model can pick one by name:

    loss(q, k, negatives, temperature, q_ids=None, neg_ids=None, grad_keys=False) -> 0-d tensor

- `q` [B, D]: queries;
- `k` [B, D]: each query's positive key;
- `negatives` [N, D]: shared negatives (N may be 0);
- negative j is excluded from row i when `neg_ids[j] == q_ids[i]` (a stale copy of the
  query's own positive, e.g. from the queue or from the gathered batch);
- `grad_keys`: False (MoCo: keys come from momentum towers, only `q` gets a gradient);
  True (CLIP: keys and negatives are the other tower's outputs and get one too).

Similarities are computed in float32 whatever the input dtype, so bf16 features with a
temperature of 0.01 (logits up to 100) cannot overflow or lose the positive.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[..., torch.Tensor]

# What a masked similarity becomes. Finite on purpose: exp() of it is exactly 0, and a
# finite value cannot turn into 0 * inf = NaN in any gradient (the temperature's
# included), even in a row where every negative is masked.
MASKED = -torch.finfo(torch.float32).max


def _scores(q, k, negatives, scale, q_ids, neg_ids, grad_keys) -> torch.Tensor:
    """float32 scores [B, 1+N]: column 0 the positive, then the negatives; masked entries
    hold MASKED.

    Scores are similarities times `scale` (1/T, or None for raw similarities). The query
    is scaled before the matmul, not the [B, N] result after it: the same numbers, but the
    temperature's backward then costs O(B*D) instead of O(B*N) and keeps no [B, N] tensor
    (measured on the CPU: about a quarter off the loss's forward + backward).
    """
    with torch.autocast(q.device.type, enabled=False):  # the trainer runs the loss under autocast
        q = q.float()
        if scale is not None:
            q = q * scale
        if not grad_keys:
            k, negatives = k.detach(), negatives.detach()
        # On small batches the loss costs op dispatches more than arithmetic (one op each:
        # vecdot, where), on large ones memory passes over [B, N]: few of either here.
        pos = torch.linalg.vecdot(q, k.float()).unsqueeze(1)
        if negatives.shape[0] == 0:
            return pos
        neg = q @ negatives.float().t()
        if q_ids is not None and neg_ids is not None:
            neg = torch.where(q_ids.view(-1, 1) == neg_ids.view(1, -1), MASKED, neg)
        return torch.cat([pos, neg], dim=1)


def queue_infonce(q, k, negatives, temperature, q_ids=None, neg_ids=None, grad_keys: bool = False) -> torch.Tensor:
    """InfoNCE with the positive at index 0: mean_i CE([q_i.k_i, q_i.n_j ...] / T, 0)."""
    scores = _scores(q, k, negatives, 1.0 / temperature, q_ids, neg_ids, grad_keys)
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(scores, target)


def _hinges(q, k, negatives, q_ids, neg_ids, margin, grad_keys):
    """positive similarities [B, 1] and hinges relu(margin - pos + neg) [B, N]."""
    scores = _scores(q, k, negatives, None, q_ids, neg_ids, grad_keys)
    pos = scores[:, :1]
    # A masked entry's hinge is relu(margin - pos + MASKED) = 0: it drops out of max and sum.
    return pos, (margin - pos + scores[:, 1:]).clamp(min=0)


def vse_max(q, k, negatives, temperature=None, q_ids=None, neg_ids=None, margin: float = 0.2,
            grad_keys: bool = False) -> torch.Tensor:
    """VSE++ (Faghri et al.): hinge on the hardest negative per query,
    mean_i max_j relu(margin - q_i.k_i + q_i.n_j). `temperature` is accepted and unused."""
    pos, hinge = _hinges(q, k, negatives, q_ids, neg_ids, margin, grad_keys)
    if hinge.shape[1] == 0:
        return pos.sum() * 0.0
    return hinge.max(dim=1).values.mean()


def vse_sum(q, k, negatives, temperature=None, q_ids=None, neg_ids=None, margin: float = 0.2,
            grad_keys: bool = False) -> torch.Tensor:
    """Hinge summed over negatives: mean_i sum_j relu(margin - q_i.k_i + q_i.n_j).
    `temperature` is accepted and unused."""
    _, hinge = _hinges(q, k, negatives, q_ids, neg_ids, margin, grad_keys)
    return hinge.sum(dim=1).mean()


LOSSES: dict[str, LossFn] = {"infonce": queue_infonce, "vse_max": vse_max, "vse_sum": vse_sum}
# Objectives whose value depends on the temperature. Only for these is a learnable
# temperature a trained parameter: under DDP a parameter that never gets a gradient
# stops the run ("Expected to have finished reduction in the prior iteration").
TEMPERATURE_LOSSES = frozenset({"infonce"})


def learns_temperature(loss: str, learn_temperature: bool) -> bool:
    """Is the temperature a trained parameter for this objective and setting?"""
    return learn_temperature and loss in TEMPERATURE_LOSSES
