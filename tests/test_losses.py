"""Losses against float64 references written here, element by element."""

import math

import pytest
import torch
import torch.nn.functional as F

from moco_mm.model.losses import queue_infonce, vse_max, vse_sum


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
