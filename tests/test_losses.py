"""Losses against float64 references written here, element by element."""

import math
import typing

import pytest
import torch
import torch.nn.functional as F

from moco_mm.config import ConfigError, ModelConfig
from moco_mm.model.losses import (
    OBJECTIVES,
    distance_weights,
    objective_params,
    queue_infonce,
    triplet_semihard,
    vse_max,
    vse_sum,
)
from tests.tiny import tiny_model_config


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def _ref_infonce(q, k, negs, t, q_ids, n_ids):
    total = 0.0
    for i in range(q.shape[0]):
        logits = [float(q[i] @ k[i]) / t]
        for j in range(negs.shape[0]):
            if q_ids is not None and int(n_ids[j]) == int(q_ids[i]):
                continue
            logits.append(float(q[i] @ negs[j]) / t)
        m = max(logits)
        lse = m + math.log(sum(math.exp(x - m) for x in logits))
        total += lse - logits[0]
    return total / q.shape[0]


def _ref_vse(q, k, negs, margin, q_ids, n_ids, reduce):
    total = 0.0
    for i in range(q.shape[0]):
        pos = float(q[i] @ k[i])
        hinges = [max(0.0, margin - pos + float(q[i] @ negs[j])) for j in range(negs.shape[0])
                  if q_ids is None or int(n_ids[j]) != int(q_ids[i])]
        total += (max(hinges) if hinges else 0.0) if reduce == "max" else sum(hinges)
    return total / q.shape[0]


@pytest.mark.parametrize("n_neg", [0, 1, 17])
@pytest.mark.parametrize("masked", [False, True])
def test_queue_infonce_matches_reference(n_neg, masked):
    q, k, negs = _unit(6, 8, 0), _unit(6, 8, 1), _unit(n_neg, 8, 2)
    q_ids = torch.arange(6)
    # Negatives reuse some query ids: those are stale positives and must be dropped.
    n_ids = torch.arange(n_neg) % 9 if masked else None
    for t in (0.07, torch.tensor(0.5)):
        got = queue_infonce(q.float(), k.float(), negs.float(), t, q_ids if masked else None, n_ids)
        want = _ref_infonce(q, k, negs, float(t), q_ids if masked else None, n_ids)
        assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_id_mask_removes_the_positive_copy_from_the_negatives():
    q = _unit(4, 8, 3).float()
    k = q.clone()  # the positive itself also sits among the negatives
    got = queue_infonce(q, k, k, 0.1, torch.arange(4), torch.arange(4))
    want = _ref_infonce(q.double(), k.double(), k.double(), 0.1, torch.arange(4), torch.arange(4))
    assert got.item() == pytest.approx(want, rel=1e-5)
    unmasked = queue_infonce(q, k, k, 0.1)
    assert unmasked.item() > got.item() + 0.1


def test_only_queries_receive_gradient():
    q = _unit(5, 8, 4).float().requires_grad_()
    k = _unit(5, 8, 5).float().requires_grad_()
    negs = _unit(9, 8, 6).float().requires_grad_()
    t = torch.tensor(0.07, requires_grad=True)
    queue_infonce(q, k, negs, t).backward()
    assert q.grad is not None and t.grad is not None
    assert k.grad is None and negs.grad is None


def test_stable_at_low_temperature_with_bf16_inputs():
    q, k, negs = _unit(8, 64, 7), _unit(8, 64, 8), _unit(4096, 64, 9)
    got = queue_infonce(q.bfloat16(), k.bfloat16(), negs.bfloat16(), 0.01)
    assert torch.isfinite(got)
    want = _ref_infonce(q.bfloat16().double(), k.bfloat16().double(), negs.bfloat16().double(), 0.01, None, None)
    assert got.item() == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("fn,reduce", [(vse_max, "max"), (vse_sum, "sum")])
@pytest.mark.parametrize("masked", [False, True])
def test_vse_losses_match_reference(fn, reduce, masked):
    q, k, negs = _unit(6, 8, 10), _unit(6, 8, 11), _unit(11, 8, 12)
    q_ids, n_ids = (torch.arange(6), torch.arange(11) % 7) if masked else (None, None)
    got = fn(q.float(), k.float(), negs.float(), 0.07, q_ids, n_ids, margin=0.3)
    want = _ref_vse(q, k, negs, 0.3, q_ids, n_ids, reduce)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_vse_with_no_negatives_is_zero_and_differentiable():
    q = _unit(3, 4, 13).float().requires_grad_()
    loss = vse_max(q, _unit(3, 4, 14).float(), torch.zeros(0, 4), 0.07)
    loss.backward()
    assert loss.item() == 0.0


