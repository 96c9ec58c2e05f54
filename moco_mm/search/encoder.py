"""The embedding API of an export (no training code or config needed).

    enc = Encoder.from_export("exports/demo")          # checks manifest sha256s first
    img = enc.encode_images(["a.jpg", pil_image])      # float32 [N, D], unit rows
    txt = enc.encode_texts(["a red circle"])           # float32 [M, D], unit rows
    scores = txt @ img.T                               # cosine similarity

Loading an export executes no pickled code: JSON, safetensors and a tokenizer.json.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import safetensors.torch
import torch
from PIL import Image

from moco_mm.data import build_transforms
from moco_mm.data.labeled import load_image_file
from moco_mm.data.make_shards import to_rgb
from moco_mm.model import ImageTower, TextTower
from moco_mm.search.export import (
    INTERPOLATIONS,
    SPEC,
    ExportError,
    ExportSpec,
    model_fingerprint,
    rebuild_towers,
    verify_export,
)

log = logging.getLogger(__name__)

ImageInput = str | os.PathLike | Image.Image


class SearchError(RuntimeError):
    """An index or input cannot be used; the message names the file or option."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """A file -> upright 8-bit RGB, the way make_shards stores training images. Raises
    ImageError naming the file."""
    return load_image_file(path)


class Encoder:
    """Both towers of an export, in eval mode, with their tokenizer and image transform.

    encode_images(images)  -> float32 [N, D], unit rows (N = len(images))
    encode_texts(texts)    -> float32 [M, D], unit rows
    image_features / text_features take preprocessed tensors and return torch [N, D].
    Images are preprocessed in two steps, as in training: `pixels` (the eval transform ->
    uint8 [N,3,S,S]) and `normalize` (uint8 -> float32 on the encoder's device);
    `preprocess` does both and returns float32 on the CPU.
    """

    def __init__(self, spec: ExportSpec, image_tower: ImageTower, text_tower: TextTower, tokenizer: Any,
                 fingerprint: str = "", root: Path | None = None, device: str | torch.device = "cpu"):
        self.spec = spec
        self.device = torch.device(device)
        self.image_tower = image_tower.eval().to(self.device)
        self.text_tower = text_tower.eval().to(self.device)
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.root = root
        interpolation = {v: k for k, v in INTERPOLATIONS.items()}[spec.image.interpolation]
        self.transform = build_transforms(spec.image.image_size, spec.image.mean, spec.image.std, train=False,
                                          interpolation=interpolation)

    @classmethod
    def from_export(cls, root: str | os.PathLike, device: str | torch.device = "cpu",
                    verify: bool = True) -> "Encoder":
        """Load an export directory. `verify` checks every file's sha256 against the
        manifest first (sizes are always checked) and refuses unlisted files."""
        from transformers import AutoTokenizer

        root = Path(root)
        manifest = verify_export(root, check_hashes=verify)
        spec = ExportSpec.from_json((root / SPEC).read_text(encoding="utf-8"), str(root / SPEC))
        image, text = rebuild_towers(root, spec)
        for tower, name in ((image, spec.image.weights), (text, spec.text.weights)):
            try:
                tower.load_state_dict(safetensors.torch.load_file(root / name, device="cpu"), strict=True)
            except (RuntimeError, OSError) as e:  # wrong keys/shapes, or a damaged header
                raise ExportError(f"{root / name}: does not fit {SPEC}: {e}") from e
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(root / spec.text.hf_dir))
        except (OSError, ValueError) as e:
            raise ExportError(f"{root / spec.text.hf_dir}: cannot load the tokenizer: {e}") from e
        return cls(spec, image, text, tokenizer, model_fingerprint(manifest, spec), root, device)

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    @property
    def max_length(self) -> int:
        return self.spec.text.max_length

    # -- tensors in, tensors out ---------------------------------------------------------

    @torch.inference_mode()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values float32 [N,3,H,W] (after `preprocess`) -> float32 [N,D] unit rows."""
        return self.image_tower(pixel_values.to(self.device)).float().cpu()

    @torch.inference_mode()
    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask int64 [N,L] -> float32 [N,D] unit rows."""
        return self.text_tower(input_ids.to(self.device), attention_mask.to(self.device)).float().cpu()

    def pixels(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Paths or PIL images -> uint8 [N,3,S,S] on the CPU: the eval transform of training
        (resize, center crop), not yet normalised."""
        pil = [load_image(x) if not isinstance(x, Image.Image) else to_rgb(x) for x in images]
        return torch.stack([self.transform(p) for p in pil])

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [N,3,S,S] (from `pixels` or iter_eval_batches) -> float32 [N,3,S,S] on the
        encoder's device, normalised with the export's mean/std (the uint8 crosses, not float)."""
        return self.transform.normalize(pixels.to(self.device))

    def preprocess(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Paths or PIL images -> float32 [N,3,S,S] on the CPU, exactly the eval transform of
        training followed by its normalisation."""
        return self.transform.normalize(self.pixels(images))

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> input_ids, attention_mask int64 [N, max_length]: padded to max_length as in
        training and eval, so an embedding never depends on the rest of its batch."""
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a list of strings, not one string")
        tok = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return tok["input_ids"].long(), tok["attention_mask"].long()

    # -- the public API ------------------------------------------------------------------

    def encode_images(self, images: Sequence[ImageInput], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Paths or PIL images -> float32 [N, D], L2-normalised rows, in input order."""
        out = [self.image_features(self.normalize(self.pixels(images[i:i + batch_size])))
               for i in _batches(len(images), batch_size, progress, "images")]
        return _stack(out, self.embed_dim)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """Strings -> float32 [N, D], L2-normalised rows, in input order."""
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a list of strings, not one string")
        out = [self.text_features(*self.tokenize(texts[i:i + batch_size]))
               for i in _batches(len(texts), batch_size, progress, "texts")]
        return _stack(out, self.embed_dim)


def _batches(n: int, batch_size: int, progress: bool, unit: str) -> Iterable[int]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, n, batch_size)
    if not progress:
        return starts
    from tqdm import tqdm

    return tqdm(starts, desc=f"embedding {unit}", unit="batch")


def _stack(parts: list[torch.Tensor], dim: int) -> np.ndarray:
    if not parts:
        return np.zeros((0, dim), dtype=np.float32)
    return np.ascontiguousarray(torch.cat(parts).numpy(), dtype=np.float32)
