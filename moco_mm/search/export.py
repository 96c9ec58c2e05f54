"""Export trained towers to a self-contained, code-free directory (and optionally ONNX).

    export_encoders(run_dir=RUN | checkpoint=CKPT, out=EXPORT, towers="query", onnx=False)

Layout of an export directory (format ``moco_mm.export/1``)::

    EXPORT/
      encoder.json              ExportSpec: embed_dim, which towers, where they came from,
                                image: timm name + create_model kwargs, head, preprocessing
                                (image_size, resize mode, interpolation, mean, std),
                                text: pooling, max_length, head, the Hugging Face folder
      image_tower.safetensors   ImageTower.state_dict(): backbone.* + head.*
      text_tower.safetensors    TextTower.state_dict():  backbone.* + head.*
      text/                     Hugging Face config.json + tokenizer files (save_pretrained);
                                the tokenizer's model_max_length is text.max_length
      image_encoder.onnx        --onnx: pixel_values [N,3,H,W] float32 -> embedding [N,D]
      text_encoder.onnx         --onnx: input_ids, attention_mask int64 [N,L] -> embedding [N,D]
                                (input_ids only for a CLIP's causal text tower, which needs no mask)
      manifest.json             written last: format, versions (moco_mm, torch, timm,
                                transformers, ...), and {"size", "sha256"} of every other file

Invariants:
  * Rebuilding needs no training config and runs no pickled code: JSON + safetensors +
    a tokenizer.json (see `moco_mm.search.Encoder.from_export`).
  * Embeddings are L2-normalised rows; `pixel_values` are images after `preprocess`
    (resize shorter side, center crop, scale to [0,1], normalise by mean/std).
  * Text is at most text.max_length tokens (the training length, never more than the
    backbone's position embeddings hold): the exported tokenizer's model_max_length says
    so, `AutoTokenizer.from_pretrained(EXPORT/text)(..., truncation=True)` stops there,
    and the ONNX text graph is checked up to that length.
  * The directory appears whole or not at all: it is assembled in a sibling temporary
    folder and renamed into place. An ONNX graph that disagrees with PyTorch by more than
    `atol` fails the whole export, so no unverified .onnx file is ever left behind.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import safetensors.torch
import torch
from torch import nn

from moco_mm.config import ConfigError, ImageTowerConfig, TextTowerConfig, load_config
from moco_mm.model.clip_towers import ClipSource, build_clip_model, resolve_init, towers_from_clip_model
from moco_mm.model.towers import (
    ImageTower,
    TextTower,
    _takes_img_size,
    build_towers,
    hf_text_tower,
    load_tokenizer,
    timm_image_tower,
)
from moco_mm.train.checkpoint import CheckpointError, CheckpointManager

FORMAT = "moco_mm.export/1"
MANIFEST = "manifest.json"
SPEC = "encoder.json"
IMAGE_WEIGHTS = "image_tower.safetensors"
TEXT_WEIGHTS = "text_tower.safetensors"
TEXT_DIR = "text"
IMAGE_ONNX = "image_encoder.onnx"
TEXT_ONNX = "text_encoder.onnx"
ONNX_ATOL = 1e-4
# The one preprocessing pipeline the eval transform implements (moco_mm.data.ImageTransform).
RESIZE_MODE = "shorter_side_then_center_crop"
INTERPOLATION = "bilinear_antialias"
INTERPOLATIONS = {"bilinear": INTERPOLATION, "bicubic": "bicubic_antialias"}  # tower -> spec name
TOWERS = ("query", "key")


class ExportError(RuntimeError):
    """An export cannot be written or read; the message names the file or option."""


# ---------------------------------------------------------------------------------------
# The spec (encoder.json)
# ---------------------------------------------------------------------------------------


@dataclass
class ImageSpec:
    """What rebuilds the image tower: timm.create_model(timm_name, pretrained=False,
    num_classes=0, **timm_kwargs) + Projection(num_features, embed_dim, head, head_hidden_dim)."""

    timm_name: str
    timm_kwargs: dict
    head: str
    head_hidden_dim: int
    image_size: int
    mean: list[float]
    std: list[float]
    resize: str = RESIZE_MODE
    interpolation: str = INTERPOLATION
    weights: str = IMAGE_WEIGHTS


@dataclass
class TextSpec:
    """What rebuilds the text tower: AutoModel.from_config(AutoConfig.from_pretrained(hf_dir),
    add_pooling_layer=False) + pooling + Projection; the tokenizer lives in hf_dir too."""

    pooling: str
    max_length: int
    head: str
    head_hidden_dim: int
    hf_dir: str = TEXT_DIR
    weights: str = TEXT_WEIGHTS


@dataclass
class ExportSpec:
    embed_dim: int
    towers: str  # "query" or "key": which copy of the towers was exported
    image: ImageSpec
    text: TextSpec
    source: dict = field(default_factory=dict)  # run_dir, checkpoint, step (informational)
    onnx: dict = field(default_factory=dict)  # file name -> {"max_abs_diff", "atol", ...}
    format: str = FORMAT
    # Towers that started from a CLIP (model.init_from): moco_mm.model.ClipSource.to_dict(),
    # the CLIP's architecture (OpenCLIP model_cfg or Hugging Face config) and preprocessing.
    clip: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = SPEC) -> "ExportSpec":
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT:
                raise ExportError(f"{where}: format {raw.get('format')!r}, this moco_mm reads {FORMAT!r}")
            spec = cls(**{**raw, "image": ImageSpec(**raw["image"]), "text": TextSpec(**raw["text"])})
        except ExportError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ExportError(f"{where}: malformed export spec: {type(e).__name__}: {e}") from None
        if spec.image.resize != RESIZE_MODE or spec.image.interpolation not in INTERPOLATIONS.values():
            raise ExportError(f"{where}: unknown image preprocessing {spec.image.resize}/{spec.image.interpolation}")
        return spec


# ---------------------------------------------------------------------------------------
# Files, checksums, manifest
# ---------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _listed_files(root: Path) -> list[str]:
    """Every file under `root` but the manifest and dotfiles, as sorted POSIX relative paths."""
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != MANIFEST and not any(part.startswith(".") for part in rel.split("/")):
            out.append(rel)
    return sorted(out)


def versions() -> dict[str, str]:
    """Versions of the libraries that define the exported tensors' meaning."""
    import timm
    import transformers

    import moco_mm

    out = {"moco_mm": moco_mm.__version__, "torch": torch.__version__, "timm": timm.__version__,
           "transformers": transformers.__version__, "safetensors": safetensors.__version__}
    for name in ("onnx", "onnxruntime"):
        with contextlib.suppress(ImportError):
            out[name] = __import__(name).__version__
    return out


