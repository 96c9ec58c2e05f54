"""Training-step benchmark: our dual-queue step against CLIP (OpenCLIP) and a MoCo/ALBEF-style step.

    python tools/bench.py [--quick] [--json OUT] [--no-dist] [--threads 1]

All variants use the same towers (a small timm ViT registered here, a small random-init
BERT), the same batch, fp32 on the CPU and the same thread count. Variants are timed
interleaved (A B C D E A B C D E ...) so that load from other processes on a shared
machine hits all of them alike; figures are medians over the timed rounds, and ratios
are medians of the per-round ratios (each round's variants ran seconds apart).

    (a) ours       DualQueueMoCo, queue of --queue rows per modality (pre-filled)
    (b) ours/clip  the CLIP mode: model.momentum_encoder=false, queue.enabled=false (no key
                   towers; in-batch negatives gathered with gradient: the CLIP objective)
    (c) openclip   open_clip.CustomTextCLIP on the same towers + open_clip.ClipLoss
    (d) reference  MoCo/ALBEF style, written here: per-parameter momentum loop, one
                   all_gather per modality, queues as buffers of the (DDP-wrapped) model
    (e) key fwd    one no-grad forward of both towers; floor of (a) = (c) + (e)

Components, each against its twin: momentum update (our fused `_foreach_lerp_` EMA; the
reference per-parameter loop; the copy floors: `_foreach_copy_` of the same tensors and one
flat copy of the same number of bytes); the queue loss (ours, id-masked, against ALBEF's
pre-training loss, which ignores ids, and ALBEF's id-aware retrieval loss, its twin);
with 2 processes: one gather of both modalities vs one per modality, and the queue
broadcast DDP does when the whole model (queues as buffers) is wrapped.

The 2-process part re-runs this file under `torchrun --nproc_per_node=2` (gloo) with the
same per-rank batch; rank 0 writes its medians to a JSON file the parent reads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import moco_mm  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from moco_mm import distributed as D  # noqa: E402
from moco_mm.config import Config, ImageTowerConfig, ModelConfig, QueueConfig, TextTowerConfig  # noqa: E402
from moco_mm.encoders import build_towers  # noqa: E402
from moco_mm.model import DualQueueMoCo  # noqa: E402
from moco_mm.train import build_optimizer  # noqa: E402

VIT_NAME = "benchvit_mm"  # registered with timm below so OpenCLIP's TimmModel can build it too
MOMENTUM = 0.995


# ---------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------


@dataclass
class Sizes:
    """Tower and batch sizes; one instance drives every variant."""

    batch: int = 32
    image: int = 32
    patch: int = 8
    width: int = 128  # both towers
    depth: int = 4  # both towers
    heads: int = 2
    seq: int = 16
    vocab: int = 1000
    embed_dim: int = 128
    queue: int = 4096

    @classmethod
    def quick(cls) -> "Sizes":
        # Same structure, thinner and shallower: the smoke test needs < 60 s in all.
        return cls(width=64, depth=2, seq=12)


_VIT_ARGS: dict = {}


def _register_vit(s: Sizes) -> None:
    """Register a timm ViT of the chosen size under a fixed name.

    OpenCLIP's TimmModel passes no width/depth/img_size to timm, so the only way to give
    it the same image tower as ours is a named timm model with the sizes baked in.
    """
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    _VIT_ARGS.update(img_size=s.image, patch_size=s.patch, embed_dim=s.width, depth=s.depth,
                     num_heads=s.heads, mlp_ratio=4.0)
    if timm.is_model(VIT_NAME):
        return

    @register_model
    def benchvit_mm(pretrained: bool = False, **kwargs) -> nn.Module:  # noqa: ARG001 (timm's signature)
        for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(k, None)  # timm's create_model passes these; a bare constructor rejects them
        model = VisionTransformer(**{**_VIT_ARGS, **kwargs})
        # OpenCLIP's TimmModel reads default_cfg; a registered model built by timm has one.
        model.pretrained_cfg = model.default_cfg = {}
        return model


def bert_overrides(s: Sizes) -> dict:
    return dict(hidden_size=s.width, num_hidden_layers=s.depth, num_attention_heads=s.heads,
                intermediate_size=4 * s.width, vocab_size=s.vocab, max_position_embeddings=max(64, s.seq))


def model_config(s: Sizes) -> ModelConfig:
    return ModelConfig(
        image=ImageTowerConfig(name=VIT_NAME, image_size=s.image),
        text=TextTowerConfig(name="bert", overrides=bert_overrides(s)),
        embed_dim=s.embed_dim, momentum=MOMENTUM,
    )


def make_batch(s: Sizes, seed: int, first_id: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, s.vocab, (s.batch, s.seq), generator=g)
    lengths = torch.randint(s.seq // 2, s.seq + 1, (s.batch,), generator=g)
    mask = (torch.arange(s.seq)[None, :] < lengths[:, None]).long()
    return {
        "image": torch.randn(s.batch, 3, s.image, s.image, generator=g),
        "input_ids": ids * mask,  # pad id 0 = BERT's pad_token_id, so OpenCLIP's mask agrees
        "attention_mask": mask,
        "sample_id": torch.arange(first_id, first_id + s.batch, dtype=torch.long),
    }


# ---------------------------------------------------------------------------------------
# (a), (b): our step (the core of Trainer.train_step, without data loading and logging)
# ---------------------------------------------------------------------------------------


class OurStep:
    """`queue_on` false: the CLIP mode (no key towers, no queue)."""

    def __init__(self, s: Sizes, queue_on: bool, ddp: bool = False):
        torch.manual_seed(0)
        cfg = model_config(s)
        cfg.momentum_encoder = queue_on
        self.model = DualQueueMoCo(cfg, QueueConfig(enabled=queue_on, size=s.queue))
        self.query = self.model.query
        if ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.query = DDP(self.model.query)  # as the trainer: only the query towers
        self.optimizer = build_optimizer(self.model.query, Config())
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if queue_on:
            # Time the steady state: a full queue (it fills after queue/global-batch steps).
            keys = F.normalize(torch.randn(s.queue, s.embed_dim), dim=1)
            ids = torch.arange(10_000_000, 10_000_000 + s.queue)
            self.model.image_queue.enqueue(keys, ids)
            self.model.text_queue.enqueue(keys.flip(0), ids)

    def __call__(self, batch: dict[str, torch.Tensor]) -> None:
        self.model.momentum_update(MOMENTUM)
        out = self.model(**batch, query=self.query)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        if bool(torch.isfinite(grad_norm)):  # the trainer's skip check (one host sync)
            self.optimizer.step()
            self.model.query.clamp_temperature()
            self.model.enqueue(out)
        self.optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------
# (c): OpenCLIP on the same towers
# ---------------------------------------------------------------------------------------


class OpenClipStep:
    def __init__(self, s: Sizes, bert_dir: Path):
        import open_clip

        torch.manual_seed(0)
        vision_cfg = dict(timm_model_name=VIT_NAME, timm_model_pretrained=False, image_size=s.image,
                          timm_pool="token", timm_proj="linear")
        # A local directory holding only a config: HFTextEncoder builds it with from_config
        # (hf_model_pretrained=False), so nothing is downloaded.
        text_cfg = dict(hf_model_name=str(bert_dir), hf_tokenizer_name=str(bert_dir), hf_model_pretrained=False,
                        hf_proj_type="linear", hf_pooler_type="cls_last_hidden_state_pooler")
        self.model = open_clip.CustomTextCLIP(s.embed_dim, vision_cfg, text_cfg, output_dict=True)
        self.loss = open_clip.ClipLoss(rank=D.rank(), world_size=D.world_size())
        self.forward_model: nn.Module = self.model
        if D.world_size() > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.forward_model = DDP(self.model)
        # OpenCLIP's grouping: no weight decay on gains, biases and the logit scale.
        decay, no_decay = [], []
        for n, p in self.model.named_parameters():
            (no_decay if p.ndim < 2 or "logit_scale" in n or "bn" in n or "ln" in n else decay).append(p)
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=1e-4, betas=(0.9, 0.98), eps=1e-6)
        self.params = decay + no_decay

    def __call__(self, batch: dict[str, torch.Tensor]) -> None:
        out = self.forward_model(batch["image"], batch["input_ids"])
        loss = self.loss(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        with torch.no_grad():  # what OpenCLIP's training loop does after each step
            self.model.logit_scale.clamp_(0, math.log(100))
        self.optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------
# (d): MoCo / ALBEF reference style (written for this comparison)
# ---------------------------------------------------------------------------------------


def per_parameter_momentum(query: nn.Module, key: nn.Module, m: float) -> None:
    """The reference EMA: a Python loop, two new tensors per parameter, rebinding `.data`."""
    with torch.no_grad():
        for p_q, p_k in zip(query.parameters(), key.parameters()):
            p_k.data = p_k.data * m + p_q.data * (1.0 - m)


def gather_each(x: torch.Tensor) -> torch.Tensor:
    """The reference gather: one blocking collective per tensor."""
    if not D.is_dist():
        return x
    parts = [torch.empty_like(x) for _ in range(D.world_size())]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class RefMoCo(nn.Module):
    """ALBEF's contrastive head over our tower classes.

    Queues are buffers of the model (random unit vectors at start, `size % batch == 0`
    asserted), keys are gathered per modality and enqueued inside `forward`, and the
    momentum update is the per-parameter loop. Under DDP the whole module is wrapped,
    so every forward broadcasts the queue buffers from rank 0.
    """

    def __init__(self, s: Sizes):
        super().__init__()
        cfg = model_config(s)
        self.image_q, self.text_q = build_towers(cfg)
        self.image_k, self.text_k = build_towers(cfg)
        for q, k in ((self.image_q, self.image_k), (self.text_q, self.text_k)):
            k.load_state_dict(q.state_dict())
            k.requires_grad_(False)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.register_buffer("image_queue", F.normalize(torch.randn(s.embed_dim, s.queue), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(s.embed_dim, s.queue), dim=0))
        self.register_buffer("idx_queue", torch.full((1, s.queue), -100, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.queue_size = s.queue

    def forward(self, image, input_ids, attention_mask, sample_id):
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        q_img = self.image_q(image)
        q_txt = self.text_q(input_ids, attention_mask)
        with torch.no_grad():
            per_parameter_momentum(self.image_q, self.image_k, MOMENTUM)
            per_parameter_momentum(self.text_q, self.text_k, MOMENTUM)
            k_img = self.image_k(image)
            k_txt = self.text_k(input_ids, attention_mask)
            img_all = torch.cat([k_img.t(), self.image_queue.clone().detach()], dim=1)
            txt_all = torch.cat([k_txt.t(), self.text_queue.clone().detach()], dim=1)
            targets = torch.zeros(q_img.shape[0], img_all.shape[1])
            targets.fill_diagonal_(1)
        sim_i2t = q_img @ txt_all / self.temp
        sim_t2i = q_txt @ img_all / self.temp
        loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * targets).sum(1).mean()
        loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * targets).sum(1).mean()
        self._dequeue_and_enqueue(k_img, k_txt, sample_id)  # a side effect of the loss, as in ALBEF
        return (loss_i2t + loss_t2i) / 2

    @torch.no_grad()
    def _dequeue_and_enqueue(self, k_img, k_txt, ids) -> None:
        all_img, all_txt, all_ids = gather_each(k_img), gather_each(k_txt), gather_each(ids.view(-1, 1))
        n = all_img.shape[0]
        ptr = int(self.queue_ptr)
        assert self.queue_size % n == 0
        self.image_queue[:, ptr:ptr + n] = all_img.t()
        self.text_queue[:, ptr:ptr + n] = all_txt.t()
        self.idx_queue[:, ptr:ptr + n] = all_ids.t()
        self.queue_ptr[0] = (ptr + n) % self.queue_size


class RefStep:
    def __init__(self, s: Sizes):
        torch.manual_seed(0)
        self.model = RefMoCo(s)
        self.forward_model: nn.Module = self.model
        if D.world_size() > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # MoCo's way: the whole model, key towers and queue buffers included.
            self.forward_model = DDP(self.model, broadcast_buffers=True)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # Same optimizer work as ours: AdamW over the same trained tensors.
        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=1e-4, betas=(0.9, 0.98), eps=1e-6)

    def __call__(self, batch: dict[str, torch.Tensor]) -> None:
        loss = self.forward_model(**batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


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
        with torch.no_grad():
            q_img, q_txt, _ = m.query(batch["image"], batch["input_ids"], batch["attention_mask"])
            self.keys = m.compute_keys(batch["image"], batch["input_ids"], batch["attention_mask"], batch["sample_id"])
        self.q_img, self.q_txt = q_img.clone().requires_grad_(), q_txt.clone().requires_grad_()
        self.temp = torch.tensor(0.07, requires_grad=True)
        self.ids = batch["sample_id"]
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
        m, (k_img, k_txt, all_img, all_txt, all_ids) = self.model, self.keys
        neg_txt, neg_txt_ids = m._negatives(m.text_queue, all_txt, all_ids)
        neg_img, neg_img_ids = m._negatives(m.image_queue, all_img, all_ids)
        loss = (m.loss_fn(self.q_img, k_txt, neg_txt, self.temp, self.ids, neg_txt_ids)
                + m.loss_fn(self.q_txt, k_img, neg_img, self.temp, self.ids, neg_img_ids))
        loss.backward()

    def loss_ours_batch(self) -> None:
        """Our loss over the gathered batch alone: `loss_ours` minus this is what scoring
        the queue rows costs, the one thing (a) adds to the CLIP step besides the key
        towers' forward (and the EMA)."""
        m, (k_img, k_txt, all_img, all_txt, all_ids) = self.model, self.keys
        loss = (m.loss_fn(self.q_img, k_txt, all_txt, self.temp, self.ids, all_ids)
                + m.loss_fn(self.q_txt, k_img, all_img, self.temp, self.ids, all_ids))
        loss.backward()

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


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------


