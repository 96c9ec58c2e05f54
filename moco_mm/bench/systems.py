"""The systems the step benchmark compares, on the same towers and batch:
(a)/(b) our step (dual queue / CLIP mode), (c) OpenCLIP's CustomTextCLIP + ClipLoss,
(d) the MoCo/ALBEF reference style written here (per-parameter momentum loop, one gather
per modality, queues as buffers of the DDP-wrapped model)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moco_mm import distributed as D
from moco_mm.config import Config, ImageTowerConfig, ModelConfig, QueueConfig, TextTowerConfig
from moco_mm.model import DualQueueMoCo, build_towers
from moco_mm.train import TrainStep

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
    """Our trainer's step (`moco_mm.train.TrainStep`, what `Trainer.train_step` runs) on a
    fixed batch. `queue_on` false: the CLIP mode (no key towers, no queue). `ddp`: the query
    towers under DDP as the trainer wraps them (needs a process group)."""

    def __init__(self, s: Sizes, queue_on: bool, ddp: bool = False):
        torch.manual_seed(0)
        cfg = Config(model=model_config(s), queue=QueueConfig(enabled=queue_on, size=s.queue))
        cfg.model.momentum_encoder = queue_on
        cfg.model.momentum_schedule = "constant"
        self.model = DualQueueMoCo(cfg.model, cfg.queue)
        self.train_step = TrainStep(self.model, cfg, torch.device("cpu"), D.world_size() if ddp else 1, 0)
        self.step = 0
        if queue_on:
            # Time the steady state: a full queue (it fills after queue/global-batch steps).
            keys = F.normalize(torch.randn(s.queue, s.embed_dim), dim=1)
            ids = torch.arange(10_000_000, 10_000_000 + s.queue)
            self.model.image_queue.enqueue(keys, ids)
            self.model.text_queue.enqueue(keys.flip(0), ids)

    def __call__(self, batch: dict[str, torch.Tensor]) -> None:
        self.train_step(self.step, [batch], accum=1)
        self.step += 1


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
            self.forward_model = DDP(self.model, **D.ddp_buffer_sync(True))
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