def write_manifest(root: Path, fmt: str = FORMAT, source: dict | None = None) -> dict:
    """Checksum every file under `root` into manifest.json (written last)."""
    files = {rel: {"size": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)}
             for rel in _listed_files(root)}
    manifest = {"format": fmt, "versions": versions(), "files": files}
    if source:
        manifest["source"] = source
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
    return manifest


def verify_export(root: Path | str, check_hashes: bool = True) -> dict:
    """Check an export against its manifest; -> the manifest. Raises ExportError.

    Refuses a missing manifest, a listed file that is missing or whose size / sha256
    differs, and a file the manifest does not list (it could change what loads, e.g. an
    extra tokenizer file), so what loads is exactly what was exported.
    """
    root = Path(root)
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{root}: no {MANIFEST}: not an export directory, or the export did not finish") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{root / MANIFEST}: unreadable: {e}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if manifest.get("format") != FORMAT or not isinstance(files, dict):
        raise ExportError(f"{root / MANIFEST}: not a {FORMAT} manifest")
    for required in (SPEC, IMAGE_WEIGHTS, TEXT_WEIGHTS):
        if required not in files:
            raise ExportError(f"{root / MANIFEST}: does not list {required}")
    for rel, info in files.items():
        path = root / rel
        if not path.is_file():
            raise ExportError(f"{path}: listed in {MANIFEST} but missing")
        if path.stat().st_size != info["size"]:
            raise ExportError(f"{path}: {path.stat().st_size} bytes, {MANIFEST} says {info['size']}: "
                              f"the file is damaged or was replaced")
        if check_hashes and sha256_file(path) != info["sha256"]:
            raise ExportError(f"{path}: sha256 differs from {MANIFEST}: the file is damaged or was replaced; "
                              f"re-export it")
    extra = sorted(set(_listed_files(root)) - set(files))
    if extra:
        raise ExportError(f"{root}: {extra[0]} (and {len(extra) - 1} more) not listed in {MANIFEST}; "
                          f"remove it or re-export")
    return manifest


