"""Image and text towers: a timm or Hugging Face backbone, pooling, projection, L2 norm.

    ImageTower(image [B,3,H,W])                     -> [B, embed_dim], unit rows
    TextTower(input_ids [B,L], attention_mask [B,L]) -> [B, embed_dim], unit rows

Nothing here downloads unless the config asks for pretrained hub weights: image towers
are built by timm name with random init, a local weights file, or the hub; text towers
from a Hugging Face model type (`bert`), a local directory, or a hub name. Towers that
start from a CLIP (`model.init_from`) are built in `moco_mm.model.clip_towers`.
"""

from __future__ import annotations

import os
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from moco_mm.config import ConfigError, ImageTowerConfig, ModelConfig, TextTowerConfig

# `model.text.tokenizer` value: OpenCLIP's CLIP BPE tokenizer, rebuilt as a Hugging Face one.
OPEN_CLIP_TOKENIZER = "open_clip"


class Projection(nn.Module):
    """Linear or 2-layer MLP head from a tower's width to the shared embedding dim."""

    def __init__(self, in_dim: int, out_dim: int, kind: str = "linear", hidden_dim: int = 0):
        super().__init__()
        if kind == "linear":
            self.net = nn.Linear(in_dim, out_dim)
        elif kind == "mlp":
            hidden = hidden_dim or in_dim
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        else:
            raise ConfigError(f"model.head: {kind!r} is not allowed; choose one of linear, mlp")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def has_batchnorm(module: nn.Module) -> bool:
    """True when batch statistics couple the samples of a batch (needs Shuffle-BN)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def tower_blocks(tower: nn.Module) -> list[nn.Module]:
    """A tower's repeated blocks, in forward order: the children of each outermost
    nn.ModuleList / nn.Sequential whose (2 or more) children are all of one class and all
    hold parameters (timm ViT `blocks`, BERT `encoder.layer`, OpenCLIP `resblocks`, a
    ResNet stage's bottlenecks). Nothing inside a block is searched. `run.parallel: fsdp`
    shards each one as its own unit and the memory planner costs them so (the same rule
    for both); empty for a tower without such a list (resnet10t: one block per stage)."""
    blocks: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        children = list(module.children())
        if (isinstance(module, (nn.ModuleList, nn.Sequential)) and len(children) >= 2
                and len({type(c) for c in children}) == 1
                and all(any(True for _ in c.parameters()) for c in children)):
            blocks.extend(children)
            return
        for child in children:
            visit(child)

    visit(tower)
    return blocks


def keep_bn_stats_in_recompute(module: nn.Module) -> None:
    """Make BatchNorm layers of a checkpointed tower update their running statistics once.

    Gradient checkpointing runs a block's forward again inside backward; in train mode
    BatchNorm would then update its running mean/var (and batch count) a second time,
    doubling the effective momentum. A forward that runs inside a backward pass is such a
    recomputation (an ordinary forward never is): these hooks put the statistics back
    after it. Its outputs are unaffected (train-mode BatchNorm normalises with the batch's
    own statistics).
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            m.register_forward_pre_hook(_stash_bn_stats)
            m.register_forward_hook(_restore_bn_stats)


def _in_backward() -> bool:
    # The autograd engine's current graph task: -1 outside backward.
    return torch._C._current_graph_task_id() != -1


def _stash_bn_stats(m: nn.Module, _args) -> None:
    if m.training and _in_backward():
        m._stats_before_recompute = [b.detach().clone() for b in m.buffers()]


@torch.no_grad()
def _restore_bn_stats(m: nn.Module, _args, _out) -> None:
    saved = m.__dict__.pop("_stats_before_recompute", None)
    if saved is not None:
        for b, v in zip(m.buffers(), saved):
            b.copy_(v)


def _freeze_all_but_last(groups: list[list[nn.Parameter]], n: int) -> None:
    """Freeze every parameter group but the last `n` (n = -1: train everything)."""
    if n < 0:
        return
    for group in groups[: max(len(groups) - n, 0)]:
        for p in group:
            p.requires_grad_(False)


# ---------------------------------------------------------------------------------------
# Image
# ---------------------------------------------------------------------------------------


class ImageTower(nn.Module):
    """backbone (pooled features, or a CLIP's projected embedding) -> head -> unit rows.

    Built by `timm_image_tower` (a timm backbone + our Projection) or, from a CLIP, by
    `moco_mm.model.clip_towers` (the CLIP's own vision module whole, head = Identity).
    `image_size`, `mean`, `std` and `interpolation` are the preprocessing the tower
    expects; the data pipeline and the export read them.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, image_size: int, mean, std,
                 interpolation: str = "bilinear"):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.mean = tuple(float(x) for x in mean)
        self.std = tuple(float(x) for x in std)
        self.image_size = image_size
        self.interpolation = interpolation
        self.channels_last = False

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image: uint8 [B,3,H,W] (normalised here, on the device) or float32 already
        normalised -> [B, embed_dim] unit rows."""
        if image.dtype == torch.uint8:
            image = self.normalize(image)
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return F.normalize(self.head(self.backbone(image)), dim=-1)

    def use_channels_last(self) -> None:
        """Keep convolution weights and inputs channels-last (NHWC): what cuDNN's tensor-core
        convolutions run natively; NCHW would be transposed around every one of them."""
        self.backbone.to(memory_format=torch.channels_last)
        self.channels_last = True

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,H,W] -> float32 scaled to [0, 1] and normalised by the tower's mean and
        std, with torchvision's own functions: bit-identical to normalising in the loader.
        Images cross the loader, the host-to-device copy and Shuffle-BN's exchange as uint8
        (a quarter of float32's bytes) and become floats here."""
        from torchvision.transforms.v2 import functional as TF

        x = TF.to_dtype(image, torch.float32, scale=True)
        return TF.normalize(x, list(self.mean), list(self.std))


def timm_image_tower(cfg: ImageTowerConfig, embed_dim: int, head: str = "linear",
                     head_hidden_dim: int = 0) -> ImageTower:
    """A timm backbone (classifier removed) + Projection to embed_dim; timm's mean/std."""
    backbone = build_timm_backbone(cfg)
    pcfg = getattr(backbone, "pretrained_cfg", {}) or {}
    return ImageTower(backbone, Projection(backbone.num_features, embed_dim, head, head_hidden_dim),
                      cfg.image_size, pcfg.get("mean", (0.485, 0.456, 0.406)), pcfg.get("std", (0.229, 0.224, 0.225)))


def build_timm_backbone(cfg: ImageTowerConfig) -> nn.Module:
    """timm model with its classifier removed (`num_classes=0`): pooled features out."""
    if not timm.is_model(cfg.name):
        raise ConfigError(f"model.image.name: unknown timm model {cfg.name!r} (see timm.list_models())")
    kwargs = dict(cfg.kwargs)
    # Models with a fixed input size (ViT position embeddings) must be told the size.
    if "img_size" not in kwargs and _takes_img_size(cfg.name):
        kwargs["img_size"] = cfg.image_size
    pretrained = cfg.pretrained
    create_kwargs = dict(num_classes=0, **kwargs)
    if isinstance(pretrained, str):
        path = Path(pretrained)
        if not path.is_file():
            raise ConfigError(f"model.image.pretrained: weights file {pretrained!r} does not exist")
        create_kwargs["pretrained"] = True
        # custom_load: only .npz (JAX) files need a model's own loader; older timm releases
        # would otherwise apply a ViT's npz loader to a .pth/.safetensors file.
        create_kwargs["pretrained_cfg_overlay"] = dict(file=str(path), custom_load=path.suffix == ".npz")
    else:
        create_kwargs["pretrained"] = bool(pretrained)
    try:
        model = timm.create_model(cfg.name, **create_kwargs)
    except (TypeError, AssertionError, ValueError) as e:
        # A width override the model does not take, or widths that do not fit together
        # (a ViT embed_dim that num_heads does not divide).
        raise ConfigError(f"model.image.kwargs: {cfg.name} rejected {kwargs}: {e!r}") from e
    if cfg.grad_checkpointing:
        # Non-reentrant whatever TIMM_REENTRANT_CKPT says: reentrant checkpointing gives no
        # gradient to trainable blocks after frozen ones (inputs without requires_grad).
        from timm.layers import set_reentrant_ckpt

        set_reentrant_ckpt(False)
        model.set_grad_checkpointing(True)
        keep_bn_stats_in_recompute(model)
    if cfg.trainable_blocks >= 0:
        from timm.models import group_parameters

        named = dict(model.named_parameters())
        groups = group_parameters(model, model.group_matcher(coarse=False))
        # timm orders groups stem -> blocks -> final norm (merged into the last block).
        _freeze_all_but_last([[named[n] for n in names] for names in groups.values()], cfg.trainable_blocks)
    return model


def _takes_img_size(name: str) -> bool:
    return any(name.startswith(p) for p in ("vit", "deit", "eva", "beit", "swin", "convit", "cait", "xcit"))


# ---------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------


class TextTower(nn.Module):
    """backbone -> pooling -> head -> unit rows.

    pooling "cls" / "mean": the backbone is a Hugging Face encoder and pooling reads its
    last hidden state (mean over real tokens only); "none": the backbone pools and projects
    itself (a CLIP's own text module, `moco_mm.model.clip_towers`), head = Identity.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, pooling: str, ready_mask: bool = False):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self._ready_mask = ready_mask
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "none":
            return F.normalize(self.head(self.backbone(input_ids, attention_mask)), dim=-1)
        # The mask always goes in: attending to padding changes the embedding with length.
        mask = attention_mask
        if self._ready_mask:
            # A ready [B, 1, 1, L] boolean mask is used as it is. Given the 2-D mask,
            # transformers checks on the host whether any token is padded (`mask.all()`) to
            # drop it: a device sync on every forward. Same numbers (tests/test_model.py).
            mask = attention_mask[:, None, None, :].bool()
        hidden = self.backbone(input_ids=input_ids, attention_mask=mask).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:  # mean over real tokens only
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        return F.normalize(self.head(pooled), dim=-1)


def hf_text_tower(cfg: TextTowerConfig, embed_dim: int, head: str = "linear", head_hidden_dim: int = 0,
                  vocab_size: int | None = None) -> TextTower:
    """A Hugging Face encoder (no pooler) + our pooling + Projection to embed_dim."""
    backbone = build_hf_backbone(cfg, vocab_size)
    return TextTower(backbone, Projection(backbone.config.hidden_size, embed_dim, head, head_hidden_dim),
                     cfg.pooling, _takes_ready_sdpa_mask(backbone))


def _takes_ready_sdpa_mask(model: nn.Module) -> bool:
    """Does this backbone take a prepared 4-D boolean mask as it is? transformers 5's
    attention-mask utilities do (4.x's BERT rejects a 4-D mask); only the SDPA attention
    reads a boolean mask (eager attention adds the mask to its scores)."""
    try:
        import transformers.masking_utils  # noqa: F401 (transformers >= 5)
    except ImportError:
        return False
    return getattr(model.config, "_attn_implementation", None) == "sdpa"


def _is_local(name: str) -> bool:
    return os.path.isdir(name)


def build_hf_backbone(cfg: TextTowerConfig, vocab_size: int | None = None) -> nn.Module:
    """A Hugging Face encoder without its pooler (we pool ourselves; an unused pooler
    would leave parameters without gradients, which DDP rejects)."""
    from transformers import CONFIG_MAPPING, AutoConfig, AutoModel

    overrides = dict(cfg.overrides)
    if vocab_size is not None and "vocab_size" not in overrides:
        overrides["vocab_size"] = vocab_size
    if cfg.pretrained:
        if overrides.keys() - {"vocab_size"}:
            raise ConfigError("model.text.overrides: width overrides need pretrained: false")
        model = AutoModel.from_pretrained(cfg.name, add_pooling_layer=False)
    else:
        if cfg.name in CONFIG_MAPPING:  # a model type such as "bert": built locally
            hf_config = AutoConfig.for_model(cfg.name)
        elif _is_local(cfg.name):
            hf_config = AutoConfig.from_pretrained(cfg.name)
        else:
            try:
                hf_config = AutoConfig.from_pretrained(cfg.name)
            except OSError as e:
                raise ConfigError(
                    f"model.text.name: {cfg.name!r} is neither a Hugging Face model type, a local "
                    f"directory, nor a reachable hub name: {e}"
                ) from e
        for key, value in overrides.items():
            if not hasattr(hf_config, key):
                raise ConfigError(f"model.text.overrides.{key}: not a field of {type(hf_config).__name__}")
            setattr(hf_config, key, value)
        if hf_config.hidden_size % hf_config.num_attention_heads:
            raise ConfigError(
                f"model.text.overrides: hidden_size {hf_config.hidden_size} is not a multiple of "
                f"num_attention_heads {hf_config.num_attention_heads}"
            )
        model = AutoModel.from_config(hf_config, add_pooling_layer=False)
    if cfg.grad_checkpointing:
        # Non-reentrant, explicitly: transformers 4.x defaults to reentrant checkpointing,
        # which gives no gradient to trainable blocks after frozen ones. transformers 5
        # renamed the method (the old name warns); keep working with either.
        no_reentrant = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=no_reentrant)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=no_reentrant)
        keep_bn_stats_in_recompute(model)
    if cfg.trainable_blocks >= 0:
        layers = _hf_layers(model)
        groups = [list(getattr(model, "embeddings", nn.Module()).parameters())]
        groups += [list(layer.parameters()) for layer in layers]
        _freeze_all_but_last(groups, cfg.trainable_blocks)
    return model


def _hf_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer's block list: the ModuleList as long as num_hidden_layers."""
    n = model.config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ConfigError(f"model.text.trainable_blocks: cannot find the {n} blocks of {type(model).__name__}")


def load_tokenizer(cfg: TextTowerConfig):
    """The text tower's tokenizer (a local directory in tests and the demo); `open_clip`:
    OpenCLIP's own CLIP tokenizer (its bundled BPE) as a Hugging Face tokenizer."""
    from transformers import AutoTokenizer

    name = cfg.tokenizer or cfg.name
    if name == OPEN_CLIP_TOKENIZER:
        from moco_mm.model.clip_towers import open_clip_tokenizer

        return open_clip_tokenizer()
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.text.tokenizer: cannot load tokenizer {name!r}: {e}") from e


def build_towers(cfg: ModelConfig, vocab_size: int | None = None,
                 load_weights: bool = True) -> tuple[ImageTower, TextTower]:
    """Both query towers of `cfg`: from `model.init_from` (a CLIP; `load_weights=False` builds
    its structure only) or from the timm / Hugging Face tower configs."""
    if cfg.init_from:
        from moco_mm.model.clip_towers import clip_towers

        image, text, _ = clip_towers(cfg, load_weights=load_weights)
        return image, text
    return (
        timm_image_tower(cfg.image, cfg.embed_dim, cfg.head, cfg.head_hidden_dim),
        hf_text_tower(cfg.text, cfg.embed_dim, cfg.head, cfg.head_hidden_dim, vocab_size),
    )
