"""Contrastive and metric-learning objectives over (query, positive key, negatives).
Pure functions, no side effects.

All share one signature so the model can pick one by name (`OBJECTIVES`):

    loss(q, k, negatives, temperature, q_ids=None, neg_ids=None, grad_keys=False, **params) -> 0-d tensor

- `q` [B, D]: queries (unit rows);
- `k` [B, D]: each query's positive key;
- `negatives` [N, D]: shared negatives (N may be 0);
- `q_ids` [B] / `neg_ids` [N]: negative j is excluded from row i when
  `neg_ids[j] == q_ids[i]` (a stale copy of the query's own positive, e.g. from the queue
  or from the gathered batch). Or [B, F] / [N, F]: several keys per row (the sample id,
  fingerprints of the caption and the image, a group); negative j is excluded from row i
  when ANY column agrees, `neg_ids[j, f] == q_ids[i, f]` with `q_ids[i, f] >= 0` (a negative
  value means "none": it never matches);
- `grad_keys`: False (MoCo: keys come from momentum towers, only `q` gets a gradient);
  True (CLIP: keys and negatives are the other tower's outputs and get one too);
- `mask`: `excluded(q_ids, neg_ids)` already computed (optional: both directions of a step
  share it, and the model computes it once);
- `params`: the objective's own hyper-parameters (published defaults as keyword defaults)
  and learnt scalars (e.g. the margin loss's beta), passed by keyword.

Similarities are computed in float32 whatever the input dtype, so bf16 features with a
temperature of 0.01 (logits up to 100) cannot overflow or lose the positive.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from moco_mm.config import ConfigError, ModelConfig

LossFn = Callable[..., torch.Tensor]

# What a masked similarity becomes. Finite on purpose: exp() of it is exactly 0, and a
# finite value cannot turn into 0 * inf = NaN in any gradient (the temperature's
# included), even in a row where every negative is masked.
MASKED = -torch.finfo(torch.float32).max


def excluded(q_ids: torch.Tensor | None, neg_ids: torch.Tensor | None,
             mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """bool [B, N]: True where negative j does not count for query i (see module docstring);
    None when nothing is excluded. `mask`, when given, is that result already computed (the
    model computes it once for both directions) and is returned as it is.

    One [B, N] bool, built column by column (one compare and one in-place or per column): a
    query's "none" (-1) becomes -2, which no negative carries (theirs are -1 or >= 0), so
    no extra pass is needed to keep "none" from matching "none"."""
    if mask is not None:
        return mask
    if q_ids is None or neg_ids is None:
        return None
    if q_ids.dim() == 1:
        return q_ids.view(-1, 1) == neg_ids.view(1, -1)
    q = torch.where(q_ids >= 0, q_ids, -2)
    out = q[:, 0:1] == neg_ids[:, 0].view(1, -1)
    for f in range(1, q_ids.shape[1]):
        out.logical_or_(q[:, f:f + 1] == neg_ids[:, f].view(1, -1))
    return out


def _similarities(q, k, negatives, scale, grad_keys) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (pos [B, 1], neg [B, N]): each query against its positive key and against
    the shared negatives, times `scale` (1/T, or None for raw similarities).

    The query is scaled before the matmul, not the [B, N] result after it: the same
    numbers, but the temperature's backward then costs O(B*D) instead of O(B*N) and keeps
    no [B, N] tensor (measured on the CPU: about a quarter off the loss's forward + backward).
    """
    with torch.autocast(q.device.type, enabled=False):  # the trainer runs the loss under autocast
        q = q.float()
        if scale is not None:
            q = q * scale
        if not grad_keys:
            k, negatives = k.detach(), negatives.detach()
        # On small batches the loss costs op dispatches more than arithmetic (one op each:
        # vecdot here, where in `_scores`), on large ones memory passes over [B, N]: few of
        # either.
        return torch.linalg.vecdot(q, k.float()).unsqueeze(1), q @ negatives.float().t()