def model_fingerprint(manifest: dict, spec: "ExportSpec") -> str:
    """A short id of what determines the embeddings: the weights, the Hugging Face folder
    and the spec without its informational fields (source, ONNX report), not the library
    versions. Equal fingerprints embed identically; indexes store it to catch a query
    made with another model."""
    files = manifest["files"]
    parts = [f"{rel}:{files[rel]['sha256']}" for rel in sorted(files) if not rel.endswith(".onnx") and rel != SPEC]
    # An empty `clip` (not a CLIP start) is left out: older exports keep their fingerprint.
    core = {k: v for k, v in asdict(spec).items() if k not in ("source", "onnx") and (k != "clip" or v)}
    parts.append(json.dumps(core, sort_keys=True))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# Where the weights come from
# ---------------------------------------------------------------------------------------


def resolve_source(run_dir: Path | str | None = None, checkpoint: Path | str | None = None) -> tuple[Path, Path]:
    """-> (run_dir holding config.yaml, checkpoint step directory).

    --run: the newest complete checkpoint of the run. --checkpoint: that step directory;
    its run is two levels up (RUN/checkpoints/step_N).
    """
    if (run_dir is None) == (checkpoint is None):
        raise ExportError("give exactly one of --run RUN_DIR or --checkpoint CKPT_DIR")
    if checkpoint is not None:
        ckpt = Path(checkpoint).resolve()
        if not ckpt.is_dir():
            raise ExportError(f"--checkpoint {checkpoint}: no such directory")
        run = ckpt.parent.parent
        if not (run / "config.yaml").is_file():
            raise ExportError(
                f"--checkpoint {checkpoint}: no config.yaml two levels up ({run / 'config.yaml'}); a checkpoint "
                f"must sit at RUN/checkpoints/step_N inside its run directory. Copy the run's config.yaml "
                f"there, or pass --run")
        return run, ckpt
    run = Path(run_dir).resolve()
    if not (run / "config.yaml").is_file():
        raise ExportError(f"--run {run_dir}: no config.yaml: not a run directory")
    latest = CheckpointManager(run / "checkpoints").latest()
    if latest is None:
        raise ExportError(f"--run {run_dir}: no complete checkpoint under {run / 'checkpoints'}")
    return run, latest


def _tower_tensors(tensors: dict[str, torch.Tensor], towers: str, modality: str) -> dict[str, torch.Tensor]:
    prefix = f"{towers}.{modality}."
    out = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not out:
        hint = ("; a run with model.momentum_encoder: false (the CLIP mode) has no key towers: "
                "export --towers query") if towers == "key" else ""
        raise ExportError(f"the checkpoint holds no {prefix}* tensors (towers={towers!r}){hint}")
    return out


