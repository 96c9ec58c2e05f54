"""Negatives that are not negatives: exact duplicates of the positive (caption text, image,
group) are excluded in the gathered batch and in the queue, both directions; momentum
distillation's soft targets against a float64 reference; their config checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moco_mm.config import ConfigError, QueueConfig
from moco_mm.model import DualQueueMoCo
from moco_mm.model.losses import excluded, objective_params, queue_infonce
from tests.tiny import tiny_batch, tiny_model_config

TEXT, IMAGE, GROUP = 0, 1, 2


def _fingerprints(n: int, first: int) -> torch.Tensor:
    """Distinct fingerprints per sample (none shared), no group."""
    fp = torch.stack([torch.arange(n) + 10_000 + first, torch.arange(n) + 20_000 + first, torch.full((n,), -1)], 1)
    return fp.long()


def _two_batches():
    """Batch A (ids 0..3) goes to the queue; batch B (ids 100..103) is the step under test.
    B0 shares its caption text with A1 (queue) and B2 (batch); B1 shares its image with
    A3 (queue) and B3 (batch); B2's group is A0's (queue)."""
    a, b = tiny_batch(4, 0, first_id=0), tiny_batch(4, 1, first_id=100)
    fa, fb = _fingerprints(4, 0), _fingerprints(4, 100)
    fb[0, TEXT] = fa[1, TEXT]
    fb[2, TEXT] = fa[1, TEXT]
    fb[1, IMAGE] = fa[3, IMAGE]
    fb[3, IMAGE] = fa[3, IMAGE]
    fa[0, GROUP] = fb[2, GROUP] = 777
    return (a, fa), (b, fb)


# negative bank layout of step B: gathered batch B (columns 0..3), then the queue (A: 4..7)
EXPECTED = {
    "none": {(0, 0), (1, 1), (2, 2), (3, 3)},  # the stale copy of each positive only
    "text": {(0, 0), (1, 1), (2, 2), (3, 3), (0, 2), (0, 5), (2, 0), (2, 5)},
    "image": {(0, 0), (1, 1), (2, 2), (3, 3), (1, 3), (1, 7), (3, 1), (3, 7)},
}
EXPECTED["both"] = EXPECTED["text"] | EXPECTED["image"]
GROUPED = {(2, 4)}  # B2 and A0 share a group, whatever mask_duplicates says


@pytest.mark.parametrize("mode", ["none", "text", "image", "both"])
def test_duplicates_are_excluded_in_the_batch_and_the_queue_both_directions(mode):
    torch.manual_seed(0)
    m = DualQueueMoCo(tiny_model_config(mask_duplicates=mode), QueueConfig(size=16))
    (a, fa), (b, fb) = _two_batches()
    with torch.no_grad():
        m.enqueue(m(**a, fingerprints=fa))
    assert torch.equal(m.text_queue.fingerprints, fa) and torch.equal(m.image_queue.fingerprints, fa)
    meta = torch.cat([b["sample_id"].view(-1, 1), fb], 1)
    q_meta = m.query_meta(meta)
    for queue in (m.text_queue, m.image_queue):  # i2t and t2i see the same rows and meta
        _, neg_meta = m._negatives(queue, torch.zeros(4, 32), meta)
        mask = excluded(q_meta, m.query_meta(neg_meta))
        got = {(i, j) for i, j in zip(*torch.nonzero(mask, as_tuple=True)) for i, j in [(int(i), int(j))]}
        assert got == EXPECTED[mode] | GROUPED


def test_excluded_negatives_do_not_move_the_loss():
    """Replacing an excluded negative by any other vector leaves the loss unchanged; a
    counted one does change it."""
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(2)
    q, k = F.normalize(torch.randn(3, 8, generator=g), dim=1), F.normalize(torch.randn(3, 8, generator=g), dim=1)
    negs = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    q_ids = torch.tensor([[0, 50, 60, -1], [1, 51, 61, 7], [2, 52, 62, -1]])
    n_ids = torch.tensor([[9, 50, 0, -1], [9, 0, 61, -1], [9, 0, 0, 7], [9, 0, 0, -1], [2, 0, 0, -1]])
    # every negative but column 3 is excluded from exactly one row; -1 never matches
    base = queue_infonce(q[:1], k[:1], negs, 0.1, q_ids[:1], n_ids)
    moved = negs.clone()
    moved[0] = F.normalize(torch.randn(8, generator=g), dim=0)  # excluded for row 0 (same text fp)
    assert queue_infonce(q[:1], k[:1], moved, 0.1, q_ids[:1], n_ids).item() == pytest.approx(base.item(), abs=1e-7)
    moved[3] = F.normalize(torch.randn(8, generator=g), dim=0)  # counted for row 0
    assert queue_infonce(q[:1], k[:1], moved, 0.1, q_ids[:1], n_ids).item() != pytest.approx(base.item(), abs=1e-4)


# --- momentum distillation ---------------------------------------------------------------


def _ref_distilled(q, k, negs, teacher, t, alpha, q_ids, n_ids):
    """float64, element by element: CE of the student's softmax against
    alpha * softmax(teacher scores) + (1 - alpha) * one-hot(positive), excluded columns dropped."""
    total = 0.0
    for i in range(q.shape[0]):
        cols = [0] + [j + 1 for j in range(negs.shape[0])
                      if not any(int(q_ids[i, f]) >= 0 and int(q_ids[i, f]) == int(n_ids[j, f])
                                 for f in range(q_ids.shape[1]))]
        bank = [k[i]] + [negs[j - 1] for j in cols[1:]]
        s = [float(q[i] @ v) / t for v in bank]
        ts = [float(teacher[i] @ v) / t for v in bank]
        lse_s = max(s) + math.log(sum(math.exp(x - max(s)) for x in s))
        lse_t = max(ts) + math.log(sum(math.exp(x - max(ts)) for x in ts))
        target = [alpha * math.exp(x - lse_t) for x in ts]
        target[0] += 1.0 - alpha
        total += -sum(p * (x - lse_s) for p, x in zip(target, s))
    return total / q.shape[0]


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_distillation_matches_a_float64_reference(alpha):
    g = torch.Generator().manual_seed(3)
    unit = lambda n: F.normalize(torch.randn(n, 16, generator=g, dtype=torch.float64), dim=1)  # noqa: E731
    q, k, negs, teacher = unit(5), unit(5), unit(11), unit(5)
    q_ids = torch.stack([torch.arange(5), torch.arange(5) + 40, torch.full((5,), -1)], 1)
    n_ids = torch.stack([torch.arange(11) % 7, torch.arange(11) + 40, torch.full((11,), -1)], 1)
    for t in (0.07, torch.tensor(0.5)):
        got = queue_infonce(q.float(), k.float(), negs.float(), t, q_ids, n_ids, teacher=teacher.float(), alpha=alpha)
        want = _ref_distilled(q, k, negs, teacher, float(t), alpha, q_ids, n_ids)
        assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    # alpha 0 is plain InfoNCE; the teacher gets no gradient
    plain = queue_infonce(q.float(), k.float(), negs.float(), 0.1, q_ids, n_ids)
    teacher32 = teacher.float().requires_grad_()
    zero = queue_infonce(q.float(), k.float(), negs.float(), 0.1, q_ids, n_ids, teacher=teacher32, alpha=0.0)
    assert zero.item() == pytest.approx(plain.item(), rel=1e-7)
    q32 = q.float().requires_grad_()
    queue_infonce(q32, k.float(), negs.float(), torch.tensor(0.1, requires_grad=True), q_ids, n_ids,
                  teacher=teacher32, alpha=0.4).backward()
    assert teacher32.grad is None and q32.grad is not None and torch.isfinite(q32.grad).all()


def test_the_model_distills_from_its_key_towers():
    torch.manual_seed(4)
    m = DualQueueMoCo(tiny_model_config(distill_alpha=0.4), QueueConfig(size=16))
    b = tiny_batch(4, 5)
    m.enqueue(m(**tiny_batch(4, 6, first_id=50)))
    out = m(**b, distill_alpha=0.4)
    with torch.no_grad():
        meta = torch.cat([b["sample_id"].view(-1, 1), torch.full((4, 3), -1)], 1)
        q_img, q_txt, t, _ = m.query(b["image"], b["input_ids"], b["attention_mask"])
        k_img, k_txt = m.key.image(b["image"]), m.key.text(b["input_ids"], b["attention_mask"])
        neg_txt, neg_meta = m._negatives(m.text_queue, k_txt, meta)
        want = queue_infonce(q_img, k_txt, neg_txt, t, m.query_meta(meta), m.query_meta(neg_meta),
                             teacher=k_img, alpha=0.4)
    assert out.loss_i2t.item() == pytest.approx(want.item(), rel=1e-5)
    assert out.loss_i2t.item() != pytest.approx(m(**b).loss_i2t.item(), rel=1e-4)  # alpha 0 differs


@pytest.mark.parametrize("change,key", [
    (dict(distill_alpha=0.4, loss="vse_max"), "model.distill_alpha"),
    (dict(distill_alpha=0.4, momentum_encoder=False), "model.distill_alpha"),
    (dict(loss_params={"marginn": 0.3}, loss="vse_max"), "model.loss_params.marginn"),
    (dict(loss_params={"margin": "wide"}, loss="vse_sum"), "model.loss_params.margin"),
])
def test_objective_config_errors_name_the_key(change, key):
    cfg = tiny_model_config(**change)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        objective_params(cfg)


def test_loss_params_override_the_published_defaults():
    cfg = tiny_model_config(loss="vse_max", margin=0.3)
    assert objective_params(cfg)["margin"] == 0.3
    cfg.loss_params = {"margin": 0.5}
    assert objective_params(cfg)["margin"] == 0.5


def test_the_trainer_ramps_distillation_over_the_first_epoch(tmp_path, demo):
    """ALBEF's warm-up: alpha * min(1, step / steps per epoch); a fixed ramp when given."""
    from moco_mm import distributed as D
    from moco_mm.config import load_config
    from moco_mm.train import Trainer
    from tests.trainrun import tiny_train_config, write_config

    cfg = tiny_train_config(demo, tmp_path / "run", data={"batch_size": 8, "workers": 0},
                            model={"distill_alpha": 0.4})
    t = Trainer(load_config(write_config(cfg, tmp_path / "c.yaml")), D.init_distributed("cpu"))
    per_epoch = t.batches_per_epoch
    assert per_epoch > 4
    alphas = []
    for step in (0, per_epoch // 2, per_epoch, 3 * per_epoch):
        t.step = step
        alphas.append(t.distill_alpha())
    assert alphas == pytest.approx([0.0, 0.4 * (per_epoch // 2) / per_epoch, 0.4, 0.4])
    t.cfg.model.distill_warmup_steps = 0
    assert t.distill_alpha() == 0.4
    t.step = 0
    m = t.train_step(t._batches())
    assert m["finite"] and m["distill_alpha"] == 0.4