def _scores(q, k, negatives, scale, q_ids, neg_ids, grad_keys, mask=None) -> torch.Tensor:
    """float32 scores [B, 1+N] (see `_similarities`): column 0 the positive, then the
    negatives; masked entries hold MASKED."""
    pos, neg = _similarities(q, k, negatives, scale, grad_keys)
    if neg.shape[1] == 0:
        return pos
    mask = excluded(q_ids, neg_ids, mask)
    if mask is not None:
        neg = torch.where(mask, MASKED, neg)
    return torch.cat([pos, neg], dim=1)


def queue_infonce(q, k, negatives, temperature, q_ids=None, neg_ids=None, grad_keys: bool = False, mask=None,
                  teacher=None, alpha: float = 0.0) -> torch.Tensor:
    """InfoNCE with the positive at index 0: mean_i CE([q_i.k_i, q_i.n_j ...] / T, 0).

    Momentum distillation (ALBEF), when `teacher` [B, D] (the momentum tower's features of
    the same samples as `q`) and `alpha` > 0: the target is
    `alpha * softmax(teacher scores) + (1 - alpha) * one-hot(positive)`, the teacher scored
    against the same columns (positive key, then the negatives), with the same exclusions
    and the same (detached) temperature. Keeps one extra [B, 1+N] float32 (the soft
    target); the teacher's own scores are freed once it is built.
    """
    scale = 1.0 / temperature
    scores = _scores(q, k, negatives, scale, q_ids, neg_ids, grad_keys, mask)
    if teacher is None or alpha <= 0:
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(scores, target)
    with torch.no_grad():
        soft = _scores(teacher.detach(), k, negatives, scale.detach() if torch.is_tensor(scale) else scale,
                       q_ids, neg_ids, False, mask).softmax(dim=1)
        soft.mul_(alpha)[:, 0] += 1.0 - alpha
    # Excluded columns hold exactly 0 in the target and a finite log-probability: no 0 * inf.
    return F.cross_entropy(scores, soft)


def _hinges(q, k, negatives, q_ids, neg_ids, margin, grad_keys, mask=None):
    """positive similarities [B, 1] and hinges relu(margin - pos + neg) [B, N]."""
    scores = _scores(q, k, negatives, None, q_ids, neg_ids, grad_keys, mask)
    pos = scores[:, :1]
    # A masked entry's hinge is relu(margin - pos + MASKED) = 0: it drops out of max and sum.
    return pos, (margin - pos + scores[:, 1:]).clamp(min=0)


def vse_max(q, k, negatives, temperature=None, q_ids=None, neg_ids=None, margin: float = 0.2,
            grad_keys: bool = False, mask=None) -> torch.Tensor:
    """VSE++ (Faghri et al.): hinge on the hardest negative per query,
    mean_i max_j relu(margin - q_i.k_i + q_i.n_j). `temperature` is accepted and unused."""
    pos, hinge = _hinges(q, k, negatives, q_ids, neg_ids, margin, grad_keys, mask)
    if hinge.shape[1] == 0:
        return pos.sum() * 0.0
    return hinge.max(dim=1).values.mean()


def vse_sum(q, k, negatives, temperature=None, q_ids=None, neg_ids=None, margin: float = 0.2,
            grad_keys: bool = False, mask=None) -> torch.Tensor:
    """Hinge summed over negatives: mean_i sum_j relu(margin - q_i.k_i + q_i.n_j).
    `temperature` is accepted and unused."""
    _, hinge = _hinges(q, k, negatives, q_ids, neg_ids, margin, grad_keys, mask)
    return hinge.sum(dim=1).mean()


# ---------------------------------------------------------------------------------------
# Metric-learning objectives on the unit sphere. None uses the temperature.
# ---------------------------------------------------------------------------------------