def load_towers(run_dir: Path, checkpoint: Path, towers: str = "query"
                ) -> tuple[ImageTower, TextTower, Any, Any, int, float]:
    """Rebuild the training towers from the run's config and load the chosen copy.

    -> (image tower, text tower, tokenizer, config, step, log temperature), towers in eval
    mode on the CPU. A run that started from a CLIP (model.init_from) rebuilds the CLIP's
    structure from its source's configuration (the source must still be where the run's
    config says; its weights file is not needed).
    Hub weights and frozen/checkpointed blocks do not matter here (the weights come from
    the checkpoint, and nothing trains), so nothing is downloaded or wrapped.
    """
    if towers not in TOWERS:
        raise ExportError(f"--towers {towers!r}: choose one of {', '.join(TOWERS)}")
    try:
        cfg = load_config(run_dir / "config.yaml")
    except ConfigError as e:
        raise ExportError(f"{run_dir / 'config.yaml'}: {e}") from e
    try:
        resolve_init(cfg.model, need_weights=False)
        tokenizer = load_tokenizer(cfg.model.text)
    except ConfigError as e:
        raise ExportError(f"{run_dir / 'config.yaml'}: {e} (a relative path is resolved from the current "
                          f"directory: run the export from where training ran)") from e
    # The trainer sizes a randomly initialised text vocabulary to the tokenizer; a
    # pretrained text tower keeps its own (build_hf_backbone ignores the size then).
    vocab = None if cfg.model.text.pretrained else len(tokenizer)
    m = cfg.model
    m.image.pretrained = False
    m.image.grad_checkpointing = m.text.grad_checkpointing = False
    m.image.trainable_blocks = m.text.trainable_blocks = -1
    m.text.pretrained = False
    # Fresh towers track BatchNorm running statistics, so a BatchNorm key tower (which
    # normalises with batch statistics while training) is exported with the running
    # statistics momentum_update copies into it from the query tower: per-sample
    # embeddings, independent of the batch, as search needs.
    try:
        image, text = build_towers(m, vocab, load_weights=False)
    except ConfigError as e:
        raise ExportError(f"{run_dir / 'config.yaml'}: {e}") from e
    try:
        tensors, _ = CheckpointManager.load(checkpoint)
    except CheckpointError as e:
        raise ExportError(str(e)) from e
    for name, tower in (("image", image), ("text", text)):
        try:
            tower.load_state_dict(_tower_tensors(tensors, towers, name), strict=True)
        except RuntimeError as e:
            raise ExportError(f"{checkpoint}: {towers}.{name} does not fit the run's config: {e}") from e
        tower.eval()
    log_t = float(tensors["query.log_temperature"]) if "query.log_temperature" in tensors else math.log(
        cfg.model.temperature)
    return image, text, tokenizer, cfg, CheckpointManager.step_of(checkpoint), log_t


def timm_kwargs(cfg: ImageTowerConfig) -> dict:
    """The complete create_model kwargs the training tower was built with (the fixed input
    size of position-embedding models included), so loading needs no moco_mm rule."""
    kwargs = dict(cfg.kwargs)
    if "img_size" not in kwargs and _takes_img_size(cfg.name):
        kwargs["img_size"] = cfg.image_size
    return kwargs


# ---------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------


@dataclass
class OnnxCheck:
    """Result of comparing an ONNX graph with PyTorch on the check inputs."""

    max_abs_diff: float
    atol: float
    shapes: list[list[int]]  # shape of the first input of every check