def test_masked_entries_keep_the_temperature_gradient_finite():
    q = _unit(4, 8, 15).float().requires_grad_()
    k = _unit(4, 8, 16).float()
    t = torch.tensor(0.07, requires_grad=True)
    loss = queue_infonce(q, k, torch.cat([k, k]), t, torch.arange(4), torch.arange(8) % 4)
    loss.backward()
    assert torch.isfinite(t.grad) and torch.isfinite(q.grad).all()


def test_similarities_stay_float32_under_autocast():
    q, k, negs = _unit(8, 64, 17), _unit(8, 64, 18), _unit(512, 64, 19)
    want = queue_infonce(q.float(), k.float(), negs.float(), 0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = queue_infonce(q.float(), k.float(), negs.float(), 0.01)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def _ref_clip(img, txt, t):
    """CLIP's symmetric loss in float64: mean CE over image rows + mean CE over text rows."""
    logits = img @ txt.t() / t
    target = torch.arange(img.shape[0])
    return F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)


def test_grad_keys_gives_the_clip_loss_and_its_gradients():
    """With grad_keys the keys and negatives are the other tower's outputs: the two
    directions together are CLIP's loss, gradients through both sides included."""
    img64, txt64 = _unit(7, 8, 20).requires_grad_(), _unit(7, 8, 21).requires_grad_()
    t64 = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    want = _ref_clip(img64, txt64, t64)
    want.backward()
    img, txt = img64.detach().float().requires_grad_(), txt64.detach().float().requires_grad_()
    t = torch.tensor(0.1, requires_grad=True)
    ids = torch.arange(7)
    # In the model the gathered batch holds each row's own positive too: the id mask drops it.
    got = (queue_infonce(img, txt, txt, t, ids, ids, grad_keys=True)
           + queue_infonce(txt, img, img, t, ids, ids, grad_keys=True))
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(img.grad.double(), img64.grad, atol=1e-5)
    assert torch.allclose(txt.grad.double(), txt64.grad, atol=1e-5)
    assert t.grad.item() == pytest.approx(t64.grad.item(), rel=1e-4)