# sqrt's derivative is infinite at 0 (a perfect positive, or a negative identical to the
# query): 2 - 2s is clamped at this before the root. It is below float32's resolution of
# 2 - 2s near s = 1 (~6e-8), so it only moves values that are already 0 or rounding noise,
# and it caps d's gradient factor 1 / (2d) at 5e3.
_SQ_EPS = 1e-8

# The margin loss's learnable boundary beta starts here (Wu et al. 2017).
MARGIN_BETA_INIT = 1.2


def _pairs(q, k, negatives, q_ids, neg_ids, grad_keys, mask=None):
    """Raw float32 cosine similarities (`_similarities`): `pos` [B] (query i to its own
    key), `neg` [B, N] (to the shared negatives), and `skip` bool [B, N] (True: negative j
    does not count for query i) or None.

    Not `_scores`: excluded entries keep their true similarity instead of MASKED (distances
    need a valid value everywhere; each objective masks its own terms with `skip`), and
    `pos` and `neg` stay two tensors: no [B, 1+N] copy in the forward, and no slicing of
    its gradient in the backward.
    """
    pos, neg = _similarities(q, k, negatives, None, grad_keys)
    return pos.squeeze(1), neg, excluded(q_ids, neg_ids, mask)


def _distance(s: torch.Tensor) -> torch.Tensor:
    """Euclidean distance between unit rows of cosine similarity `s` (any shape):
    sqrt(max(2 - 2s, _SQ_EPS)). One new float tensor, which backward keeps, and a bool:
    `where` saves its condition (an in-place clamp would save a float copy) and the
    in-place root saves its own output."""
    sq = s.mul(-2.0).add_(2.0)
    sq = torch.where(sq > _SQ_EPS, sq, _SQ_EPS)
    return sq.sqrt_()


def contrastive(q, k, negatives, temperature=None, q_ids=None, neg_ids=None, grad_keys: bool = False, mask=None,
                margin: float = 1.0) -> torch.Tensor:
    """Hadsell, Chopra & LeCun 2006 (DrLIM) on Euclidean distances d of unit rows:
    mean_i [ 0.5 d(q_i, k_i)^2 + 0.5 mean_{j counted} relu(margin - d(q_i, n_j))^2 ].

    `margin` 1.0: the paper's embeddings are unnormalised, so its margin is a scale of its
    own and no published value transfers. On the unit sphere distances lie in [0, 2] (2 for
    opposite rows, sqrt(2) for orthogonal ones) and 1.0, the middle of that range, pushes
    away the negatives within 60 degrees of the query (similarity > 0.5) and leaves the
    rest alone. A row with no counted negative (N = 0 included) has the positive term only.
    Keeps two [B, N] float32 for backward (the distances, the hinges).
    """
    pos, neg, skip = _pairs(q, k, negatives, q_ids, neg_ids, grad_keys, mask)
    pos_term = 0.5 * pos.mul(-2.0).add_(2.0).clamp(min=0.0)  # d^2 itself: no root, no guard
    n = neg.shape[1]
    if n == 0:
        return pos_term.mean()
    d = _distance(neg)
    del pos, neg  # the similarities are not saved for backward: free them before the hinges
    with torch.no_grad():
        active = d < margin
        if skip is None:
            n_counted = torch.full_like(pos_term, n)
        else:
            counted = skip.logical_not_()
            active.logical_and_(counted)
            n_counted = counted.sum(dim=1)
    hinge = (margin - d).masked_fill_(active.logical_not_(), 0.0)
    # The row's sum of squares as a squared norm: no [B, N] square in the forward, one [B, N]
    # in the backward (square's makes three). No counted negative: hinges all 0, term 0.
    neg_term = 0.5 * torch.linalg.vector_norm(hinge, dim=1).square() / n_counted.clamp(min=1)
    return (pos_term + neg_term).mean()