@contextlib.contextmanager
def _mha_fastpath(enabled: bool):
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def export_onnx(module: nn.Module, path: Path, example: tuple[torch.Tensor, ...], input_names: Sequence[str],
                dynamic_axes: dict[str, dict[int, str]], checks: Sequence[tuple[torch.Tensor, ...]],
                atol: float = ONNX_ATOL) -> OnnxCheck:
    """Trace `module` on `example` into `path` (output name `embedding`), then run every
    input tuple of `checks` through onnxruntime and PyTorch (float32).

    The graph is kept only if max |onnx - torch| <= atol over all checks; otherwise the
    file is deleted and ExportError says by how much and on which shape. Tracing records
    one path through Python control flow, so the checks use other batch sizes and lengths
    than the example: a graph that baked in a shape or branch is caught here.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("--onnx needs onnx and onnxruntime: pip install 'moco-mm[export]'") from None
    if atol < 0:
        raise ValueError(f"atol must be >= 0, got {atol}")
    module = module.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings(), _mha_fastpath(False):
            # The TorchScript exporter (dynamo=False) warns that it is deprecated and that
            # traced Python branches become constants; the checks below catch such a case.
            # The dynamo exporter needs onnxscript, which this project does not require.
            # nn.MultiheadAttention's inference fast path (OpenCLIP's blocks) is one fused
            # op ONNX has no symbol for: trace the composite path (same numbers).
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(module, example, str(path), input_names=list(input_names),
                                  output_names=["embedding"], dynamic_axes=dynamic_axes, opset_version=17,
                                  do_constant_folding=True, dynamo=False)
            except (RuntimeError, torch.onnx.errors.OnnxExporterError) as e:
                raise ExportError(f"{path.name}: the {type(module).__name__} does not export to ONNX: "
                                  f"{str(e).splitlines()[0]}; export without --onnx") from e
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = min(4, os.cpu_count() or 1)
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        worst, worst_shape = 0.0, None
        for inputs in checks:
            with torch.no_grad():
                want = module(*inputs).float().numpy()
            # An input the module ignores is not in the graph (a CLIP's causal text tower
            # takes no attention mask): feed what the graph declares.
            declared = {i.name for i in session.get_inputs()}
            try:
                got = session.run(["embedding"],
                                  {n: t.numpy() for n, t in zip(input_names, inputs) if n in declared})[0]
            except Exception as e:  # onnxruntime's own error types: a shape the trace baked in
                raise ExportError(f"{path.name}: the traced {type(module).__name__} fails on an input of shape "
                                  f"{tuple(inputs[0].shape)} ({str(e).splitlines()[0][:300]}); export without "
                                  f"--onnx") from e
            if got.shape != want.shape:
                raise ExportError(f"{path.name}: ONNX output shape {got.shape} for input {tuple(inputs[0].shape)}, "
                                  f"PyTorch gives {want.shape}")
            diff = float(abs(got - want).max())
            if diff > worst or worst_shape is None:
                worst, worst_shape = diff, tuple(inputs[0].shape)
        if not worst <= atol:  # also refuses NaN
            raise ExportError(
                f"{path.name}: ONNX differs from PyTorch by {worst:.3g} (max abs, float32) on an input of shape "
                f"{worst_shape}, more than the allowed {atol:g}; not exported. Export without --onnx, or "
                f"report the tower ({type(module).__name__}) as not ONNX-traceable")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return OnnxCheck(worst, atol, [list(t[0].shape) for t in checks])


def _text_checks(tokenizer, max_length: int, vocab: int) -> tuple[tuple, list[tuple]]:
    """(example, checks) for the text graph: random ids with ragged masks at two batch
    sizes and two lengths, real captions padded to their longest, and the longest input
    `tokenizer` (the exported one) gives: a long caption cut by truncation=True alone,
    which must be exactly max_length tokens."""
    g = torch.Generator().manual_seed(0)
    short = max(2, max_length // 2)

    def ragged(n: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(0, vocab, (n, length), generator=g)
        lengths = torch.randint(1, length + 1, (n,), generator=g)
        lengths[0] = length  # one full row: no trailing padding in the batch
        mask = (torch.arange(length)[None] < lengths[:, None]).long()
        return ids * mask, mask

    def pair(texts: list[str], **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        t = tokenizer(texts, padding="longest", truncation=True, return_tensors="pt", **kwargs)
        return t["input_ids"].long(), t["attention_mask"].long()

    captions = ["a photo of a red circle", "two small blue squares below a large yellow star", "x"]
    real = pair(captions, max_length=max_length)
    # No max_length here: what a user of the exported tokenizer gets. At least one word
    # per position, so only truncation can stop it.
    longest = pair([" ".join(captions * max_length), captions[0]])
    if longest[0].shape[1] != max_length:
        raise ExportError(f"the exported tokenizer cuts a long caption to {longest[0].shape[1]} tokens with "
                          f"truncation=True, not to model.text.max_length {max_length}")
    return ragged(2, max_length), [ragged(1, short), ragged(5, max_length), ragged(3, short), real, longest]


def _image_checks(image_size: int) -> tuple[tuple, list[tuple]]:
    g = torch.Generator().manual_seed(0)

    def batch(n: int) -> tuple[torch.Tensor]:
        return (torch.randn(n, 3, image_size, image_size, generator=g),)

    return batch(2), [batch(1), batch(5)]


def text_positions(backbone: nn.Module) -> tuple[int, str] | None:
    """-> (how many tokens one sequence may hold, how that follows from the config), or
    None when the backbone has no absolute position limit to read.

    BERT-like models have exactly max_position_embeddings positions; RoBERTa-like ones
    (RoBERTa, XLM-R, CamemBERT, Longformer) number positions from padding_idx + 1, so
    max_position_embeddings - padding_idx - 1 remain (514 -> 512 for roberta-base).
    """
    config = backbone.config
    table = getattr(getattr(backbone, "embeddings", None), "position_embeddings", None)
    n = getattr(config, "max_position_embeddings", None)
    if isinstance(table, nn.Embedding):
        n = table.num_embeddings
        if table.padding_idx is not None:
            offset = table.padding_idx + 1
            return n - offset, (f"max_position_embeddings {n} of {type(backbone).__name__}, less the "
                                f"{offset} position ids it reserves up to padding_idx {table.padding_idx}")
    if not isinstance(n, int) or n <= 0:
        return None
    return n, f"max_position_embeddings {n} of {type(backbone).__name__}"


def check_max_length(max_length: int, backbone: nn.Module) -> None:
    """Refuse a text max_length the backbone's position embeddings cannot hold: the
    exported tokenizer would promise sequences that fail in PyTorch and ONNX alike."""
    limit = text_positions(backbone)
    if limit is not None and max_length > limit[0]:
        raise ExportError(
            f"model.text.max_length {max_length} is more than the {limit[0]} positions the text tower "
            f"holds ({limit[1]}); sequences of {max_length} tokens cannot be embedded. Set "
            f"model.text.max_length in the run's config.yaml back to the length it trained at (training "
            f"pads every caption to it, so at most {limit[0]}), or train with more positions")


def save_tokenizer(tokenizer, max_length: int, folder: Path) -> Any:
    """Save `tokenizer` into `folder` with model_max_length = max_length (recorded in its
    tokenizer_config.json); -> the tokenizer loaded back from `folder`, as users get it."""
    from transformers import AutoTokenizer

    tokenizer = copy.deepcopy(tokenizer)  # the caller's keeps its own length
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(str(folder))
    try:
        saved = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise ExportError(f"{folder}: the saved tokenizer does not load: {e}") from e
    if saved.model_max_length != max_length:
        raise ExportError(f"{folder}: the saved tokenizer says model_max_length {saved.model_max_length}, "
                          f"not model.text.max_length {max_length}")
    return saved


# ---------------------------------------------------------------------------------------
# The export
# ---------------------------------------------------------------------------------------


@dataclass
class ExportResult:
    out: Path
    step: int
    towers: str
    onnx: dict[str, OnnxCheck] = field(default_factory=dict)


def _save_tensors(module: nn.Module, path: Path) -> None:
    # Clones break any storage sharing (safetensors refuses shared tensors); one metadata
    # key keeps the bytes identical from export to export (see checkpoint.py).
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    # safetensors creates the file 0600; give it the mode every other export file gets.
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def check_out_dir(out: Path | str, overwrite: bool) -> Path:
    """An export's --out: absent, empty, or replaceable with --overwrite (checked before any work)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out}: not empty; pass --overwrite to replace it")
    return out


