"""Towers that start from a CLIP (`model.init_from`): OpenCLIP and Hugging Face weights in.

    src = resolve_source(m)                        # reads configs only: kind, arch, weights
    apply_source(m, src)                           # embed_dim, image_size, tokenizer -> config
    image, text, log_t = clip_towers(m)            # towers with the CLIP's weights, -log(logit_scale)

The CLIP's own modules are kept whole, not re-expressed in timm or BERT terms: OpenCLIP's
`visual` (ViT, ModifiedResNet or its timm wrapper) and its text transformer (token and
position embeddings, causal blocks, final norm, end-of-text pooling and projection), or a
Hugging Face model's vision/text model with its projection (`CLIPModel`,
`VisionTextDualEncoderModel`). Our towers add only the L2 normalisation, so at step 0 the
embeddings are the source's own. The key towers are copies of these (DualQueueMoCo), so
they start seeded too; the learnt temperature starts at 1 / exp(logit_scale).

Supported exactly or refused (with the reason): an OpenCLIP text tower must be the
causal CLIP transformer with CLIP's BPE tokenizer (pooling at the end-of-text token or the
first token); our tokenizer pads with <|endoftext|> where OpenCLIP pads with 0, which
changes nothing only because the causal mask keeps every token before the end of text
blind to what follows it. Bidirectional / CLS-token text towers (CoCa, SigLIP) and
Hugging Face text towers inside OpenCLIP are refused, as is a logit bias (sigmoid loss).

Nothing downloads: an `hf-hub:` name is used only when the local Hugging Face cache holds it.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from moco_mm.config import ConfigError, ModelConfig
from moco_mm.model.towers import OPEN_CLIP_TOKENIZER, ImageTower, TextTower, _freeze_all_but_last

log = logging.getLogger(__name__)

__all__ = ["ClipSource", "resolve_source", "resolve_init", "apply_source", "clip_towers", "build_clip_model",
           "towers_from_clip_model", "open_clip_tokenizer", "OpenClipText", "HFClipVision", "HFClipText"]

KEY = "model.init_from"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HF_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL resample codes in a preprocessor_config.json
HF_KINDS = ("clip", "vision-text-dual-encoder")


def _open_clip():
    try:
        import open_clip
    except ImportError as e:
        raise ConfigError(f"{KEY}: an OpenCLIP source needs open-clip-torch (pip install 'moco-mm[bench]'): {e}") from e
    return open_clip


# ---------------------------------------------------------------------------------------
# The source: what init_from names, read from configs only
# ---------------------------------------------------------------------------------------


@dataclass
class ClipSource:
    """A CLIP to start from. `arch` rebuilds its structure without weights: for OpenCLIP
    {"model_cfg": ...} (what open_clip_config.json holds), for Hugging Face the model's
    config dict. `weights`: the OpenCLIP weights file, or the Hugging Face directory ("" in
    an export, where the weights are ours). `preprocess`: mean, std, interpolation."""

    kind: str  # "open_clip" | "hf"
    arch: dict
    weights: str
    tokenizer: str  # OPEN_CLIP_TOKENIZER or a tokenizer directory
    preprocess: dict = field(default_factory=dict)
    where: str = ""

    @property
    def embed_dim(self) -> int:
        if self.kind == "open_clip":
            return int(self.arch["model_cfg"]["embed_dim"])
        return int(self.arch.get("projection_dim", 512))

    @property
    def image_size(self) -> int:
        if self.kind == "open_clip":
            size = self.arch["model_cfg"]["vision_cfg"].get("image_size", 224)
        else:
            size = self.arch["vision_config"].get("image_size", 224)
        if isinstance(size, (list, tuple)):
            if len(set(size)) != 1:
                raise ConfigError(f"{KEY}: {self.where} has a non-square input {size}; our crop is square")
            size = size[0]
        return int(size)

    @property
    def vocab_size(self) -> int:
        if self.kind == "open_clip":
            return int(self.arch["model_cfg"]["text_cfg"].get("vocab_size", 49408))
        return int(self.arch["text_config"].get("vocab_size", 49408))

    @property
    def context_length(self) -> int:
        if self.kind == "open_clip":
            return int(self.arch["model_cfg"]["text_cfg"].get("context_length", 77))
        return int(self.arch["text_config"].get("max_position_embeddings", 512))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "arch": self.arch, "preprocess": self.preprocess}

    @classmethod
    def from_dict(cls, d: dict, where: str, tokenizer: str) -> "ClipSource":
        return cls(d["kind"], d["arch"], "", tokenizer, dict(d.get("preprocess", {})), where)


def resolve_source(init_from: str, init_checkpoint: str = "", need_weights: bool = True) -> ClipSource:
    """Parse `model.init_from` and read the source's configuration (no weights; with
    `need_weights=False`, e.g. to plan memory, a missing open_clip weights file is fine)."""
    if init_from.startswith("open_clip:"):
        name = init_from[len("open_clip:"):]
        if os.path.isdir(name):
            return _from_dir(Path(name), init_from)
        oc = _open_clip()
        model_cfg = oc.get_model_config(name)
        if model_cfg is None:
            import difflib

            close = difflib.get_close_matches(name, oc.list_models(), n=3)
            raise ConfigError(f"{KEY}: {name!r} is not an OpenCLIP model name"
                              + (f" (did you mean {', '.join(close)}?)" if close else " (see open_clip.list_models())"))
        if need_weights and not os.path.isfile(init_checkpoint):
            raise ConfigError(f"model.init_checkpoint: weights file {init_checkpoint!r} does not exist")
        return _open_clip_source({"model_cfg": model_cfg}, init_checkpoint, init_from)
    if init_from.startswith("hf-hub:"):
        return _from_dir(_cached_hub_folder(init_from[len("hf-hub:"):]), init_from)
    if os.path.isdir(init_from):
        return _from_dir(Path(init_from), init_from)
    raise ConfigError(f"{KEY}: {init_from!r} is neither a directory, open_clip:MODEL_NAME nor hf-hub:ORG/REPO")


def _cached_hub_folder(repo: str) -> Path:
    """The local snapshot folder of a hub repository, never a download."""
    from huggingface_hub import try_to_load_from_cache

    for name in ("open_clip_config.json", "config.json"):
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str):
            return Path(found).parent
    raise ConfigError(f"{KEY}: hf-hub:{repo} is not in the local Hugging Face cache ({_hf_cache()}); nothing is "
                      f"downloaded at run time: fetch it once (huggingface-cli download {repo}) or give a directory")


def _hf_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _from_dir(folder: Path, where: str) -> ClipSource:
    if (folder / "open_clip_config.json").is_file():
        try:
            cfg = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))
            cfg["model_cfg"]
        except (ValueError, KeyError) as e:
            raise ConfigError(f"{KEY}: {folder / 'open_clip_config.json'} has no model_cfg: {e!r}") from e
        weights = _weights_in(folder)
        return _open_clip_source({"model_cfg": cfg["model_cfg"]}, weights, where, cfg.get("preprocess_cfg", {}))
    if (folder / "config.json").is_file():
        return _hf_source(folder, where)
    raise ConfigError(f"{KEY}: {folder} holds neither open_clip_config.json (OpenCLIP) nor config.json "
                      "(a Hugging Face CLIPModel / VisionTextDualEncoderModel)")


def _weights_in(folder: Path) -> str:
    # OpenCLIP's own order of preference for the weights file of a folder.
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                 "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return str(folder / name)
    raise ConfigError(f"{KEY}: {folder} has an open_clip_config.json but no weights file (open_clip_model.safetensors)")


def _open_clip_source(arch: dict, weights: str, where: str, preprocess_cfg: dict | None = None) -> ClipSource:
    model_cfg = arch["model_cfg"]
    text = model_cfg.get("text_cfg", {})
    why = None
    if text.get("hf_model_name"):
        why = f"its text tower is the Hugging Face model {text['hf_model_name']!r} (not supported yet)"
    elif text.get("hf_tokenizer_name") or text.get("tokenizer_kwargs") or text.get("vocab_size", 49408) != 49408:
        why = "its tokenizer is not CLIP's BPE tokenizer"
    elif text.get("no_causal_mask") or text.get("embed_cls"):
        why = "its text tower is bidirectional or appends a CLS token (CoCa/SigLIP), so it reads padding"
    elif text.get("pool_type", "argmax") not in ("argmax", "first"):
        why = f"its text pooling {text.get('pool_type')!r} reads padding positions"
    elif model_cfg.get("init_logit_bias") is not None or "multimodal_cfg" in model_cfg:
        why = "it has a logit bias (sigmoid loss) or a multimodal decoder"
    pp = {"mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic", "resize_mode": "shortest"}
    pp.update({k: v for k, v in (preprocess_cfg or {}).items() if v is not None})
    if why is None and pp["resize_mode"] != "shortest":
        why = f"its preprocessing resize_mode {pp['resize_mode']!r} is not ours (shorter side, then center crop)"
    if why is None and pp["interpolation"] not in ("bicubic", "bilinear"):
        why = f"its interpolation {pp['interpolation']!r} is not bicubic or bilinear"
    if why:
        raise ConfigError(f"{KEY}: {where}: cannot start from this OpenCLIP model exactly: {why}")
    preprocess = {"mean": [float(x) for x in pp["mean"]], "std": [float(x) for x in pp["std"]],
                  "interpolation": pp["interpolation"]}
    return ClipSource("open_clip", {"model_cfg": model_cfg}, weights, OPEN_CLIP_TOKENIZER, preprocess, where)


def _hf_source(folder: Path, where: str) -> ClipSource:
    arch = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if arch.get("model_type") not in HF_KINDS:
        raise ConfigError(f"{KEY}: {folder / 'config.json'} is a {arch.get('model_type')!r} model; a CLIP start is "
                          f"one of {', '.join(HF_KINDS)}")
    if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer_config.json")):
        raise ConfigError(f"{KEY}: {folder} has no tokenizer files (save the processor or tokenizer beside the model)")
    pp = {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "interpolation": "bicubic"}
    pfile = folder / "preprocessor_config.json"
    if pfile.is_file():
        p = json.loads(pfile.read_text(encoding="utf-8"))
        pp["mean"] = [float(x) for x in p.get("image_mean", pp["mean"])]
        pp["std"] = [float(x) for x in p.get("image_std", pp["std"])]
        resample = p.get("resample", 3)
        if resample not in HF_RESAMPLE:
            raise ConfigError(f"{KEY}: {pfile}: resample {resample} is neither bilinear (2) nor bicubic (3)")
        pp["interpolation"] = HF_RESAMPLE[resample]
    else:
        log.warning("%s: no preprocessor_config.json: using CLIP's mean/std and bicubic resizing", folder)
    return ClipSource("hf", arch, str(folder), str(folder), pp, where)


def resolve_init(m: ModelConfig, need_weights: bool = True) -> ClipSource | None:
    """With `model.init_from` set: read the source and apply it to `m` (idempotent; before
    the tokenizer is loaded and the config written). -> the source, or None."""
    if not m.init_from:
        return None
    src = resolve_source(m.init_from, m.init_checkpoint, need_weights)
    apply_source(m, src)
    return src


def apply_source(m: ModelConfig, src: ClipSource) -> None:
    """Write what the source fixes into the model config (so the run's config.yaml says it)."""
    m.embed_dim = src.embed_dim
    m.image.image_size = src.image_size
    if not m.text.tokenizer:
        m.text.tokenizer = src.tokenizer
    if m.text.max_length > src.context_length:
        raise ConfigError(f"model.text.max_length: {m.text.max_length} exceeds the context length "
                          f"{src.context_length} of {src.where}")


# ---------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------


class OpenClipText(nn.Module):
    """OpenCLIP's text transformer, whole: input_ids [B,L] (L <= context_length) -> [B,E].

    The attention mask is not needed: the causal mask keeps every token up to the
    end-of-text token (where it pools) blind to what follows, padding included; that is
    also why a caption padded to our max_length embeds as OpenCLIP's 77-token one does.
    """

    def __init__(self, text: nn.Module):
        super().__init__()
        self.text = text

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        t = self.text
        n = input_ids.shape[1]
        if n == t.context_length:
            return t(input_ids)
        # Shorter than the context: OpenCLIP's own forward slices the position embeddings
        # but not the causal mask; the same steps with the mask cut to n x n (the causal
        # structure makes this what the full-length forward computes at these positions).
        from open_clip.transformer import text_global_pool

        x, _ = t._embeds(input_ids)
        x = t.ln_final(t.transformer(x, attn_mask=t.attn_mask[:n, :n]))
        pooled = text_global_pool(x, input_ids, t.pool_type)
        if isinstance(t.text_projection, nn.Linear):
            return t.text_projection(pooled)
        return pooled if t.text_projection is None else pooled @ t.text_projection


class HFClipVision(nn.Module):
    """A Hugging Face vision model + its projection: pixel_values [B,3,H,W] -> [B,E]
    (`get_image_features` of CLIPModel / VisionTextDualEncoderModel)."""

    def __init__(self, vision_model: nn.Module, projection: nn.Module):
        super().__init__()
        self.vision_model = vision_model
        self.projection = projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(self.vision_model(pixel_values=pixel_values).pooler_output)


class HFClipText(nn.Module):
    """A Hugging Face text model + its projection: input_ids, attention_mask [B,L] -> [B,E]
    (`get_text_features`)."""

    def __init__(self, text_model: nn.Module, projection: nn.Module):
        super().__init__()
        self.text_model = text_model
        self.projection = projection

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.projection(self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output)


def build_clip_model(src: ClipSource, load_weights: bool = True) -> nn.Module:
    """The source's whole model: open_clip CLIP / CustomTextCLIP, or the Hugging Face model.
    Without weights it is randomly initialised (works under torch.device("meta"))."""
    if src.kind == "open_clip":
        from open_clip.model import CLIP, CustomTextCLIP

        oc = _open_clip()
        cfg = copy.deepcopy(src.arch["model_cfg"])
        cfg.get("vision_cfg", {})["timm_model_pretrained"] = False  # never a hub download
        cls = CustomTextCLIP if cfg.pop("custom_text", False) else CLIP
        model = cls(**cfg)
        if load_weights:
            try:  # OpenCLIP's own loader: 'module.' prefixes, old text layouts, pos-embed resizing
                oc.load_checkpoint(model, src.weights, strict=True)
            except (RuntimeError, OSError, ValueError, KeyError) as e:
                raise ConfigError(f"{KEY}: {src.weights} does not load into {src.where}: {e}") from e
        return model
    from transformers import CONFIG_MAPPING, AutoModel

    if load_weights:
        try:
            return AutoModel.from_pretrained(src.weights)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{KEY}: cannot load {src.weights}: {e}") from e
    arch = dict(src.arch)
    config = CONFIG_MAPPING[arch.pop("model_type")].from_dict(arch)
    return AutoModel.from_config(config)


def _open_clip_text_module(model: nn.Module, src: ClipSource) -> nn.Module:
    """OpenCLIP's standalone TextTransformer holding the model's own text modules (the
    `CLIP` class keeps them inline; `CustomTextCLIP` has `.text`)."""
    if hasattr(model, "text"):
        return model.text
    from open_clip.model import _build_text_tower

    cfg = src.arch["model_cfg"]
    with torch.device("meta"):  # a shell: every tensor is replaced by the model's own below
        text = _build_text_tower(cfg["embed_dim"], cfg["text_cfg"], cfg.get("quick_gelu", False))
    for name in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection"):
        setattr(text, name, getattr(model, name))
    text.attn_mask = model.attn_mask
    return text


def towers_from_clip_model(model: nn.Module, src: ClipSource) -> tuple[ImageTower, TextTower, torch.Tensor]:
    """Wrap a built CLIP's modules (shared, not copied) as our towers.
    -> (image tower, text tower, logit_scale 0-d tensor)."""
    pp = src.preprocess
    if src.kind == "open_clip":
        image_backbone, text_backbone = model.visual, OpenClipText(_open_clip_text_module(model, src))
    else:
        image_backbone = HFClipVision(model.vision_model, model.visual_projection)
        text_backbone = HFClipText(model.text_model, model.text_projection)
    image = ImageTower(image_backbone, nn.Identity(), src.image_size, pp["mean"], pp["std"], pp["interpolation"])
    text = TextTower(text_backbone, nn.Identity(), "none")
    return image, text, model.logit_scale.detach().reshape(())


def clip_towers(m: ModelConfig, load_weights: bool = True) -> tuple[ImageTower, TextTower, float | None]:
    """Both query towers from `m.init_from` (config updated by `apply_source`), with the
    tower options applied (gradient checkpointing, trainable_blocks).
    -> (image, text, initial log temperature = -logit_scale, or None without weights)."""
    src = resolve_init(m, need_weights=load_weights)
    model = build_clip_model(src, load_weights)
    image, text, logit_scale = towers_from_clip_model(model, src)
    for key, tower, tcfg in (("image", image, m.image), ("text", text, m.text)):
        if tcfg.grad_checkpointing:
            _grad_checkpointing(tower.backbone, f"model.{key}.grad_checkpointing")
        if tcfg.trainable_blocks >= 0:
            _freeze_all_but_last(_block_groups(tower.backbone, f"model.{key}.trainable_blocks"), tcfg.trainable_blocks)
    return image, text, (-float(logit_scale) if load_weights else None)


def _grad_checkpointing(module: nn.Module, key: str) -> None:
    """Non-reentrant activation checkpointing of the CLIP's blocks (OpenCLIP always uses
    use_reentrant=False; Hugging Face is told so)."""
    done = False
    for m in module.modules():
        if hasattr(m, "gradient_checkpointing_enable") and getattr(m, "supports_gradient_checkpointing", False):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            done = True
        elif hasattr(m, "grad_checkpointing") and isinstance(getattr(m, "grad_checkpointing"), bool):
            m.grad_checkpointing = True  # OpenCLIP's Transformer / ModifiedResNet flag
            done = True
    if not done:
        raise ConfigError(f"{key}: this CLIP tower has no checkpointable blocks")


def _block_groups(module: nn.Module, key: str) -> list[list[nn.Parameter]]:
    """Parameter groups in forward order: everything before the block list (embeddings),
    each block, and what follows the blocks (final norm, projection) merged into the last."""
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if not lists:
        raise ConfigError(f"{key}: this CLIP tower has no list of blocks to freeze by (e.g. a ResNet): use -1")
    blocks = max(lists, key=lambda x: sum(p.numel() for p in x.parameters()))
    in_blocks = {id(p) for p in blocks.parameters()}
    before, after, seen = [], [], False
    for p in module.parameters():
        if id(p) in in_blocks:
            seen = True
        else:
            (after if seen else before).append(p)
    groups = [before] + [list(b.parameters()) for b in blocks]
    groups[-1] = groups[-1] + after
    return groups


# ---------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _open_clip_tokenizer_files() -> tuple[str, str]:
    """vocab.json and merges.txt of OpenCLIP's bundled BPE, in Hugging Face's names."""
    from open_clip.tokenizer import SimpleTokenizer

    st = SimpleTokenizer()
    vocab = dict(st.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = [" ".join(pair) for pair, _ in sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])]
    return json.dumps(vocab), "#version: 0.2\n" + "\n".join(merges) + "\n"


def open_clip_tokenizer(context_length: int = 77):
    """OpenCLIP's CLIP tokenizer as a Hugging Face CLIPTokenizer (same ids for the same text;
    pads with <|endoftext|>, which the causal text tower never sees). One difference:
    OpenCLIP first unescapes HTML entities (&amp; -> &) with ftfy; clean such captions when
    making shards."""
    _open_clip()
    from transformers import AutoTokenizer

    vocab, merges = _open_clip_tokenizer_files()
    with tempfile.TemporaryDirectory(prefix="moco_mm_clip_tok_") as d:
        Path(d, "vocab.json").write_text(vocab, encoding="utf-8")
        Path(d, "merges.txt").write_text(merges, encoding="utf-8")
        Path(d, "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "CLIPTokenizer", "model_max_length": context_length}), encoding="utf-8")
        return AutoTokenizer.from_pretrained(d)