def triplet_semihard(q, k, negatives, temperature=None, q_ids=None, neg_ids=None, grad_keys: bool = False, mask=None,
                     alpha: float = 0.2) -> torch.Tensor:
    """FaceNet (Schroff et al. 2015) with semi-hard negatives, on squared distances
    D = 2 - 2s of unit rows: mean_i relu(D(q_i, k_i) - D(q_i, n*_i) + alpha).

    n*_i is the counted negative with the smallest D that is still > D(q_i, k_i) (the
    semi-hard one); if there is none, the counted negative with the LARGEST D (as
    TensorFlow's `triplet_semihard_loss`). Rows with no counted negative contribute 0 (and
    still count in the mean). VSE++'s hardest negative is `vse_max`.

    The mining runs without a graph on the [B, N] similarities (D is decreasing in s: the
    semi-hard negative is the most similar one below the positive's similarity) and with
    no host sync; the loss then recomputes only the B chosen similarities with gradient,
    so backward keeps nothing of size [B, N].
    """
    with torch.no_grad():
        pos, neg = _similarities(q.detach(), k, negatives, None, False)
        if neg.shape[1] > 0:
            skip = excluded(q_ids, neg_ids, mask)
            below = torch.where(neg < pos, neg, -torch.inf)
            if skip is not None:
                below.masked_fill_(skip, -torch.inf)
            semi, semi_j = below.max(dim=1)
            del below
            if skip is not None:
                neg.masked_fill_(skip, torch.inf)  # the similarities are not needed after this
            easiest, easy_j = neg.min(dim=1)
            chosen = torch.where(torch.isfinite(semi), semi_j, easy_j)
            has = torch.isfinite(easiest)  # at least one counted negative
        del pos, neg
    with torch.autocast(q.device.type, enabled=False):  # as `_scores`: similarities in float32
        qf = q.float()
        if not grad_keys:
            k, negatives = k.detach(), negatives.detach()
        d_ap = torch.linalg.vecdot(qf, k.float()).mul(-2.0).add_(2.0)
        if negatives.shape[0] == 0:
            return d_ap.sum() * 0.0
        # The chosen rows [B, D] by `gather`: in the CLIP mode its backward scatter-adds
        # into an [N, D] gradient with atomics, no host sync (an embedding lookup's backward
        # keeps one [N, D] less but may read segment counts back to the host on CUDA).
        rows = negatives.float().gather(0, chosen.view(-1, 1).expand(-1, qf.shape[1]))
        d_an = torch.linalg.vecdot(qf, rows).mul(-2.0).add_(2.0)
        return torch.where(has, (d_ap - d_an + alpha).clamp(min=0.0), 0.0).mean()


@torch.no_grad()
def distance_weights(d: torch.Tensor, dim: int, cutoff: float = 0.5, nonzero_loss_cutoff: float = 1.4,
                     skip: torch.Tensor | None = None) -> torch.Tensor:
    """Distance-weighted sampling probabilities (Wu et al. 2017), float32 [B, N] from
    distances `d` [B, N] between unit rows in R^dim: w_ij proportional to 1 / q(d_ij),
    q(d) = d^(dim-2) (1 - d^2/4)^((dim-3)/2) the density of distances between uniform
    points on the sphere, with d clipped below at `cutoff`; w = 0 where d >=
    `nonzero_loss_cutoff` or `skip`. Each row sums to 1, or is all 0 when no negative is
    eligible. Computed in log space (at dim 128, d^(dim-2) alone spans 56 orders of
    magnitude over [0.5, 1.4], past float32's range) with at most two [B, N] float32
    alive, the result included.
    """
    x = d.clamp(min=cutoff, max=nonzero_loss_cutoff)  # the top clip only avoids log(0) at d = 2: weight 0 there
    w = x.square().mul_(-0.25).log1p_().mul_(-(dim - 3) / 2.0)  # -log of (1 - d^2/4)^((dim-3)/2)
    w.add_(x.log_().mul_(-(dim - 2.0)))  # -log of d^(dim-2)
    del x
    drop = d >= nonzero_loss_cutoff
    if skip is not None:
        drop.logical_or_(skip)
    w.masked_fill_(drop, -torch.inf)
    # Row max for stability; a row with nothing eligible has max -inf: MASKED keeps exp at 0.
    w.sub_(w.amax(dim=1, keepdim=True).clamp_(min=MASKED)).exp_()
    return w.div_(w.sum(dim=1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny))