def interleaved(variants: dict[str, Callable[[], None]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Run each variant once per round; return per-round seconds (after warm-up).

    The order rotates by one every round, so no variant always follows the same one:
    whoever runs first after a cache-thrashing neighbour (the per-parameter EMA loop
    allocates a new copy of every weight) would otherwise always pay for it.
    """
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(warmup + rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = variants[name]
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return times


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num_i / den_i: both ran seconds apart, under the same load."""
    return statistics.median(n / d for n, d in zip(num, den))


def spread(xs: list[float]) -> float:
    """Interquartile range over the median: how noisy a figure is."""
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / statistics.median(xs)


def step_fns(steps: dict[str, Callable], s: Sizes) -> dict[str, Callable[[], None]]:
    """Closures feeding each step a fresh batch of ids (the batch tensors themselves are
    reused: data loading is measured separately)."""
    batch = make_batch(s, seed=1, first_id=D.rank() * s.batch)
    world = D.world_size()

    def bind(step: Callable) -> Callable[[], None]:
        def run() -> None:
            batch["sample_id"] += world * s.batch
            step(batch)
        return run

    return {name: bind(fn) for name, fn in steps.items()}


def save_bert_config(ours: OurStep, directory: Path) -> Path:
    """Our BERT's config (random init: config only) where OpenCLIP's HF path can read it."""
    ours.model.query.text.backbone.config.save_pretrained(directory)
    return directory


def run_single(s: Sizes, rounds: int, warmup: int) -> dict:
    a, b, d = OurStep(s, queue_on=True), OurStep(s, queue_on=False), RefStep(s)
    with tempfile.TemporaryDirectory() as tmp:
        c = OpenClipStep(s, save_bert_config(a, Path(tmp)))
    comp = Components(a, s)
    key = a.model.key
    batch_e = make_batch(s, seed=2, first_id=0)

    def key_forward() -> None:
        with torch.no_grad():
            key.image(batch_e["image"])
            key.text(batch_e["input_ids"], batch_e["attention_mask"])

    fns = step_fns({"a": a, "b": b, "c": c, "d": d}, s)
    fns["e"] = key_forward
    t = interleaved(fns, rounds, warmup)
    # Components are fast: more repetitions, interleaved among themselves.
    ct = interleaved({"ema_ours": comp.ema_ours, "ema_copy": comp.ema_copy, "ema_copy_flat": comp.ema_copy_flat,
                      "ema_loop": comp.ema_loop}, rounds * 5, warmup * 5)
    ct |= interleaved({"loss_ours": comp.loss_ours, "loss_ours_batch": comp.loss_ours_batch,
                       "loss_ref": comp.loss_ref, "loss_ref_ids": comp.loss_ref_ids}, rounds * 5, warmup * 5)
    n_params = sum(p.numel() for p in a.model.query.parameters())
    return {"steps": t, "components": ct, "ema_bytes": comp.bytes, "query_params": n_params}


# ---------------------------------------------------------------------------------------
# 2 processes
# ---------------------------------------------------------------------------------------


def dist_worker(args: argparse.Namespace) -> int:
    """Body of each torchrun rank: (a) and (b) with DDP over the query towers, (c) with
    DDP over OpenCLIP's model, (d) with DDP over everything, and the gather / broadcast
    components."""
    torch.set_num_threads(args.threads)
    D.init_distributed(device="cpu")
    s = Sizes.quick() if args.quick else Sizes()
    _register_vit(s)
    a, b, d = OurStep(s, queue_on=True, ddp=True), OurStep(s, queue_on=False, ddp=True), RefStep(s)
    with tempfile.TemporaryDirectory() as tmp:
        c = OpenClipStep(s, save_bert_config(a, Path(tmp)))
    fns = step_fns({"a": a, "b": b, "c": c, "d": d}, s)
    t = interleaved(fns, args.rounds, args.warmup)

    # Gather: ours packs both modalities and the ids into one collective.
    k = F.normalize(torch.randn(s.batch, s.embed_dim), dim=1)
    ids = torch.arange(s.batch)

    def gather_ours() -> None:
        ids_f = ids.view(torch.float32).view(-1, 2)
        D.all_gather_cat(torch.cat([k, k, ids_f], dim=1))

    def gather_ref() -> None:
        gather_each(k), gather_each(k), gather_each(ids.view(-1, 1))

    # DDP's buffer broadcast, alone: what `broadcast_buffers=True` sends each forward
    # (coalesced, as DDP does); our layout sends nothing, its twin is zero.
    bufs = list(d.model.buffers())

    def broadcast_queues() -> None:
        flat = torch._utils._flatten_dense_tensors(bufs)
        torch.distributed.broadcast(flat, src=0)
        for b, f in zip(bufs, torch._utils._unflatten_dense_tensors(flat, bufs)):
            b.copy_(f)

    ct = interleaved({"gather_ours": gather_ours, "gather_ref": gather_ref, "broadcast_queues": broadcast_queues},
                     args.rounds * 5, args.warmup * 5)
    if D.rank() == 0:
        Path(args.dist_out).write_text(json.dumps({"steps": t, "components": ct,
                                                   "broadcast_bytes": sum(b.numel() * b.element_size() for b in bufs)}))
    D.barrier()
    D.shutdown()
    return 0


def run_dist(args: argparse.Namespace) -> dict | None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "dist.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               str(Path(__file__).resolve()), "--dist-worker", "--dist-out", str(out),
               "--rounds", str(args.rounds), "--warmup", str(args.warmup), "--threads", str(args.threads)]
        if args.quick:
            cmd.append("--quick")
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        if res.returncode != 0 or not out.exists():
            print("2-process part failed:\n" + res.stdout[-2000:] + res.stderr[-2000:], file=sys.stderr)
            return None
        return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------
# Loader (the measurement of tools/bench_loader.py, one worker count, as a number)
# ---------------------------------------------------------------------------------------


def loader_samples_per_s(data: str, batch_size: int, batches: int, workers: int) -> float:
    """Steady-state samples/s of the training loader on the demo shards (built if missing)."""
    from transformers import AutoTokenizer

    from moco_mm.data import ShardSource, build_transforms, make_loader
    from moco_mm.demo_data import DemoParams, build_demo

    paths = build_demo(data)
    tokenizer = AutoTokenizer.from_pretrained(str(paths.tokenizer))
    source = ShardSource.from_spec(paths.train)
    transform = build_transforms(DemoParams().image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), train=True)
    loader = make_loader(source, batch_size=batch_size, tokenizer=tokenizer, max_length=32, transform=transform,
                         seed=0, epoch=0, workers=workers, shuffle_buffer=1000)
    n = min(batches, len(loader))
    warm = max(workers, 1)  # each worker's first batch carries its start-up
    start = time.perf_counter()
    for i, _ in enumerate(loader):
        if i + 1 == warm:
            start = time.perf_counter()
        if i + 1 == n:
            break
    return (n - warm) * batch_size / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def summarise(single: dict, dist: dict | None, loader: float | None) -> dict:
    t, ct = single["steps"], single["components"]
    e_plus_c = [c + e for c, e in zip(t["c"], t["e"])]
    res: dict = {
        "a_over_c": paired_ratio(t["a"], t["c"]),
        "b_over_c": paired_ratio(t["b"], t["c"]),
        "a_over_d": paired_ratio(t["a"], t["d"]),
        # The floor of the momentum update: one flat copy of the same bytes (the strictest).
        "ema_over_copy": paired_ratio(ct["ema_ours"], ct["ema_copy_flat"]),
        "ema_over_foreach_copy": paired_ratio(ct["ema_ours"], ct["ema_copy"]),
        "floor_ratio": paired_ratio(e_plus_c, t["c"]),
        "ema_loop_over_ours": paired_ratio(ct["ema_loop"], ct["ema_ours"]),
        # (a) adds the key towers' forward to the CLIP step: (c)+(e) is its floor. (b) has
        # no key towers: its floor is (c) itself.
        "a_over_floor": paired_ratio(t["a"], e_plus_c),
        # What scoring the queue adds (loss components, medians): the floor plus it is
        # everything the dual-queue algorithm must add to the CLIP step.
        "queue_loss_ms": 1e3 * (med(ct["loss_ours"]) - med(ct["loss_ours_batch"])),
        "a_over_floor_with_queue_loss": med(t["a"]) / (med(e_plus_c) + med(ct["loss_ours"])
                                                        - med(ct["loss_ours_batch"])),
        "loss_ours_over_ref": paired_ratio(ct["loss_ours"], ct["loss_ref"]),
        "loss_ours_over_ref_ids": paired_ratio(ct["loss_ours"], ct["loss_ref_ids"]),
        "times_ms": {k: 1e3 * med(v) for k, v in {**t, **ct}.items()},
        "spread_iqr_over_median": {k: spread(v) for k, v in {**t, **ct}.items()},
        "ema_bytes": single["ema_bytes"],
        "query_params": single["query_params"],
    }
    res["targets"] = {
        "a_over_c_within_0.05_of_floor": abs(res["a_over_c"] - res["floor_ratio"]) <= 0.05,
        "b_over_c_le_1.05": res["b_over_c"] <= 1.05,
        "a_not_slower_than_d": res["a_over_d"] <= 1.0,
        "ema_faster_than_loop": res["ema_loop_over_ours"] > 1.0,
        "ema_within_2x_copy": res["ema_over_copy"] <= 2.0,
    }
    if dist is not None:
        dt, dct = dist["steps"], dist["components"]
        res["dist"] = {
            **{f"{k}_2proc_ms": 1e3 * med(dt[k]) for k in ("a", "b", "c", "d")},
            "a_2proc_over_1proc": med(dt["a"]) / med(t["a"]),
            "b_2proc_over_1proc": med(dt["b"]) / med(t["b"]),
            "a_over_d_2proc": paired_ratio(dt["a"], dt["d"]),
            "b_over_c_2proc": paired_ratio(dt["b"], dt["c"]),
            "a_over_c_2proc": paired_ratio(dt["a"], dt["c"]),
            "gather_ours_ms": 1e3 * med(dct["gather_ours"]), "gather_ref_ms": 1e3 * med(dct["gather_ref"]),
            "gather_ref_over_ours": paired_ratio(dct["gather_ref"], dct["gather_ours"]),
            "broadcast_queues_ms": 1e3 * med(dct["broadcast_queues"]),
            "broadcast_bytes": dist["broadcast_bytes"],
        }
        res["targets"]["a_not_slower_than_d_2proc"] = res["dist"]["a_over_d_2proc"] <= 1.0
        res["targets"]["b_over_c_le_1.05_2proc"] = res["dist"]["b_over_c_2proc"] <= 1.05
        res["targets"]["one_gather_faster_than_three"] = res["dist"]["gather_ref_over_ours"] > 1.0
    if loader is not None:
        res["loader_samples_per_s"] = loader
    return res


