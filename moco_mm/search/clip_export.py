"""Hand back a CLIP: export trained towers in OpenCLIP's or Hugging Face's own format.

    export_clip(out, "open_clip" | "hf", run_dir=RUN | checkpoint=CKPT, towers="query")

`open_clip`: OUT/open_clip_config.json (model_cfg + preprocess_cfg) and
OUT/open_clip_model.safetensors, loaded by
`open_clip.create_model_and_transforms("local-dir:OUT")`.
`hf`: a `save_pretrained` directory (config.json, model.safetensors) with the tokenizer
and the image processor, loaded by `CLIPModel.from_pretrained(OUT)` (or
`VisionTextDualEncoderModel`, when the run started from one) and `AutoProcessor`.
Both get a manifest.json (sha256 of every file, where the weights came from).

Only towers that started from a CLIP (`model.init_from`) can be handed back, and only
exactly: the weights are copied, never approximated. OpenCLIP <-> Hugging Face crosses
between the two libraries' ViT CLIPs with one key table (fused q/k/v <-> three
projections, [in, out] <-> [out, in] projections); anything outside it (a ResNet or timm
image tower, layer scale, custom attention blocks, biased projections) is refused with the
reason. Before the directory appears, the target library loads it and must embed a few
images and captions as our towers do (max |diff| <= 1e-5), or the export fails and leaves
nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from moco_mm.config import ConfigError
from moco_mm.model.clip_towers import ClipSource, build_clip_model, resolve_init, towers_from_clip_model
from moco_mm.search.export import (
    ExportError,
    _replace_dir,
    check_out_dir,
    load_towers,
    resolve_source,
    write_manifest,
)

FORMATS = ("open_clip", "hf")
ATOL = 1e-5
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
# Captions the check embeds: short enough for any training length (the shorter side of a
# comparison with OpenCLIP's 77-token context), with punctuation and case.
CHECK_TEXTS = ["a photo of a dog.", "Two red circles", "it's a street at night"]


@dataclass
class ClipExportResult:
    out: Path
    step: int
    towers: str
    format: str
    max_abs_diff: float


# ---------------------------------------------------------------------------------------
# OpenCLIP <-> Hugging Face CLIP: configs and one key table
# ---------------------------------------------------------------------------------------

_UNSUPPORTED_VISION = ("timm_model_name", "attentional_pool", "final_ln_after_pool", "no_ln_pre", "ls_init_value",
                       "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc",
                       "act_kwargs", "norm_kwargs")
_UNSUPPORTED_TEXT = ("hf_model_name", "embed_cls", "no_causal_mask", "final_ln_after_pool", "ls_init_value",
                     "proj_bias", "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn",
                     "scale_fc", "act_kwargs", "norm_kwargs")


def open_clip_to_hf_config(model_cfg: dict) -> dict:
    """OpenCLIP model_cfg -> CLIPConfig kwargs, for the ViT + causal-text CLIPs both libraries
    express; ExportError naming the field otherwise."""
    v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    why = [f"vision_cfg.{k}" for k in _UNSUPPORTED_VISION if v.get(k)]
    why += [f"text_cfg.{k}" for k in _UNSUPPORTED_TEXT if t.get(k)]
    if isinstance(v.get("layers", 12), (list, tuple)):
        why.append("vision_cfg.layers (a ModifiedResNet)")
    for key, cfg, ok in (("vision_cfg.pool_type", v, "tok"), ("text_cfg.pool_type", t, "argmax"),
                         ("vision_cfg.pos_embed_type", v, "learnable"), ("text_cfg.proj_type", t, "linear")):
        if cfg.get(key.split(".")[1], ok) != ok:
            why.append(f"{key} {cfg[key.split('.')[1]]!r}")
    for key, cfg in (("vision_cfg.block_type", v), ("text_cfg.block_type", t)):
        if cfg.get("block_type") not in (None, "default"):
            why.append(key)
    if why:
        raise ExportError("transformers' CLIPModel cannot hold this OpenCLIP model exactly: " + ", ".join(why)
                          + " (CLIPModel is a ViT with learnt positions, pre-norm blocks, CLS pooling and a "
                            "causal text transformer pooled at the end-of-text token)")
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    vw, tw = v.get("width", 768), t.get("width", 512)
    size = v.get("image_size", 224)
    return dict(
        projection_dim=model_cfg["embed_dim"],
        vision_config=dict(hidden_size=vw, intermediate_size=int(vw * v.get("mlp_ratio", 4.0)),
                           num_hidden_layers=v.get("layers", 12), num_attention_heads=vw // v.get("head_width", 64),
                           image_size=size[0] if isinstance(size, (list, tuple)) else size,
                           patch_size=v.get("patch_size", 16), hidden_act=act, layer_norm_eps=1e-5),
        text_config=dict(vocab_size=t.get("vocab_size", 49408), hidden_size=tw,
                         intermediate_size=int(tw * t.get("mlp_ratio", 4.0)), num_hidden_layers=t.get("layers", 12),
                         num_attention_heads=t.get("heads", 8), max_position_embeddings=t.get("context_length", 77),
                         hidden_act=act, layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407),
    )


def hf_to_open_clip_config(arch: dict) -> dict:
    """A CLIPModel config dict -> OpenCLIP model_cfg (the inverse of open_clip_to_hf_config)."""
    if arch.get("model_type") != "clip":
        raise ExportError(f"OpenCLIP has no place for a {arch.get('model_type')!r} model: only a CLIPModel "
                          "(a VisionTextDualEncoderModel's towers are arbitrary Hugging Face models)")
    v, t = arch["vision_config"], arch["text_config"]
    why = []
    acts = {v.get("hidden_act", "quick_gelu"), t.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= {"gelu", "quick_gelu"}:
        why.append(f"activations {sorted(acts)} (OpenCLIP uses one of gelu, quick_gelu for both towers)")
    for name, cfg in (("vision", v), ("text", t)):
        if cfg.get("layer_norm_eps", 1e-5) != 1e-5:
            why.append(f"{name} layer_norm_eps {cfg['layer_norm_eps']} (OpenCLIP's is 1e-5)")
        if cfg["intermediate_size"] % cfg["hidden_size"]:
            why.append(f"{name} intermediate_size {cfg['intermediate_size']} not a multiple of its width")
    eos, vocab = t.get("eos_token_id", 2), t.get("vocab_size", 49408)
    if eos not in (2, vocab - 1):  # 2: the legacy argmax pooling; the last id: the first EOS is the argmax
        why.append(f"text eos_token_id {eos} is not the largest token id (OpenCLIP pools at the argmax)")
    if why:
        raise ExportError("OpenCLIP cannot hold this CLIPModel exactly: " + "; ".join(why))
    return {
        "embed_dim": arch.get("projection_dim", 512),
        "quick_gelu": acts == {"quick_gelu"},
        "vision_cfg": {"image_size": v["image_size"], "layers": v["num_hidden_layers"], "width": v["hidden_size"],
                       "head_width": v["hidden_size"] // v["num_attention_heads"],
                       "mlp_ratio": v["intermediate_size"] / v["hidden_size"], "patch_size": v["patch_size"]},
        "text_cfg": {"context_length": t["max_position_embeddings"], "vocab_size": vocab, "width": t["hidden_size"],
                     "heads": t["num_attention_heads"], "layers": t["num_hidden_layers"],
                     "mlp_ratio": t["intermediate_size"] / t["hidden_size"]},
    }


def _key_table(n_vision: int, n_text: int) -> list[tuple[str, str, str]]:
    """(OpenCLIP name, Hugging Face name, how): "=" same tensor, "T" transposed, "qkv" a
    fused in-projection <-> q/k/v projections (a name prefix each)."""
    table = [
        ("logit_scale", "logit_scale", "="),
        ("visual.class_embedding", "vision_model.embeddings.class_embedding", "="),
        ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight", "="),
        ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight", "="),
        ("visual.proj", "visual_projection.weight", "T"),
        ("token_embedding.weight", "text_model.embeddings.token_embedding.weight", "="),
        ("positional_embedding", "text_model.embeddings.position_embedding.weight", "="),
        ("text_projection", "text_projection.weight", "T"),
    ]
    for wb in ("weight", "bias"):
        table += [(f"visual.ln_pre.{wb}", f"vision_model.pre_layrnorm.{wb}", "="),
                  (f"visual.ln_post.{wb}", f"vision_model.post_layernorm.{wb}", "="),
                  (f"ln_final.{wb}", f"text_model.final_layer_norm.{wb}", "=")]
    for oc, hf, n in (("visual.transformer.resblocks", "vision_model.encoder.layers", n_vision),
                      ("transformer.resblocks", "text_model.encoder.layers", n_text)):
        for i in range(n):
            a, b = f"{oc}.{i}.", f"{hf}.{i}."
            for wb in ("weight", "bias"):
                table += [(a + f"ln_1.{wb}", b + f"layer_norm1.{wb}", "="),
                          (a + f"ln_2.{wb}", b + f"layer_norm2.{wb}", "="),
                          (a + f"attn.out_proj.{wb}", b + f"self_attn.out_proj.{wb}", "="),
                          (a + f"mlp.c_fc.{wb}", b + f"mlp.fc1.{wb}", "="),
                          (a + f"mlp.c_proj.{wb}", b + f"mlp.fc2.{wb}", "="),
                          (a + f"attn.in_proj_{wb}", b + f"self_attn.*.{wb}", "qkv")]
    return table


def convert_state(state: dict[str, torch.Tensor], table: list[tuple[str, str, str]], to_hf: bool) -> dict:
    """Rename (and transpose / split / fuse) every tensor of `state` by `table`; a tensor
    the table has no place for is an ExportError (nothing is dropped silently)."""
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}  # index buffers, rebuilt
    out: dict[str, torch.Tensor] = {}
    for oc, hf, how in table:
        src, dst = (oc, hf) if to_hf else (hf, oc)
        if how == "qkv":
            names = [hf.replace("*", p) for p in ("q_proj", "k_proj", "v_proj")]
            if to_hf:
                for name, part in zip(names, state.pop(src).chunk(3)):
                    out[name] = part.clone()
            else:
                out[dst] = torch.cat([state.pop(n) for n in names])
        else:
            t = state.pop(src)
            out[dst] = (t.t() if how == "T" else t).contiguous().clone()
    if state:
        raise ExportError(f"{len(state)} tensors have no place in the target: {sorted(state)[:4]}")
    return out


# ---------------------------------------------------------------------------------------
# The export
# ---------------------------------------------------------------------------------------


def _trained_clip(src: ClipSource, image: nn.Module, text: nn.Module, log_t: float) -> nn.Module:
    """The source's model class holding our trained weights (our towers wrap its modules)."""
    model = build_clip_model(src, load_weights=False)
    im, tx, _ = towers_from_clip_model(model, src)
    im.load_state_dict(image.state_dict(), strict=True)
    tx.load_state_dict(text.state_dict(), strict=True)
    with torch.no_grad():
        model.logit_scale.fill_(-log_t)
    return model.eval()