def margin_loss(q, k, negatives, temperature=None, q_ids=None, neg_ids=None, grad_keys: bool = False, mask=None,
                beta=MARGIN_BETA_INIT, alpha: float = 0.2, cutoff: float = 0.5,
                nonzero_loss_cutoff: float = 1.4) -> torch.Tensor:
    """Margin loss with distance-weighted sampling (Wu, Manmatha, Smola & Krähenbühl 2017,
    "Sampling Matters in Deep Embedding Learning"), on Euclidean distances d of unit rows:

        mean_i [ relu(alpha + d(q_i, k_i) - beta) + sum_j w_ij relu(alpha - (d(q_i, n_j) - beta)) ]

    `beta` is the learnable boundary (0-d tensor, a trained parameter of the model; init
    1.2, the paper's). The paper draws one negative per pair from `distance_weights`; here
    the draw's expectation is taken instead (deterministic, and every rank sees the same
    loss): w = `distance_weights(d, D, cutoff, nonzero_loss_cutoff, excluded)`, detached
    (sampling probabilities are not trained). A row whose weights are all 0 (every negative
    at d >= nonzero_loss_cutoff, or excluded, or N = 0) has the positive term only; the
    paper draws uniformly then, among negatives whose hinge relu(alpha + beta - d) is 0
    while beta <= 1.2.
    Defaults: alpha 0.2, cutoff 0.5, nonzero_loss_cutoff 1.4 (the paper's).

    At most two [B, N] float32 alive beyond the similarities (which are freed once the
    distances exist); backward keeps the distances and the weights.
    """
    pos, neg, skip = _pairs(q, k, negatives, q_ids, neg_ids, grad_keys, mask)
    pos_term = (alpha + _distance(pos) - beta).clamp(min=0.0)
    if neg.shape[1] == 0:
        return pos_term.mean()
    d = _distance(neg)
    del pos, neg
    with torch.no_grad():
        w = distance_weights(d, q.shape[1], cutoff, nonzero_loss_cutoff, skip)
        # Zero weight where the hinge is 0 (after normalising: those negatives are still drawn).
        w.masked_fill_(d >= alpha + beta, 0.0)
    # sum_j w_ij (alpha + beta - d_ij) over active hinges, split so that only one [B, N]
    # product is made: beta's gradient is sum_j w_ij, d's is -w.
    neg_term = (alpha + beta) * w.sum(dim=1) - (w * d).sum(dim=1)
    return (pos_term + neg_term).mean()


