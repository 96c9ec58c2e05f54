"""Thumbnails stored inside an index directory, so a server never opens a path it was given.

    writer = ThumbWriter(side=128)
    writer.add(pil_image)                     # row i of images.jsonl, in order
    writer.write(INDEX_DIR)                   # thumbs.bin + thumbs.idx.npy
    store = ThumbStore.load(INDEX_DIR)        # memory-mapped
    jpeg = store.get(row)                     # bytes (b"" when none)

Layout: `thumbs.bin` is the JPEG bytes of every row, concatenated; `thumbs.idx.npy` the
int64 offsets [N + 1] (row i is bin[idx[i]:idx[i+1]]). Each thumbnail keeps the aspect
ratio with its longer side at most `side` pixels (JPEG quality 85).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

THUMBS_BIN = "thumbs.bin"
THUMBS_IDX = "thumbs.idx.npy"
THUMB_SIDE = 128


def thumbnail_jpeg(img: Image.Image, side: int = THUMB_SIDE, quality: int = 85) -> bytes:
    """An RGB image -> JPEG bytes, longer side at most `side` (never enlarged)."""
    t = img.convert("RGB")
    t.thumbnail((side, side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    t.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class ThumbWriter:
    """Collects one thumbnail per index row, in row order."""

    def __init__(self, side: int = THUMB_SIDE):
        self.side = side
        self.offsets = [0]
        self.chunks: list[bytes] = []

    def __len__(self) -> int:
        return len(self.chunks)

    def add(self, img: Image.Image | None) -> None:
        data = b"" if img is None else thumbnail_jpeg(img, self.side)
        self.add_bytes(data)

    def add_bytes(self, data: bytes) -> None:
        self.chunks.append(data)
        self.offsets.append(self.offsets[-1] + len(data))

    def write(self, folder: Path) -> None:
        folder = Path(folder)
        with open(folder / THUMBS_BIN, "wb") as f:
            for c in self.chunks:
                f.write(c)
        np.save(folder / THUMBS_IDX, np.asarray(self.offsets, dtype=np.int64))


class ThumbStore:
    """Read side: the thumbnails of an index directory (memory-mapped)."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        self.data = data
        self.offsets = offsets

    @classmethod
    def load(cls, folder: Path) -> "ThumbStore | None":
        folder = Path(folder)
        if not (folder / THUMBS_IDX).is_file() or not (folder / THUMBS_BIN).is_file():
            return None
        offsets = np.load(folder / THUMBS_IDX)
        size = (folder / THUMBS_BIN).stat().st_size
        if offsets.ndim != 1 or len(offsets) < 1 or int(offsets[-1]) != size:
            raise ValueError(f"{folder / THUMBS_IDX}: offsets do not match {THUMBS_BIN} ({size} bytes)")
        data = np.memmap(folder / THUMBS_BIN, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        return cls(data, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def get(self, row: int) -> bytes:
        """JPEG bytes of `row` (b"" when it has none); IndexError outside [0, len)."""
        if not 0 <= row < len(self):
            raise IndexError(row)
        return bytes(self.data[int(self.offsets[row]):int(self.offsets[row + 1])])
