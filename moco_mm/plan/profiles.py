"""Tower and model profiles: the planner's batch-independent facts, cached per tower.

    tower_profile(kind, model_cfg, autocast_dtype, vocab) -> TowerProfile   (traced; cached)
    profile_model(cfg) -> ModelProfile                                         (both towers + weights)
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass

import torch
from torch import nn

from moco_mm.config import Config, ConfigError, ModelConfig
from moco_mm.model.losses import learns_temperature
from moco_mm.model.towers import tower_blocks
from moco_mm.plan.trace import _F32, _I64, TowerProfile, _fake_mode, _profile_fake_tower


@dataclass(frozen=True)
class ModelProfile:
    """Weights and per-tower activation profiles of one model config at one precision.

    `param_bytes_query` counts the query towers' parameters and buffers (and the
    temperature); `param_bytes_key` the key copies'; `trainable_bytes` the fp32 bytes of
    the parameters the optimizer sees (gradients, each AdamW state, DDP buckets).
    """

    precision: str  # "bf16" | "fp32"
    vocab_size: int
    param_bytes_query: int
    param_bytes_key: int
    trainable_bytes: int
    n_params_query: int
    n_trainable: int
    image: TowerProfile
    text: TowerProfile


def autocast_dtype_for(cfg: Config) -> torch.dtype | None:
    """The step's autocast dtype on a GPU: `auto` means bf16 there (the planner plans for CUDA)."""
    return None if cfg.run.precision == "fp32" else torch.bfloat16


def _offline_model_config(m: ModelConfig) -> ModelConfig:
    """Same architecture with nothing to load: weights are never needed to plan."""
    m = copy.deepcopy(m)
    m.image.pretrained = False
    m.text.pretrained = False
    return m


def default_vocab_size(cfg: Config) -> tuple[int, str]:
    """The text tower's vocabulary as the trainer will build it, and where it came from.

    The trainer passes `len(tokenizer)`; without the tokenizer at hand, an explicit
    `overrides.vocab_size` or the Hugging Face config's default stands in.
    """
    import os

    if cfg.model.init_from:  # the CLIP's own vocabulary
        from moco_mm.model.clip_towers import resolve_init

        src = resolve_init(cfg.model, need_weights=False)
        return src.vocab_size, f"the text config of {src.where}"
    t = cfg.model.text
    if "vocab_size" in t.overrides:
        return int(t.overrides["vocab_size"]), "model.text.overrides.vocab_size"
    tokenizer = t.tokenizer or t.name
    if os.path.isdir(tokenizer):  # only a local tokenizer: planning never goes online
        try:
            from moco_mm.model.towers import load_tokenizer

            return len(load_tokenizer(t)), f"tokenizer {tokenizer}"
        except (ConfigError, OSError, ValueError):
            pass
    from transformers import CONFIG_MAPPING, AutoConfig

    if t.name in CONFIG_MAPPING:
        return int(AutoConfig.for_model(t.name).vocab_size), f"default of Hugging Face '{t.name}' (tokenizer not found)"
    return int(AutoConfig.from_pretrained(t.name).vocab_size), f"config of {t.name}"


def _param_bytes(module: nn.Module, trainable_only: bool = False) -> tuple[int, int]:
    """(bytes, count) of parameters (+ buffers unless trainable_only), fp32 masters."""
    n_bytes = n = 0
    for p in module.parameters():
        if trainable_only and not p.requires_grad:
            continue
        n += p.numel()
        n_bytes += p.numel() * (4 if trainable_only else p.element_size())
    if not trainable_only:
        n_bytes += sum(b.numel() * b.element_size() for b in module.buffers())
    return n_bytes, n


def _fsdp_units(tower: nn.Module) -> dict[str, int]:
    """Parameter counts of the tower's FSDP units: {n_blocks, largest_block_params,
    root_params}; the root unit holds every parameter in no block."""
    blocks = tower_blocks(tower)
    in_blocks = {id(p) for blk in blocks for p in blk.parameters()}
    sizes = [sum(p.numel() for p in blk.parameters()) for blk in blocks]
    return {"n_blocks": len(blocks), "largest_block_params": max(sizes, default=0),
            "root_params": sum(p.numel() for p in tower.parameters() if id(p) not in in_blocks)}


# Bump when the tracing changes what it measures: cached profiles then stop matching.
# 3: autocast's weight copies and the FSDP units are recorded.
PROFILE_VERSION = 3

_TOWERS: dict[str, TowerProfile] = {}