def _write_open_clip(tmp: Path, src: ClipSource, model: nn.Module) -> None:
    if src.kind == "open_clip":
        model_cfg, state = src.arch["model_cfg"], model.state_dict()
    else:
        model_cfg = hf_to_open_clip_config(src.arch)
        state = convert_state(model.state_dict(), _key_table(model_cfg["vision_cfg"]["layers"],
                                                             model_cfg["text_cfg"]["layers"]), to_hf=False)
    pp = src.preprocess
    config = {"model_cfg": model_cfg,
              "preprocess_cfg": {"mean": pp["mean"], "std": pp["std"], "interpolation": pp["interpolation"],
                                 "resize_mode": "shortest", "size": src.image_size}}
    (tmp / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    safetensors.torch.save_file({k: v.detach().contiguous().clone() for k, v in state.items()},
                                tmp / OPEN_CLIP_WEIGHTS, metadata={"format": "pt"})


def _write_hf(tmp: Path, src: ClipSource, model: nn.Module, tokenizer, max_length: int) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from moco_mm.search.export import save_tokenizer

    if src.kind == "hf":
        hf_model = model
    else:
        cfg = open_clip_to_hf_config(src.arch["model_cfg"])
        hf_model = CLIPModel(CLIPConfig(**cfg))
        table = _key_table(cfg["vision_config"]["num_hidden_layers"], cfg["text_config"]["num_hidden_layers"])
        state = convert_state(model.state_dict(), table, to_hf=True)
        missing, unexpected = hf_model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ExportError(f"CLIPModel does not take the converted weights: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}")
    hf_model.save_pretrained(str(tmp))
    save_tokenizer(tokenizer, max_length, tmp)
    pp, size = src.preprocess, src.image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                       image_mean=pp["mean"], image_std=pp["std"],
                       resample={"bilinear": 2, "bicubic": 3}[pp["interpolation"]]).save_pretrained(str(tmp))


