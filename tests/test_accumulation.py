"""Gradient accumulation does what the trainer's docstring says: one EMA per optimizer step
(after it, from the updated query weights), every micro-batch against the queue as it was
at the start of the step, keys enqueued after the optimizer step in order, gradients
averaged over micro-batches."""

from __future__ import annotations

import pytest
import torch

from moco_mm import distributed as D
from moco_mm.config import load_config
from moco_mm.train import Trainer
from tests.trainrun import tiny_train_config, write_config


def _trainer(demo, tmp_path, **optim) -> Trainer:
    cfg = tiny_train_config(demo, tmp_path / "run", data={"batch_size": 8, "workers": 0},
                            optim={"grad_clip": 0.0, **optim},
                            model={"text": {"name": "bert", "tokenizer": str(demo / "tokenizer"),
                                            "pooling": "mean", "max_length": 16,
                                            "overrides": {"hidden_size": 64, "num_hidden_layers": 2,
                                                          "num_attention_heads": 2, "intermediate_size": 128,
                                                          "max_position_embeddings": 32,
                                                          "hidden_dropout_prob": 0.0,
                                                          "attention_probs_dropout_prob": 0.0}}})
    tmp_path.mkdir(parents=True, exist_ok=True)
    return Trainer(load_config(write_config(cfg, tmp_path / "c.yaml")), D.init_distributed("cpu"))


def test_accumulation_semantics(tmp_path, demo):
    acc = _trainer(demo, tmp_path / "a", accum_steps=2)
    q0 = {n: p.detach().clone() for n, p in acc.model.query.named_parameters()}
    k0 = {n: p.detach().clone() for n, p in acc.model.key.named_parameters()}
    batches = acc._batches()
    m = acc.train_step(batches)

    # One EMA per optimizer step, after it: key = m * key + (1 - m) * (query after the step).
    mom = m["momentum"]  # constant schedule: the next step's momentum is the same
    q1 = dict(acc.model.query.named_parameters())
    for n, p in acc.model.key.named_parameters():
        want = k0[n] * mom + q1[n].detach() * (1 - mom)
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(q1[n].detach(), q0[n]) for n in q0)  # the step moved the query
    # Both micro-batches reached the queues, in order.
    assert len(acc.model.image_queue) == 16 and len(acc.model.text_queue) == 16
    assert acc.loader_state.step == 2

    # The accumulated gradient is the mean of the two micro-batch gradients: replay the
    # same two micro-batches by hand on a fresh trainer with the same seed.
    ref = _trainer(demo, tmp_path / "b", accum_steps=2)
    it = ref._batches()
    grads, losses, outs = [], [], []
    for _ in range(2):
        b = next(it)
        out = ref.model(**{k: b[k] for k in ("image", "input_ids", "attention_mask", "sample_id")})
        ref.model.query.zero_grad()
        out.loss.backward()
        losses.append(out.loss.item())
        grads.append({n: p.grad.clone() for n, p in ref.model.query.named_parameters() if p.grad is not None})
        outs.append(out)
    # Apply the mean gradient with the same optimizer step: the weights must match what
    # train_step produced.
    assert m["loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)
    for g in ref.optimizer.param_groups:
        g["lr"] = m["lr"]
    for n, p in ref.model.query.named_parameters():
        if n in grads[0]:
            p.grad = (grads[0][n] + grads[1][n]) / 2
    ref.optimizer.step()
    ref.model.query.clamp_temperature()
    for out in outs:
        ref.model.enqueue(out)
    got = dict(acc.model.query.named_parameters())
    for n, p in ref.model.query.named_parameters():
        torch.testing.assert_close(got[n].detach(), p.detach(), rtol=1e-5, atol=1e-6)
    for a, b in ((acc.model.image_queue, ref.model.image_queue), (acc.model.text_queue, ref.model.text_queue)):
        assert torch.equal(a.ids, b.ids)
        torch.testing.assert_close(a.features, b.features)
