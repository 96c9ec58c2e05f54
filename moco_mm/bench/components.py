"""The step's components, each against its twin: the momentum update (ours, the
per-parameter loop, the copy floors), the queue loss (ours against ALBEF's), and every
registered objective against queue InfoNCE on the same inputs."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from moco_mm.bench.systems import MOMENTUM, OurStep, Sizes, make_batch
from moco_mm.model.dual_queue import _meta
from moco_mm.model.losses import OBJECTIVES, excluded

# ---------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------


class Components:
    """Twins of the pieces where (a) and (d) differ, timed on (a)'s own tensors."""

    def __init__(self, ours: OurStep, s: Sizes):
        self.model = ours.model
        k_params, q_params, _, _ = ours.model._ema_lists()
        self.k = k_params
        self.q = q_params
        # Scratch copies for the floors, so timing them does not change (a)'s key towers.
        self.k_scratch = [t.clone() for t in k_params]
        self.bytes = sum(t.numel() * t.element_size() for t in k_params)
        # The strictest floor: one contiguous copy of as many bytes (no per-tensor work).
        n = sum(t.numel() for t in k_params)
        self.flat_src, self.flat_dst = torch.randn(n), torch.empty(n)
        # Loss inputs: detached queries (so backward stops at the loss) and real keys.
        batch = make_batch(s, seed=3, first_id=0)
        m = self.model
        meta = _meta(batch["sample_id"], None)  # [B, 4]: the id, no fingerprints
        with torch.no_grad():
            q_img, q_txt, _, _ = m.query(batch["image"], batch["input_ids"], batch["attention_mask"])
            self.keys = m.compute_keys(batch["image"], batch["input_ids"], batch["attention_mask"], meta)
        self.q_img, self.q_txt = q_img.clone().requires_grad_(), q_txt.clone().requires_grad_()
        self.temp = torch.tensor(0.07, requires_grad=True)
        self.ids = batch["sample_id"]
        self.meta, self.q_meta = meta, m.query_meta(meta)
        # The reference keeps its queues as [D, K] buffers.
        self.ref_img_queue = m.image_queue.features.t().contiguous()
        self.ref_txt_queue = m.text_queue.features.t().contiguous()
        self.ref_idx_queue = m.image_queue.ids.view(1, -1).clone()

    def ema_ours(self) -> None:
        self.model.momentum_update(MOMENTUM)

    def ema_copy(self) -> None:
        torch._foreach_copy_(self.k_scratch, self.q)

    def ema_copy_flat(self) -> None:
        self.flat_dst.copy_(self.flat_src)

    def loss_ours(self) -> None:
        """Both directions of our loss over [gathered batch ; queue], forward + backward."""
        m, (k_img, k_txt, all_img, all_txt, all_meta) = self.model, self.keys
        loss_i2t, loss_t2i, _ = m.losses(self.q_img, self.q_txt, k_img, k_txt, all_img, all_txt, all_meta,
                                         self.meta, self.temp)
        (loss_i2t + loss_t2i).backward()

    def loss_ours_batch(self) -> None:
        """Our loss over the gathered batch alone: `loss_ours` minus this is what scoring
        the queue rows costs, the one thing (a) adds to the CLIP step besides the key
        towers' forward (and the EMA)."""
        m, (k_img, k_txt, all_img, all_txt, all_meta) = self.model, self.keys
        neg_keys = m.query_meta(all_meta)
        mask = excluded(self.q_meta, neg_keys)  # as the model: one mask for both directions
        loss = (m.loss_fn(self.q_img, k_txt, all_txt, self.temp, self.q_meta, neg_keys, mask=mask)
                + m.loss_fn(self.q_txt, k_img, all_img, self.temp, self.q_meta, neg_keys, mask=mask))
        loss.backward()

    def loss_objective(self, name: str) -> Callable[[], None]:
        """Objective `name` (`OBJECTIVES`), both directions, forward + backward, on the
        inputs of `loss_ours`: the batch's queries against [gathered batch keys ; queue],
        id-masked. Published defaults; learnt scalars (the margin loss's beta) at their init,
        trained (they get a gradient). The banks of negatives are built once here: they are
        the same for every objective, so the figures are the objectives' own cost."""
        objective = OBJECTIVES[name]
        scalars = {n: torch.tensor(float(init), requires_grad=True) for n, init in objective.learnt}
        fn = partial(objective.fn, **objective.hyper_parameters(), **scalars)
        m, (k_img, k_txt, all_img, all_txt, all_meta) = self.model, self.keys
        neg_txt, neg_meta = m._negatives(m.text_queue, all_txt, all_meta)
        neg_img, _ = m._negatives(m.image_queue, all_img, None)
        neg_keys = m.query_meta(neg_meta)

        def run() -> None:
            mask = excluded(self.q_meta, neg_keys)  # as the model: one mask for both directions
            loss = (fn(self.q_img, k_txt, neg_txt, self.temp, self.q_meta, neg_keys, mask=mask)
                    + fn(self.q_txt, k_img, neg_img, self.temp, self.q_meta, neg_keys, mask=mask))
            loss.backward()

        return run

    def loss_ref(self) -> None:
        """ALBEF's: clone the queues, concatenate, soft-target cross-entropy (no id mask)."""
        k_img, k_txt = self.keys[0], self.keys[1]
        img_all = torch.cat([k_img.t(), self.ref_img_queue.clone()], dim=1)
        txt_all = torch.cat([k_txt.t(), self.ref_txt_queue.clone()], dim=1)
        targets = torch.zeros(k_img.shape[0], img_all.shape[1])
        targets.fill_diagonal_(1)
        loss = (-(F.log_softmax(self.q_img @ txt_all / self.temp, dim=1) * targets).sum(1).mean()
                - (F.log_softmax(self.q_txt @ img_all / self.temp, dim=1) * targets).sum(1).mean())
        loss.backward()

    def loss_ref_ids(self) -> None:
        """ALBEF's retrieval loss, the id-aware twin of ours: rows whose id equals the
        query's become soft positives (`pos_idx / pos_idx.sum`) instead of being masked."""
        k_img, k_txt = self.keys[0], self.keys[1]
        img_all = torch.cat([k_img.t(), self.ref_img_queue.clone()], dim=1)
        txt_all = torch.cat([k_txt.t(), self.ref_txt_queue.clone()], dim=1)
        idx = self.ids.view(-1, 1)
        idx_all = torch.cat([idx.t(), self.ref_idx_queue.clone()], dim=1)
        pos_idx = torch.eq(idx, idx_all).float()
        targets = pos_idx / pos_idx.sum(1, keepdim=True)
        loss = (-(F.log_softmax(self.q_img @ txt_all / self.temp, dim=1) * targets).sum(1).mean()
                - (F.log_softmax(self.q_txt @ img_all / self.temp, dim=1) * targets).sum(1).mean())
        loss.backward()

    def ema_loop(self) -> None:
        with torch.no_grad():
            for i, (q, k) in enumerate(zip(self.q, self.k_scratch)):
                self.k_scratch[i].data = k.data * MOMENTUM + q.data * (1.0 - MOMENTUM)
