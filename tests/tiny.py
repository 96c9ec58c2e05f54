"""Tiny random-init towers shared by the tests (a ViT and a BERT a few layers deep)."""

from __future__ import annotations

import torch

from moco_mm.config import ImageTowerConfig, ModelConfig, QueueConfig, TextTowerConfig

VOCAB = 120
IMAGE = 32
SEQ = 12


def tiny_model_config(**over) -> ModelConfig:
    image = ImageTowerConfig(
        name="vit_tiny_patch16_224", image_size=IMAGE,
        kwargs=dict(patch_size=8, depth=2, embed_dim=64, num_heads=2),
    )
    text = TextTowerConfig(
        name="bert",
        overrides=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64,
                       # no dropout: the tests compare forwards across processes
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    )
    cfg = ModelConfig(image=image, text=text, embed_dim=32)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def tiny_bn_model_config(**over) -> ModelConfig:
    """Same text tower, a BatchNorm image tower (exercises Shuffle-BN and buffer copies)."""
    cfg = tiny_model_config(**over)
    cfg.image = ImageTowerConfig(name="resnet10t", image_size=IMAGE)
    return cfg


def tiny_batch(batch: int, seed: int, first_id: int = 0) -> dict[str, torch.Tensor]:
    """A deterministic batch; rows padded to different lengths so masks matter."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, SEQ), generator=g)
    lengths = torch.randint(3, SEQ + 1, (batch,), generator=g)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    return {
        "image": torch.randn(batch, 3, IMAGE, IMAGE, generator=g),
        "input_ids": ids * mask,
        "attention_mask": mask,
        "sample_id": torch.arange(first_id, first_id + batch, dtype=torch.long),
    }


def queue_config(size: int = 64, **over) -> QueueConfig:
    return QueueConfig(size=size, **over)