def _check(tmp: Path, fmt: str, image: nn.Module, text: nn.Module, tokenizer, max_length: int,
           log_t: float) -> float:
    """Load `tmp` with the target library and compare its embeddings (and logit scale)
    with our towers'; -> the largest absolute difference."""
    size = image.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    tok = tokenizer(CHECK_TEXTS, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        want_img = image(pixels)
        want_txt = text(tok["input_ids"], tok["attention_mask"])
        if fmt == "open_clip":
            import open_clip

            model = open_clip.create_model("local-dir:" + str(tmp)).eval()
            got_img = model.encode_image(pixels, normalize=True)
            got_txt = model.encode_text(open_clip.get_tokenizer("local-dir:" + str(tmp))(CHECK_TEXTS), normalize=True)
        else:
            from transformers import AutoModel, AutoTokenizer

            model = AutoModel.from_pretrained(str(tmp)).eval()
            theirs = AutoTokenizer.from_pretrained(str(tmp))(CHECK_TEXTS, padding="max_length", truncation=True,
                                                            return_tensors="pt")
            got_img = F.normalize(_pooled(model.get_image_features(pixel_values=pixels)), dim=-1)
            got_txt = F.normalize(_pooled(model.get_text_features(input_ids=theirs["input_ids"],
                                                                  attention_mask=theirs["attention_mask"])), dim=-1)
        scale = float(model.logit_scale)
    diff = max(float((want_img - got_img).abs().max()), float((want_txt - got_txt).abs().max()))
    if not diff <= ATOL or abs(scale + log_t) > 1e-6:
        raise ExportError(f"--format {fmt}: the written model embeds differently from the trained towers "
                          f"(max |diff| {diff:.3g} > {ATOL:g}, or logit_scale {scale:.6g} != {-log_t:.6g}); "
                          f"nothing was exported")
    return diff


def _pooled(out):
    """get_*_features: a tensor (transformers 4) or an output with pooler_output (5)."""
    return getattr(out, "pooler_output", out)


def export_clip(out: Path | str, fmt: str, *, run_dir: Path | str | None = None,
                checkpoint: Path | str | None = None, towers: str = "query", overwrite: bool = False,
                log: Callable[[str], None] = lambda s: None) -> ClipExportResult:
    """Write `out` in OpenCLIP's (`open_clip`) or Hugging Face's (`hf`) format; atomic."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of moco_mm, {', '.join(FORMATS)}")
    out = check_out_dir(out, overwrite)
    run, ckpt = resolve_source(run_dir, checkpoint)
    image, text, tokenizer, cfg, step, log_t = load_towers(run, ckpt, towers)
    log(f"loaded {towers} towers from {ckpt} (step {step})")
    try:
        src = resolve_init(cfg.model, need_weights=False)
    except ConfigError as e:
        raise ExportError(str(e)) from e
    if src is None:
        raise ExportError(
            f"--format {fmt}: this run's towers are timm + Hugging Face, not a CLIP (model.init_from is empty). "
            + ("OpenCLIP could hold the timm image tower, but its Hugging Face text projection has no bias and "
               "ours (model.head) has one" if fmt == "open_clip" else
               "transformers has no model class for a timm image tower")
            + ": it cannot hold these weights exactly. Use --format moco_mm (and --onnx)")
    if src.kind == "hf" and fmt == "open_clip" and src.arch.get("model_type") != "clip":
        raise ExportError("--format open_clip: a VisionTextDualEncoderModel's towers are arbitrary Hugging Face "
                          "models with no OpenCLIP equivalent; use --format hf")
    model = _trained_clip(src, image, text, log_t)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if fmt == "open_clip":
            _write_open_clip(tmp, src, model)
        else:
            _write_hf(tmp, src, model, tokenizer, cfg.model.text.max_length)
        diff = _check(tmp, fmt, image, text, tokenizer, cfg.model.text.max_length, log_t)
        log(f"{fmt}: reloaded with its own library, max |diff| = {diff:.3g}")
        write_manifest(tmp, fmt=f"moco_mm.export.{fmt}/1",
                       source={"run_dir": str(run), "checkpoint": str(ckpt), "step": step, "towers": towers})
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ClipExportResult(out, step, towers, fmt, diff)