def print_table(res: dict, s: Sizes, args: argparse.Namespace) -> None:
    ms, sp = res["times_ms"], res["spread_iqr_over_median"]
    c = ms["c"]
    print(f"towers: ViT {s.image}px/{s.patch} w{s.width} d{s.depth} + BERT w{s.width} d{s.depth} L{s.seq}; "
          f"embed {s.embed_dim}; batch {s.batch}; queue {s.queue}/modality; fp32 CPU; threads {args.threads}; "
          f"{args.rounds} timed rounds after {args.warmup} warm-up; query params {res['query_params']:,}")
    print(f"{'variant':<46}{'median ms':>10}{'IQR/med':>9}{'/ (c)':>8}")
    rows = [("(a) ours, dual queue", "a"), ("(b) ours, CLIP mode (no key towers, no queue)", "b"),
            ("(c) OpenCLIP CustomTextCLIP + ClipLoss", "c"), ("(d) MoCo/ALBEF reference style", "d"),
            ("(e) key towers no-grad forward", "e")]
    for label, k in rows:
        print(f"{label:<46}{ms[k]:>10.2f}{sp[k]:>9.2f}{ms[k] / c:>8.3f}")
    print(f"{'floor of (a) = (c)+(e)':<46}{c + ms['e']:>10.2f}{'':>9}{(c + ms['e']) / c:>8.3f}")
    q = res["queue_loss_ms"]
    print(f"{'floor + scoring the queue (loss components)':<46}{c + ms['e'] + q:>10.2f}{'':>9}"
          f"{(c + ms['e'] + q) / c:>8.3f}")
    mb = res["ema_bytes"] / 2**20
    print(f"momentum update over {mb:.1f} MiB of key parameters:")
    for label, k in (("ours: _foreach_lerp_ (+ buffer copy)", "ema_ours"),
                     ("floor: one flat copy of the same bytes", "ema_copy_flat"),
                     ("floor: _foreach_copy_ of the same tensors", "ema_copy"),
                     ("reference: per-parameter loop", "ema_loop")):
        print(f"  {label:<44}{ms[k]:>10.3f}{sp[k]:>9.2f}{ms[k] / ms['ema_copy_flat']:>8.2f}x flat copy")
    print(f"queue loss, both directions, fwd+bwd, {s.queue} queue rows + batch:")
    for label, k in (("ours: queue_infonce, id-masked", "loss_ours"),
                     ("ours over the gathered batch only", "loss_ours_batch"),
                     ("reference: ALBEF retrieval, id-aware targets", "loss_ref_ids"),
                     ("reference: ALBEF pre-training, ids ignored", "loss_ref")):
        print(f"  {label:<44}{ms[k]:>10.3f}{sp[k]:>9.2f}")
    print("ratios (median of per-round ratios):")
    for k in ("a_over_c", "b_over_c", "a_over_d", "floor_ratio", "a_over_floor", "a_over_floor_with_queue_loss",
              "ema_over_copy",
              "ema_over_foreach_copy", "ema_loop_over_ours", "loss_ours_over_ref_ids", "loss_ours_over_ref"):
        print(f"  {k:<30}{res[k]:.3f}")
    if "dist" in res:
        d = res["dist"]
        print("2 processes (gloo, same per-rank batch):")
        print(f"  (a) {d['a_2proc_ms']:.2f} ms = {d['a_2proc_over_1proc']:.3f}x 1 process; "
              f"(d) with DDP over the whole model {d['d_2proc_ms']:.2f} ms; (a)/(d) {d['a_over_d_2proc']:.3f}; "
              f"(a)/(c) {d['a_over_c_2proc']:.3f}")
        print(f"  (b) {d['b_2proc_ms']:.2f} ms = {d['b_2proc_over_1proc']:.3f}x 1 process; "
              f"(c) OpenCLIP under DDP {d['c_2proc_ms']:.2f} ms; (b)/(c) {d['b_over_c_2proc']:.3f}")
        print(f"  gather: ours (one collective) {d['gather_ours_ms']:.3f} ms, reference (one per modality + ids) "
              f"{d['gather_ref_ms']:.3f} ms, ratio {d['gather_ref_over_ours']:.2f}")
        print(f"  DDP queue-buffer broadcast per step {d['broadcast_queues_ms']:.3f} ms "
              f"({d['broadcast_bytes'] / 2**20:.2f} MiB); ours broadcasts nothing")
    if "loader_samples_per_s" in res:
        print(f"loader (demo shards, steady, workers={args.loader_workers}): "
              f"{res['loader_samples_per_s']:.0f} samples/s")
    print("targets: " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in res["targets"].items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="thin towers and few rounds (smoke test, < 60 s)")
    ap.add_argument("--json", metavar="OUT", help="write the ratios and medians here")
    ap.add_argument("--no-dist", action="store_true", help="skip the 2-process part")
    ap.add_argument("--no-loader", action="store_true", help="skip the loader figure")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process, same for every variant")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 30, quick 6)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 4, quick 2)")
    ap.add_argument("--data", default="data/demo", help="demo shards for the loader figure")
    ap.add_argument("--loader-workers", type=int, default=0)
    ap.add_argument("--dist-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dist-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rounds is None:
        args.rounds = 6 if args.quick else 30
    if args.warmup is None:
        args.warmup = 2 if args.quick else 4
    if args.dist_worker:
        return dist_worker(args)

    torch.set_num_threads(args.threads)
    s = Sizes.quick() if args.quick else Sizes()
    _register_vit(s)
    single = run_single(s, args.rounds, args.warmup)
    dist = None if args.no_dist else run_dist(args)
    loader = None
    if not args.no_loader:
        loader = loader_samples_per_s(str(ROOT / args.data) if not os.path.isabs(args.data) else args.data,
                                      batch_size=32, batches=8 if args.quick else 40, workers=args.loader_workers)
    res = summarise(single, dist, loader)
    res["sizes"] = asdict(s)
    res["threads"], res["rounds"], res["warmup"] = args.threads, args.rounds, args.warmup
    print_table(res, s, args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