def test_a_row_with_every_negative_masked_is_finite():
    q = _unit(2, 8, 22).float().requires_grad_()
    t = torch.tensor(0.07, requires_grad=True)
    loss = queue_infonce(q, q.detach(), q.detach(), t, torch.tensor([0, 1]), torch.tensor([0, 0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all() and torch.isfinite(t.grad)


# ---------------------------------------------------------------------------------------
# Metric-learning objectives: float64 references element by element, on distances
# d = sqrt(max(2 - 2s, 0)) of unit rows, and D = 2 - 2s for the triplet loss.
# ---------------------------------------------------------------------------------------


def _counted(q_ids, n_ids, i, j):
    """Does negative j count for query i (the exclusion rule of the module docstring)?"""
    if q_ids is None:
        return True
    if q_ids.dim() == 1:
        return int(n_ids[j]) != int(q_ids[i])
    return not any(int(q_ids[i, f]) >= 0 and int(n_ids[j, f]) == int(q_ids[i, f]) for f in range(q_ids.shape[1]))


def _rows(q, k, negs, q_ids, n_ids):
    """Per query: (s_ip, [s_ij of the counted negatives]) as Python floats."""
    return [(float(q[i] @ k[i]), [float(q[i] @ negs[j]) for j in range(negs.shape[0]) if _counted(q_ids, n_ids, i, j)])
            for i in range(q.shape[0])]


def _d(s):
    return math.sqrt(max(2.0 - 2.0 * s, 0.0))


def _lse(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def _softplus(x):
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


def _ref_contrastive(rows, margin=1.0, **_):
    total = 0.0
    for sp, sn in rows:
        total += 0.5 * _d(sp) ** 2
        if sn:
            total += 0.5 * sum(max(0.0, margin - _d(s)) ** 2 for s in sn) / len(sn)
    return total / len(rows)


def _ref_triplet(rows, alpha=0.2, **_):
    total = 0.0
    for sp, sn in rows:
        if not sn:
            continue
        d_ap, d_an = 2.0 - 2.0 * sp, [2.0 - 2.0 * s for s in sn]
        semi = [x for x in d_an if x > d_ap]
        total += max(0.0, d_ap - (min(semi) if semi else max(d_an)) + alpha)
    return total / len(rows)


def _ref_dw_weights(dists, dim, cutoff=0.5, nonzero_loss_cutoff=1.4):
    """Normalised 1/q(d), q(d) = d^(dim-2) (1 - d^2/4)^((dim-3)/2), d clipped at cutoff;
    0 at d >= nonzero_loss_cutoff."""
    inv_q = [None if d >= nonzero_loss_cutoff else
             -((dim - 2) * math.log(max(d, cutoff)) + (dim - 3) / 2 * math.log(1 - max(d, cutoff) ** 2 / 4))
             for d in dists]
    kept = [x for x in inv_q if x is not None]
    if not kept:
        return [0.0] * len(dists)
    z = _lse(kept)
    return [0.0 if x is None else math.exp(x - z) for x in inv_q]


def _ref_margin(rows, dim, beta=1.2, alpha=0.2, cutoff=0.5, nonzero_loss_cutoff=1.4, at=None, **_):
    """`at`: the rows the (detached) sampling weights come from (default: `rows`)."""
    total = 0.0
    for (sp, sn), (_, sn_w) in zip(rows, at or rows):
        w = _ref_dw_weights([_d(s) for s in sn_w], dim, cutoff, nonzero_loss_cutoff)
        total += max(0.0, alpha + _d(sp) - beta) + sum(wj * max(0.0, alpha - (_d(s) - beta)) for wj, s in zip(w, sn))
    return total / len(rows)


def _ref_multi_similarity(rows, alpha=2.0, beta=50.0, lam=1.0, epsilon=0.1, **_):
    total = 0.0
    for sp, sn in rows:
        kept = [s for s in sn if s + epsilon > sp]
        if sn and sp - epsilon < max(sn):
            total += math.log(1 + math.exp(-alpha * (sp - lam))) / alpha
        total += math.log(1 + sum(math.exp(beta * (s - lam)) for s in kept)) / beta
    return total / len(rows)


def _ref_circle(rows, m=0.25, gamma=256.0, at=None, **_):
    """`at`: the rows the (detached) weights alpha_p, alpha_n come from (default: `rows`)."""
    total = 0.0
    for (sp, sn), (sp_a, sn_a) in zip(rows, at or rows):
        logit_p = -gamma * max(0.0, 1 + m - sp_a) * (sp - (1 - m))
        logits_n = [gamma * max(0.0, a + m) * (s - m) for s, a in zip(sn, sn_a)]
        total += _softplus((_lse(logits_n) if logits_n else 0.0) + logit_p)
    return total / len(rows)


METRIC = {  # registry name -> reference
    "contrastive": _ref_contrastive,
    "triplet": _ref_triplet,
    "margin": _ref_margin,
    "multi_similarity": _ref_multi_similarity,
    "circle": _ref_circle,
}


def _metric_inputs(n_neg, masking, b=6, dim=16, seed=30):
    """q, k, negatives: float64 unit rows, positives from unrelated (s ~ 0.1) to close
    (s ~ 0.9) across the rows, negatives from unrelated to hard (each leans towards one
    query), so that every branch of the mining and the hinges is taken (checked below);
    and exclusion keys: none, 1-D ids, [B, 3] keys with -1 ("none") entries, or 1-D ids
    that exclude every negative of row 0."""
    q = _unit(b, dim, seed)
    k = F.normalize(torch.linspace(0.0, 2.5, b, dtype=torch.float64).view(-1, 1) * q + _unit(b, dim, seed + 1), dim=1)
    lean = torch.tensor([1.5, 0.0, 0.6], dtype=torch.float64)[torch.arange(n_neg) % 3].view(-1, 1)
    negs = F.normalize(lean * q[torch.arange(n_neg) % b] + _unit(n_neg, dim, seed + 2), dim=1)
    if masking is None:
        return q, k, negs, None, None
    if masking == "ids":
        return q, k, negs, torch.arange(b), torch.arange(n_neg) % (b + 3)
    if masking == "row0":
        return q, k, negs, torch.arange(b), torch.zeros(n_neg, dtype=torch.long)
    g = torch.Generator().manual_seed(seed + 3)
    q_ids = torch.stack([torch.arange(b), torch.randint(-1, 4, (b,), generator=g),
                         torch.randint(-1, 3, (b,), generator=g)], dim=1)
    n_ids = torch.stack([torch.randint(0, 2 * b, (n_neg,), generator=g), torch.randint(-1, 4, (n_neg,), generator=g),
                         torch.randint(-1, 3, (n_neg,), generator=g)], dim=1)
    return q, k, negs, q_ids, n_ids


def _call(name, q, k, negs, q_ids=None, n_ids=None, grad_keys=False, **params):
    """Run the registered objective in float32 (the model's learnt scalars at their init)."""
    objective = OBJECTIVES[name]
    scalars = {n: torch.tensor(init) for n, init in objective.learnt}
    return objective.fn(q, k, negs, 0.07, q_ids, n_ids, grad_keys=grad_keys, **{**scalars, **params})


def _reference(name, q, k, negs, q_ids, n_ids, **params):
    rows = _rows(q, k, negs, q_ids, n_ids)
    return METRIC[name](rows, **({"dim": q.shape[1]} if name == "margin" else {}), **params)


@pytest.mark.parametrize("name", sorted(METRIC))
@pytest.mark.parametrize("n_neg", [0, 1, 17])
@pytest.mark.parametrize("masking", [None, "ids", "keys", "row0"])
def test_metric_objectives_match_reference(name, n_neg, masking):
    q, k, negs, q_ids, n_ids = _metric_inputs(n_neg, masking)
    qf = q.float().requires_grad_()
    got = _call(name, qf, k.float(), negs.float(), q_ids, n_ids)
    want = _reference(name, q, k, negs, q_ids, n_ids)
    assert got.item() == pytest.approx(want, rel=1e-4, abs=1e-6)
    got.backward()  # N = 0 and rows with every negative excluded included
    assert torch.isfinite(qf.grad).all()


def test_the_reference_cases_exercise_every_branch():
    """The cases above are not all one kind: rows with and without a semi-hard negative,
    with zero and non-zero distance weights, active and idle hinges, kept and dropped pairs."""
    rows = _rows(*_metric_inputs(17, "keys"))
    single = _rows(*_metric_inputs(1, None))
    for some in (rows, single):
        assert any(any(s < sp for s in sn) for sp, sn in some)  # a semi-hard negative
        assert any(any(_d(s) < 1.4 for s in sn) for sp, sn in some)  # distance weights
        assert any(any(s + 0.1 > sp for s in sn) for sp, sn in some)  # multi-similarity keeps a pair
        assert any(sn and not any(s + 0.1 > sp for s in sn) for sp, sn in some)  # and keeps none
    # With one negative: rows where it is closer than the positive (no semi-hard negative:
    # the easiest is taken) and rows where it lies past the weights' cutoff (all zero).
    assert any(all(s >= sp for s in sn) for sp, sn in single)
    assert any(all(_d(s) >= 1.4 for s in sn) for sp, sn in single)
    assert any(any(_d(s) < 1.0 for s in sn) for sp, sn in rows)  # an active contrastive hinge
    assert _ref_triplet(rows) > 0 and _ref_triplet(single) > 0


@pytest.mark.parametrize("name", sorted(METRIC))
def test_metric_objectives_take_their_hyper_parameters(name):
    """Non-default parameters reach the formula (the config's `model.loss_params`)."""
    params = {"contrastive": dict(margin=1.3), "triplet": dict(alpha=0.5),
              "margin": dict(alpha=0.3, beta=torch.tensor(1.0), cutoff=0.6, nonzero_loss_cutoff=1.5),
              "multi_similarity": dict(alpha=1.0, beta=20.0, lam=0.5, epsilon=0.2),
              "circle": dict(m=0.4, gamma=80.0)}[name]
    q, k, negs, q_ids, n_ids = _metric_inputs(17, "ids")
    got = _call(name, q.float(), k.float(), negs.float(), q_ids, n_ids, **params)
    want = _reference(name, q, k, negs, q_ids, n_ids, **{n: float(v) for n, v in params.items()})
    assert got.item() == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert got.item() != pytest.approx(_call(name, q.float(), k.float(), negs.float(), q_ids, n_ids).item(), rel=1e-3)


@pytest.mark.parametrize("name", sorted(METRIC))
@pytest.mark.parametrize("grad_keys", [False, True])
def test_metric_objectives_give_keys_gradients_only_in_clip_mode(name, grad_keys):
    q, k, negs, q_ids, n_ids = _metric_inputs(32, "ids", dim=8)
    q, k, negs = (t.float().requires_grad_() for t in (q, k, negs))
    _call(name, q, k, negs, q_ids, n_ids, grad_keys=grad_keys).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    if grad_keys:
        assert k.grad.abs().sum() > 0 and negs.grad.abs().sum() > 0
    else:
        assert k.grad is None and negs.grad is None


@pytest.mark.parametrize("name", sorted(METRIC))
def test_metric_objective_gradients_match_finite_differences(name):
    """Directional derivative along random directions of q, k and the negatives (CLIP mode:
    all three get gradients) against central differences of the float64 reference. The
    detached parts (circle's weights alpha_p, alpha_n; the margin loss's sampling weights)
    stay at the base point, as in the objective's gradient."""
    q, k, negs, q_ids, n_ids = _metric_inputs(17, "keys", dim=8, seed=40)
    v = [_unit(t.shape[0], t.shape[1], 50 + i) for i, t in enumerate((q, k, negs))]
    base = _rows(q, k, negs, q_ids, n_ids)
    dim = {"dim": q.shape[1]} if name == "margin" else {}
    at = {"at": base} if name in ("margin", "circle") else {}

    def ref(h):
        rows = _rows(*(t + h * dt for t, dt in zip((q, k, negs), v)), q_ids, n_ids)
        return METRIC[name](rows, **dim, **at)

    h = 1e-6
    want = (ref(h) - ref(-h)) / (2 * h)
    ts = [t.float().requires_grad_() for t in (q, k, negs)]
    _call(name, *ts, q_ids, n_ids, grad_keys=True).backward()
    got = sum(float((t.grad.double() * dt).sum()) for t, dt in zip(ts, v))
    assert got == pytest.approx(want, rel=1e-3, abs=1e-5)


def test_margin_beta_is_learnt_and_its_gradient_is_right():
    q, k, negs, q_ids, n_ids = _metric_inputs(17, "keys", seed=41)
    beta = torch.tensor(1.2, requires_grad=True)
    _call("margin", q.float(), k.float(), negs.float(), q_ids, n_ids, beta=beta).backward()
    rows = _rows(q, k, negs, q_ids, n_ids)
    h = 1e-6
    want = (_ref_margin(rows, q.shape[1], beta=1.2 + h) - _ref_margin(rows, q.shape[1], beta=1.2 - h)) / (2 * h)
    assert beta.grad is not None and beta.grad.item() != 0.0
    assert beta.grad.item() == pytest.approx(want, rel=1e-4)
    assert OBJECTIVES["margin"].learnt == (("beta", 1.2),)
    assert "beta" not in OBJECTIVES["margin"].hyper_parameters()


@pytest.mark.parametrize("dim", [8, 128])
def test_distance_weights_follow_the_inverse_sphere_density(dim):
    """w_ij proportional to 1/q(d_ij) (d clipped at 0.5), zero past 1.4 and for excluded
    negatives, rows normalised; a row with nothing eligible is all zero."""
    g = torch.Generator().manual_seed(42)
    d = torch.rand(5, 40, generator=g, dtype=torch.float64) * 2.0
    d[3] = 1.4 + 0.5 * torch.rand(40, generator=g, dtype=torch.float64)  # nothing below the cutoff
    skip = torch.rand(5, 40, generator=g) < 0.2
    skip[4] = True
    got = distance_weights(d.float(), dim, skip=skip)
    for i in range(5):
        kept = [j for j in range(40) if not skip[i, j]]
        want = _ref_dw_weights([float(d[i, j]) for j in kept], dim)
        row = dict(zip(kept, want))
        for j in range(40):
            assert float(got[i, j]) == pytest.approx(row.get(j, 0.0), rel=1e-4, abs=1e-12), (i, j)
    assert got[3].sum() == 0 and got[4].sum() == 0
    assert torch.allclose(got[:3].sum(dim=1), torch.ones(3))
    # The ratio of two eligible weights is the inverse ratio of their densities.
    i, (a, b) = 0, [j for j in range(40) if not skip[0, j] and 0.5 < float(d[0, j]) < 1.4][:2]

    def log_q(x):
        return (dim - 2) * math.log(x) + (dim - 3) / 2 * math.log(1 - x * x / 4)

    ratio = math.exp(log_q(float(d[i, b])) - log_q(float(d[i, a])))
    assert float(got[i, a] / got[i, b]) == pytest.approx(ratio, rel=1e-3)


def _on_circle(*cosines):
    """Unit rows in 2-D at the given cosine to (1, 0)."""
    return torch.tensor([[c, math.sqrt(1 - c * c)] for c in cosines])


def test_triplet_picks_the_semi_hard_negative():
    """D_ap = 1 (s 0.5). Negatives: the hardest (s 0.9, D 0.2), the semi-hard one (s 0.45,
    D 1.1: the smallest D above D_ap), a farther one (s 0.2, D 1.6) and the easiest (s -0.5,
    D 3). Semi-hard gives relu(1 - 1.1 + 0.2) = 0.1; the hardest would give 1.0, the
    easiest 0."""
    q, k = _on_circle(1.0), _on_circle(0.5)
    negs = _on_circle(0.9, 0.45, 0.2, -0.5).requires_grad_()
    loss = triplet_semihard(q, k, negs, None, grad_keys=True)
    assert loss.item() == pytest.approx(0.1, abs=1e-5)
    loss.backward()
    assert negs.grad[1].abs().sum() > 0 and negs.grad[[0, 2, 3]].abs().sum() == 0  # only the chosen one
    # Excluding the semi-hard one promotes the next: D 1.6 -> relu(1 - 1.6 + 0.2) = 0.
    ids = torch.tensor([7]), torch.tensor([0, 7, 0, 0])
    assert triplet_semihard(q, k, negs, None, *ids).item() == pytest.approx(0.0, abs=1e-6)
    assert vse_max(q, k, negs.detach(), None).item() == pytest.approx(0.6, abs=1e-5)  # hardest: 0.2 - 0.5 + 0.9


def test_triplet_without_a_semi_hard_negative_takes_the_easiest():
    """Every negative closer than the positive (s_p 0.2, D_ap 1.6): TensorFlow's rule takes
    the largest D_an (s 0.5, D 1.0): relu(1.6 - 1.0 + 0.2) = 0.8; the hardest gives 1.6."""
    q, k, negs = _on_circle(1.0), _on_circle(0.2), _on_circle(0.9, 0.5)
    assert triplet_semihard(q, k, negs, None).item() == pytest.approx(0.8, abs=1e-5)


@pytest.mark.parametrize("name", sorted(METRIC))
def test_metric_objectives_stay_float32_under_autocast(name):
    q, k, negs, q_ids, n_ids = _metric_inputs(64, "ids", dim=32)
    want = _call(name, q.float(), k.float(), negs.float(), q_ids, n_ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _call(name, q.float(), k.float(), negs.float(), q_ids, n_ids)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_registry_matches_the_config_literal():
    hint = typing.get_type_hints(ModelConfig)["loss"]
    assert set(typing.get_args(hint)) == set(OBJECTIVES) and len(typing.get_args(hint)) == len(OBJECTIVES)
    for name in METRIC:
        assert not OBJECTIVES[name].uses_temperature


def test_published_defaults_and_the_margin_key():
    """Each objective's defaults are what `model.loss_params` may override; `model.margin`
    is the VSE losses' key only, so contrastive keeps its own 1.0 unless loss_params says."""
    assert {n: OBJECTIVES[n].hyper_parameters() for n in METRIC} == {
        "contrastive": {"margin": 1.0}, "triplet": {"alpha": 0.2},
        "margin": {"alpha": 0.2, "cutoff": 0.5, "nonzero_loss_cutoff": 1.4},
        "multi_similarity": {"alpha": 2.0, "beta": 50.0, "lam": 1.0, "epsilon": 0.1},
        "circle": {"m": 0.25, "gamma": 256.0}}
    assert OBJECTIVES["infonce"].hyper_parameters() == {}  # distillation's alpha is the trainer's
    assert objective_params(tiny_model_config(loss="contrastive"))["margin"] == 1.0
    assert objective_params(tiny_model_config(loss="contrastive", loss_params={"margin": 0.7}))["margin"] == 0.7
    assert objective_params(tiny_model_config(loss="triplet", loss_params={"alpha": 0.3}))["alpha"] == 0.3
    with pytest.raises(ConfigError, match=r"model\.margin.*model\.loss_params\.margin"):
        objective_params(tiny_model_config(loss="contrastive", margin=0.5))
