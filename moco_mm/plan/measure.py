"""Validation of the planner: what a real fp32 step holds on the CPU (tests compare)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moco_mm.config import Config
from moco_mm.plan.trace import _key, _SavedBytes


@dataclass(frozen=True)
class StepMeasurement:
    """Bytes one real forward/backward/AdamW step holds (CPU, no autocast).

    `params` covers query + key towers (weights and buffers), `grads` every `.grad`
    after backward, `optimizer` every tensor in AdamW's state after the step,
    `saved_towers` the storages autograd saved while the query towers ran (params,
    buffers and the batch excluded), `saved_loss` those saved after them (bank, logits).
    """

    params: int
    grads: int
    optimizer: int
    saved_towers: int
    saved_loss: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.saved_towers


def measure_step(cfg: Config, vocab_size: int, seed: int = 0) -> StepMeasurement:
    """Run one real step of `DualQueueMoCo` on the CPU (fp32) with full queues and measure.

    Independent of the planner's tracing: real tensors, the real model, the real loss,
    a real `torch.optim.AdamW` over the trainable query parameters.
    """
    from moco_mm.model import DualQueueMoCo

    torch.manual_seed(seed)
    model = DualQueueMoCo(cfg.model, cfg.queue, vocab_size=vocab_size)
    b, d, length, size = cfg.data.batch_size, cfg.model.embed_dim, cfg.model.text.max_length, cfg.model.image.image_size
    if cfg.queue.enabled:
        for queue in (model.image_queue, model.text_queue):
            rows = torch.nn.functional.normalize(torch.randn(queue.size, d), dim=1)
            queue.enqueue(rows, torch.arange(queue.size) + 10 ** 9)
    # Captions of different lengths, as the collate pads them: with padding the text
    # tower materialises its attention mask (an all-ones mask may be skipped).
    lengths = torch.randint(max(1, length // 2), length + 1, (b,))
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    batch = {
        "image": torch.randn(b, 3, size, size),
        "input_ids": torch.randint(1, vocab_size, (b, length)) * mask,
        "attention_mask": mask,
        "sample_id": torch.arange(b),
    }
    towers = [*model.query.parameters(), *model.query.buffers()]
    if model.key is not None:
        towers += [*model.key.parameters(), *model.key.buffers()]
    ignore = {_key(t) for t in (*towers, *model.buffers(), *batch.values())}
    saved = _SavedBytes(ignore)
    in_towers: set[int] = set()

    def after_towers(module, args, out):
        in_towers.update(saved.seen)

    handle = model.query.register_forward_hook(after_towers)
    trained = [p for p in model.query.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-4)
    try:
        with saved.hooks():
            out = model(**batch)
        saved_towers = saved.total(in_towers)
        saved_loss = saved.total() - saved_towers
        out.loss.backward()
        opt.step()
    finally:
        handle.remove()
    unique = {_key(t): t.untyped_storage().nbytes() for t in towers}
    grads = sum(p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None)
    # AdamW's per-parameter `step` counters live on the CPU even on a GPU run: not counted.
    state = sum(v.untyped_storage().nbytes() for s in opt.state.values() for name, v in s.items()
                if isinstance(v, torch.Tensor) and name != "step")
    return StepMeasurement(sum(unique.values()), grads, state, saved_towers, saved_loss)