def multi_similarity(q, k, negatives, temperature=None, q_ids=None, neg_ids=None, grad_keys: bool = False, mask=None,
                     alpha: float = 2.0, beta: float = 50.0, lam: float = 1.0, epsilon: float = 0.1) -> torch.Tensor:
    """Multi-similarity loss (Wang et al. 2019) with its pair mining, on similarities s:

        mean_i [ (1/alpha) log(1 + [kept_i] exp(-alpha (s_ip - lam)))
                 + (1/beta) log(1 + sum_{j kept} exp(beta (s_ij - lam))) ]

    A counted negative is kept when s_ij + epsilon > s_ip; the positive when s_ip - epsilon
    < max_j counted s_ij, which with one positive per row is the same as "some negative is
    kept" (so a row keeps both sides or neither, as the paper's code, which skips a row
    with either side empty). Computed as softplus(-alpha (s_ip - lam)) / alpha and
    softplus(logsumexp) / beta, stable at beta 50. Defaults: alpha 2, beta 50, lam 1,
    epsilon 0.1 (the paper's). Backward keeps one [B, N] float32.
    """
    pos, neg, skip = _pairs(q, k, negatives, q_ids, neg_ids, grad_keys, mask)
    if neg.shape[1] == 0:
        return pos.sum() * 0.0
    with torch.no_grad():
        keep = neg > (pos - epsilon).unsqueeze(1)
        if skip is not None:
            keep.logical_and_(skip.logical_not_())
        keep_pos = keep.any(dim=1)
        drop = keep.logical_not_()
    pos_term = torch.where(keep_pos, F.softplus(-alpha * (pos - lam)), 0.0) / alpha
    # Dropped entries hold MASKED (finite): a row with nothing kept has softplus(~MASKED) = 0
    # and a zero, not NaN, gradient.
    logits = (neg - lam).mul_(beta).masked_fill_(drop, MASKED)
    neg_term = F.softplus(torch.logsumexp(logits, dim=1)) / beta
    return (pos_term + neg_term).mean()


def circle(q, k, negatives, temperature=None, q_ids=None, neg_ids=None, grad_keys: bool = False, mask=None,
           m: float = 0.25, gamma: float = 256.0) -> torch.Tensor:
    """Circle loss (Sun et al. 2020) with one positive per row:

        mean_i softplus( logsumexp_{j counted} gamma a_ij (s_ij - m) - gamma a_ip (s_ip - (1 - m)) )

    a_ip = relu(1 + m - s_ip), a_ij = relu(s_ij + m), both detached (the paper's optima
    O_p = 1 + m, O_n = -m and margins Delta_p = 1 - m, Delta_n = m). A row with no counted
    negative (N = 0 included) is softplus of its positive term alone. Defaults m 0.25,
    gamma 256: the paper's face-recognition setting (its other tasks are tuned apart; set
    them through `model.loss_params`). Backward keeps two [B, N] float32 (the weights a_ij,
    the logits).
    """
    pos, neg, skip = _pairs(q, k, negatives, q_ids, neg_ids, grad_keys, mask)
    with torch.no_grad():
        a_p = (1.0 + m - pos).clamp_(min=0.0)
    pos_logit = -gamma * a_p * (pos - (1.0 - m))
    if neg.shape[1] == 0:
        return F.softplus(pos_logit).mean()
    with torch.no_grad():
        a_n = (neg + m).clamp_(min=0.0).mul_(gamma)
    logits = (neg - m).mul_(a_n)
    if skip is None:
        return F.softplus(torch.logsumexp(logits, dim=1) + pos_logit).mean()
    # Excluded entries hold MASKED (finite: a zero, not NaN, gradient); a row with none
    # counted gets 0 in place of its logsumexp: softplus of the positive term alone.
    lse = torch.logsumexp(logits.masked_fill_(skip, MASKED), dim=1)
    return F.softplus(torch.where(skip.all(dim=1), 0.0, lse) + pos_logit).mean()


@dataclass(frozen=True)
class Objective:
    """What the model needs to know of an objective besides the function.

    `uses_temperature`: the temperature enters the loss; only then is a learnable
    temperature a trained parameter (under DDP a parameter without a gradient stops the
    run). `learnt`: extra trained scalars and their initial values, kept by the model
    beside the temperature and passed by keyword. `distills`: accepts `teacher`/`alpha`.
    """

    fn: LossFn
    uses_temperature: bool
    learnt: tuple[tuple[str, float], ...] = ()
    distills: bool = False

    def hyper_parameters(self) -> dict[str, object]:
        """Keyword parameters a config may set (`model.loss_params`), with their defaults."""
        # A distilling objective's `teacher`/`alpha` are the trainer's (the ramped distillation
        # weight); elsewhere `alpha` is the objective's own margin or scale.
        fixed = ({"temperature", "q_ids", "neg_ids", "grad_keys", "mask"} | {n for n, _ in self.learnt}
                 | ({"teacher", "alpha"} if self.distills else set()))
        sig = inspect.signature(self.fn)
        return {n: p.default for n, p in sig.parameters.items()
                if p.default is not inspect.Parameter.empty and n not in fixed}