def tower_profile_key(kind: str, m: ModelConfig, autocast_dtype: torch.dtype | None, vocab_size: int,
                      depth_extrapolation: bool = True) -> str:
    """Short stable id of what a tower profile depends on in our code and config: the
    tower's config, the head, the precision, the vocabulary, the method and the tracer's
    version. Library versions are deliberately not in it: a newer timm or transformers
    usually saves the same tensors, and a test re-traces the shipped towers and compares
    the numbers (tests/tower_profiles.py), which catches the releases that do not."""
    import hashlib

    m = _offline_model_config(m)
    tower_cfg = m.image if kind == "image" else m.text
    # A CLIP start's towers are the source's architecture (its name joins the key only
    # then, so the keys of every other tower stay as they were).
    blob = json.dumps([PROFILE_VERSION, kind, dataclasses.asdict(tower_cfg), m.embed_dim, m.head,
                       m.head_hidden_dim, vocab_size if kind == "text" else None, str(autocast_dtype),
                       depth_extrapolation] + ([m.init_from] if m.init_from else []),
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def register_tower_profile(key: str, profile: TowerProfile | dict) -> None:
    """Seed the in-process cache (e.g. with profiles traced earlier: `TowerProfile.to_dict`)."""
    _TOWERS[key] = profile if isinstance(profile, TowerProfile) else TowerProfile.from_dict(profile)


def tower_profile(kind: str, m: ModelConfig, autocast_dtype: torch.dtype | None, vocab_size: int,
                  depth_extrapolation: bool = True) -> TowerProfile:
    """Profile the `kind` ("image" | "text") tower of model config `m` (cached per tower).

    Built on the meta device (no weights, no download), traced with fake tensors.
    """
    from moco_mm.model.towers import build_towers, has_batchnorm, hf_text_tower, timm_image_tower

    key = tower_profile_key(kind, m, autocast_dtype, vocab_size, depth_extrapolation)
    if key in _TOWERS:
        return _TOWERS[key]
    m = _offline_model_config(m)
    try:
        with torch.device("meta"):
            if m.init_from:  # a CLIP's own towers, structure only
                tower = build_towers(m, load_weights=False)[0 if kind == "image" else 1]
            elif kind == "image":
                tower = timm_image_tower(m.image, m.embed_dim, m.head, m.head_hidden_dim)
            else:
                tower = hf_text_tower(m.text, m.embed_dim, m.head, m.head_hidden_dim, vocab_size)
    except ConfigError:
        raise
    except Exception as e:  # a model whose constructor computes with tensor values
        name = m.image.name if kind == "image" else m.text.name
        raise ConfigError(f"model.{kind}.name: cannot build {name!r} without weights for planning: {e!r}") from e
    weight_bytes, n_params = _param_bytes(tower)
    trainable_bytes, n_trainable = _param_bytes(tower, trainable_only=True)
    buffer_bytes = sum(b.numel() * b.element_size() for b in tower.buffers())
    units = _fsdp_units(tower)
    if kind == "image":
        size = m.image.image_size

        def make_inputs(b: int) -> tuple:
            # uint8, as the loader hands them over: the tower normalises to float32 itself
            # (that float copy is an activation the trace sees).
            return (torch.empty(b, 3, size, size, dtype=torch.uint8),)

        input_bytes = 3 * size * size
    else:
        length = m.text.max_length

        def make_inputs(b: int) -> tuple:
            return torch.zeros(b, length, dtype=torch.long), torch.ones(b, length, dtype=torch.long)

        input_bytes = 2 * length * _I64 + 4 * _I64  # input_ids + attention_mask + sample_id + 3 fingerprints
    with _fake_mode():
        tower = tower.to_empty(device="cpu")
        fits, method = _profile_fake_tower(tower, make_inputs, autocast_dtype, depth_extrapolation)
    profile = TowerProfile(**fits, input_bytes_per_sample=input_bytes, has_batchnorm=has_batchnorm(tower),
                           method=method, weight_bytes=weight_bytes, n_params=n_params,
                           trainable_bytes=trainable_bytes, n_trainable=n_trainable, buffer_bytes=buffer_bytes,
                           **units)
    _TOWERS[key] = profile
    return profile


def profile_model(cfg: Config, vocab_size: int | None = None, depth_extrapolation: bool = True) -> ModelProfile:
    """Both towers' profiles and the weights of the whole model (towers cached).

    Costs seconds, allocates no tensor memory, downloads nothing.
    """
    if vocab_size is None:
        vocab_size = default_vocab_size(cfg)[0]
    dtype = autocast_dtype_for(cfg)
    image = tower_profile("image", cfg.model, dtype, vocab_size, depth_extrapolation)
    text = tower_profile("text", cfg.model, dtype, vocab_size, depth_extrapolation)
    temperature = _F32  # QueryTowers.log_temperature: a parameter if learnt, else a buffer
    learnt = 1 if learns_temperature(cfg.model.loss, cfg.model.learn_temperature) else 0
    return ModelProfile(
        precision="fp32" if dtype is None else "bf16",
        vocab_size=vocab_size,
        param_bytes_query=image.weight_bytes + text.weight_bytes + temperature,
        param_bytes_key=image.weight_bytes + text.weight_bytes if cfg.model.momentum_encoder else 0,
        trainable_bytes=image.trainable_bytes + text.trainable_bytes + learnt * _F32,
        n_params_query=image.n_params + text.n_params + learnt,
        n_trainable=image.n_trainable + text.n_trainable + learnt,
        image=image,
        text=text,
    )
