"""Image transforms: RGB PIL image -> uint8 tensor (crop, resize, flip), random draws from a
caller's generator (never torch's global RNG), so the stream stays a pure function of its seed;
`ImageTransform.normalize` turns a uint8 batch into the normalised float32 the towers take.

The split is for throughput: loader workers hand over uint8 (a quarter of float32's bytes
through shared memory, pinned memory and the host-to-device copy) and the consumer normalises
on its device. On the CPU the two steps give bit-identical values to normalising each image
in the worker (same torchvision functions, elementwise, so batching changes nothing)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = ["ImageTransform", "build_transforms", "INTERPOLATIONS"]

INTERPOLATIONS = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}


class ImageTransform:
    """RGB PIL image -> uint8 tensor [3, image_size, image_size] (the pixels, not normalised);
    `normalize(batch)` then maps uint8 [B, 3, S, S] -> float32 [B, 3, S, S] with (mean, std).

    train: random resized crop (area fraction in [crop_scale_min, 1], aspect in [3/4, 4/3])
    and, if `hflip`, a horizontal flip with p=0.5; the draws come from the `generator`
    argument (required), never from torch's global RNG.
    eval: resize the short side to image_size, center crop (deterministic; generator ignored).
    `interpolation` ("bilinear" | "bicubic", both antialiased) is the resampling of every
    resize: bilinear for timm towers, bicubic for CLIP's (what OpenCLIP and Hugging Face
    preprocess CLIP images with).
    """

    _RATIO = (3.0 / 4.0, 4.0 / 3.0)

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], *, train: bool,
                 crop_scale_min: float = 0.5, hflip: bool = False, interpolation: str = "bilinear"):
        if image_size <= 0:
            raise ValueError(f"image_size must be > 0, got {image_size}")
        if not 0.0 < crop_scale_min <= 1.0:
            raise ValueError(f"crop_scale_min must be in (0, 1], got {crop_scale_min}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {mean} and {std}")
        self.image_size = image_size
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.train = train
        self.crop_scale_min = crop_scale_min
        self.hflip = hflip
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
        self.interpolation = interpolation
        self._mode = INTERPOLATIONS[interpolation]
        self._eval = v2.Compose([v2.Resize(image_size, interpolation=self._mode, antialias=True),
                                 v2.CenterCrop(image_size)])

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        x = F.to_image(image)  # uint8 [3, H, W]
        if self.train:
            if generator is None:
                raise ValueError("the train transform needs a torch.Generator (no global RNG)")
            top, left, h, w = self._crop_box(x.shape[-2], x.shape[-1], generator)
            x = F.resized_crop(x, top, left, h, w, [self.image_size, self.image_size],
                                interpolation=self._mode, antialias=True)
            if self.hflip and torch.rand((), generator=generator).item() < 0.5:
                x = F.horizontal_flip(x)
        else:
            x = self._eval(x)
        # A plain uint8 tensor: the center crop is a view of the resized image, and
        # torch.stack(..., out=) copies it into the batch either way.
        return x.as_subclass(torch.Tensor)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] (or [3, H, W]) on any device -> float32 of the same shape and
        device: x / 255, then (x - mean) / std per channel. A new tensor; `images` is left as is.

        Exactly the float path the loader workers ran before they handed over uint8:
        torchvision's to_dtype(scale=True) then normalize, elementwise, so on the CPU the
        result is bit-identical to normalising each image on its own.
        """
        if images.dtype != torch.uint8:
            raise TypeError(f"normalize expects uint8 images (the loader's output), got {images.dtype}")
        if images.ndim < 3 or images.shape[-3] != 3:
            raise ValueError(f"normalize expects [B, 3, H, W] or [3, H, W], got {tuple(images.shape)}")
        x = F.to_dtype(images.as_subclass(torch.Tensor), torch.float32, scale=True)
        return F.normalize(x, self.mean, self.std)

    def _crop_box(self, height: int, width: int, g: torch.Generator) -> tuple[int, int, int, int]:
        """(top, left, h, w) of a box covering a random area fraction and aspect ratio."""
        area = height * width
        log_lo, log_hi = math.log(self._RATIO[0]), math.log(self._RATIO[1])
        for _ in range(10):
            u = torch.rand(2, generator=g, dtype=torch.float64).tolist()
            target = area * (self.crop_scale_min + (1.0 - self.crop_scale_min) * u[0])
            aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=g))
                left = int(torch.randint(0, width - w + 1, (1,), generator=g))
                return top, left, h, w
        # No fit in 10 tries (extreme aspect): the largest centred box within the ratio range.
        ratio = width / height
        if ratio < self._RATIO[0]:
            w, h = width, round(width / self._RATIO[0])
        elif ratio > self._RATIO[1]:
            w, h = round(height * self._RATIO[1]), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w


def build_transforms(image_size: int, mean: Sequence[float], std: Sequence[float], *, train: bool,
                     crop_scale_min: float = 0.5, hflip: bool = False,
                     interpolation: str = "bilinear") -> ImageTransform:
    """The image transform (PIL -> uint8 [3, S, S]; `.normalize` for the float batch); mean/std
    and interpolation are the image tower's (timm's pretrained_cfg, or the CLIP it started from)."""
    return ImageTransform(image_size, mean, std, train=train, crop_scale_min=crop_scale_min, hflip=hflip,
                          interpolation=interpolation)