def export_encoders(out: Path | str, *, run_dir: Path | str | None = None, checkpoint: Path | str | None = None,
                    towers: str = "query", onnx: bool = False, overwrite: bool = False,
                    atol: float = ONNX_ATOL, log: Callable[[str], None] = lambda s: None) -> ExportResult:
    """Write the export directory `out` (see the module docstring). Atomic: on any error
    (ONNX mismatch included) `out` is left as it was."""
    out = check_out_dir(out, overwrite)
    run, ckpt = resolve_source(run_dir, checkpoint)
    image, text, tokenizer, cfg, step, _ = load_towers(run, ckpt, towers)
    log(f"loaded {towers} towers from {ckpt} (step {step})")

    m = cfg.model
    clip = resolve_init(m, need_weights=False)
    if clip is None:  # a CLIP's context length was checked when the run started
        check_max_length(m.text.max_length, text.backbone)
    spec = ExportSpec(
        embed_dim=m.embed_dim, towers=towers,
        image=ImageSpec(timm_name="" if clip else m.image.name, timm_kwargs={} if clip else timm_kwargs(m.image),
                        head="none" if clip else m.head, head_hidden_dim=m.head_hidden_dim,
                        image_size=m.image.image_size, mean=[float(x) for x in image.mean],
                        std=[float(x) for x in image.std], interpolation=INTERPOLATIONS[image.interpolation]),
        text=TextSpec(pooling=text.pooling, max_length=m.text.max_length, head="none" if clip else m.head,
                      head_hidden_dim=m.head_hidden_dim),
        source={"run_dir": str(run), "checkpoint": str(ckpt), "step": step},
        clip=clip.to_dict() if clip else {},
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _save_tensors(image, tmp / IMAGE_WEIGHTS)
        _save_tensors(text, tmp / TEXT_WEIGHTS)
        if clip is None:  # a CLIP's architecture is in the spec
            text.backbone.config.save_pretrained(tmp / TEXT_DIR)
        # The tokenizer says how long a sequence the tower takes (often 512 otherwise); the
        # ONNX check below uses it as saved.
        tokenizer = save_tokenizer(tokenizer, m.text.max_length, tmp / TEXT_DIR)
        checks: dict[str, OnnxCheck] = {}
        if onnx:
            example, image_checks = _image_checks(m.image.image_size)
            checks[IMAGE_ONNX] = export_onnx(
                image, tmp / IMAGE_ONNX, example, ["pixel_values"],
                {"pixel_values": {0: "batch"}, "embedding": {0: "batch"}}, image_checks, atol)
            log(f"{IMAGE_ONNX}: max |onnx - torch| = {checks[IMAGE_ONNX].max_abs_diff:.3g}")
            vocab = clip.vocab_size if clip else text.backbone.config.vocab_size
            example, text_checks = _text_checks(tokenizer, m.text.max_length, vocab)
            checks[TEXT_ONNX] = export_onnx(
                text, tmp / TEXT_ONNX, example, ["input_ids", "attention_mask"],
                {"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"},
                 "embedding": {0: "batch"}}, text_checks, atol)
            log(f"{TEXT_ONNX}: max |onnx - torch| = {checks[TEXT_ONNX].max_abs_diff:.3g}")
            spec.onnx = {name: asdict(c) for name, c in checks.items()}
        (tmp / SPEC).write_text(spec.to_json(), encoding="utf-8")
        write_manifest(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, step, towers, checks)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`; an existing `out` is swapped out first, then deleted."""
    if out.exists():
        aside = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, aside)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(aside, out)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, out)


def rebuild_towers(root: Path, spec: ExportSpec) -> tuple[ImageTower, TextTower]:
    """Build the towers an export describes (random init) using only its JSON files.

    The moco_mm tower classes are reused with small configs: the image tower becomes
    timm.create_model(name, pretrained=False, num_classes=0, **timm_kwargs) (the kwargs
    already hold img_size), the text tower AutoModel.from_config(AutoConfig.from_pretrained
    (root/text), add_pooling_layer=False) (a local folder: build_hf_backbone's local path).
    """
    if spec.clip:  # the CLIP's own modules, built from its architecture
        try:
            src = ClipSource.from_dict(spec.clip, str(root / SPEC), tokenizer=str(root / spec.text.hf_dir))
            image, text, _ = towers_from_clip_model(build_clip_model(src, load_weights=False), src)
        except (ConfigError, KeyError, TypeError, ValueError) as e:
            raise ExportError(f"{root / SPEC}: cannot rebuild the CLIP towers: {e!r}") from e
        return image, text
    image_cfg = ImageTowerConfig(name=spec.image.timm_name, pretrained=False, image_size=spec.image.image_size,
                                 kwargs=dict(spec.image.timm_kwargs))
    text_cfg = TextTowerConfig(name=str(root / spec.text.hf_dir), pretrained=False, pooling=spec.text.pooling,
                               max_length=spec.text.max_length)
    try:
        image = timm_image_tower(image_cfg, spec.embed_dim, spec.image.head, spec.image.head_hidden_dim)
        text = hf_text_tower(text_cfg, spec.embed_dim, spec.text.head, spec.text.head_hidden_dim)
    except ConfigError as e:
        raise ExportError(f"{root / SPEC}: cannot rebuild the towers: {e}") from e
    # Preprocessing is what training used, not whatever this timm version's default is.
    image.mean, image.std = tuple(spec.image.mean), tuple(spec.image.std)
    return image, text