OBJECTIVES: dict[str, Objective] = {
    "infonce": Objective(queue_infonce, uses_temperature=True, distills=True),
    "vse_max": Objective(vse_max, uses_temperature=False),
    "vse_sum": Objective(vse_sum, uses_temperature=False),
    "contrastive": Objective(contrastive, uses_temperature=False),
    "triplet": Objective(triplet_semihard, uses_temperature=False),
    "margin": Objective(margin_loss, uses_temperature=False, learnt=(("beta", MARGIN_BETA_INIT),)),
    "multi_similarity": Objective(multi_similarity, uses_temperature=False),
    "circle": Objective(circle, uses_temperature=False),
}
LOSSES: dict[str, LossFn] = {name: o.fn for name, o in OBJECTIVES.items()}

# `model.margin` predates `model.loss_params` and stays the VSE losses' margin only: the
# contrastive loss's `margin` is on distances, with a default (1.0) of its own.
MARGIN_KEY_OBJECTIVES = frozenset({"vse_max", "vse_sum"})
_MARGIN_KEY_DEFAULT = ModelConfig.__dataclass_fields__["margin"].default


def objective_params(cfg: ModelConfig) -> dict[str, object]:
    """The keyword hyper-parameters `cfg.loss` runs with: its published defaults, then
    `model.margin` for the VSE losses (its historic key), then
    `model.loss_params`. Checked before any compute: an unknown name or a wrong type raises
    ConfigError naming `model.loss_params.NAME` and the allowed names."""
    validate_objective(cfg)
    allowed = OBJECTIVES[cfg.loss].hyper_parameters()
    out = dict(allowed)
    if cfg.loss in MARGIN_KEY_OBJECTIVES:
        out["margin"] = cfg.margin
    out.update(cfg.loss_params)
    return out


def validate_objective(cfg: ModelConfig) -> None:
    """Config checks that need the objective registry (run by `moco-mm train` right after
    the config loads, and by the model's constructor)."""
    objective = OBJECTIVES[cfg.loss]
    allowed = objective.hyper_parameters()
    if "margin" in allowed and cfg.loss not in MARGIN_KEY_OBJECTIVES and cfg.margin != _MARGIN_KEY_DEFAULT:
        # Silently ignoring it would train with another margin than the user believes.
        raise ConfigError(f"model.margin: the VSE losses' margin (vse_max, vse_sum); model.loss {cfg.loss!r} "
                          f"reads its own: set model.loss_params.margin")
    for name, value in cfg.loss_params.items():
        if name not in allowed:
            raise ConfigError(f"model.loss_params.{name}: {cfg.loss} has no such parameter; allowed: "
                              f"{', '.join(f'{k} (default {v})' for k, v in allowed.items()) or 'none'}")
        default = allowed[name]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (type(value) is type(default) or (isinstance(default, float) and number)):
            raise ConfigError(f"model.loss_params.{name}: expected {type(default).__name__}, got {value!r}")
    if cfg.distill_alpha > 0:
        if not objective.distills:
            raise ConfigError(f"model.distill_alpha: momentum distillation softens InfoNCE targets; "
                              f"model.loss {cfg.loss!r} has none (use infonce or distill_alpha: 0)")
        if not cfg.momentum_encoder:
            raise ConfigError("model.distill_alpha: distillation needs the momentum (key) towers as teacher; "
                              "model.momentum_encoder is false")


def learns_temperature(loss: str, learn_temperature: bool) -> bool:
    """Is the temperature a trained parameter for this objective and setting?"""
    return learn_temperature and OBJECTIVES[loss].uses_temperature
