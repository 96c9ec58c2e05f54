"""Content fingerprints: the caption normalisation rules, pixel (not file) identity of images,
JSON-text identity of groups, never -1, and fixed values (a changed hash breaks every stored
`image_fp` and must be noticed)."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image, features

from moco_mm.data.fingerprints import (
    FINGERPRINT_COLUMNS,
    NONE,
    bytes_fingerprint,
    group_fingerprint,
    image_fingerprint,
    normalize_caption,
    text_fingerprint,
)
from moco_mm.data.make_shards import decode_image, to_rgb


def _noise(h: int = 12, w: int = 17, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kw)
    return out.getvalue()


def _decoded(data: bytes) -> Image.Image:
    return to_rgb(decode_image(data))  # what make_shards and the loader fingerprint


@pytest.mark.parametrize("a, b", [
    ("A photo of  a cat.", "a photo of a cat"),           # case, inner spaces, final period
    ("a photo of a cat", "  a photo\tof\na cat  "),       # any whitespace run, ends stripped
    ("A CAT!?", "a cat..."),                               # any trailing punctuation run
    ("a cat .", "a cat"),                                  # spaces before it go too
    ("a cat…", "a cat"),                                   # NFKC: the ellipsis is '...'
    ("Ｆｕｌｌ width", "full width"),                        # NFKC: full-width letters
    ("ﬁsh", "fish"),                                       # NFKC: ligature
    ("Straße", "STRASSE"),                                 # casefold, not lower()
    ("a\u00a0cat", "a cat"),                               # no-break space is whitespace
])
def test_normalisation_makes_these_one_text(a, b):
    assert normalize_caption(a) == normalize_caption(b)
    assert text_fingerprint(a) == text_fingerprint(b)


@pytest.mark.parametrize("a, b", [
    ("a cat", "a cats"),
    ("a, cat", "a cat"),            # inner punctuation is content
    ("'a cat", "a cat"),            # so is leading punctuation
    ("a red cat", "a cat red"),
    ("a cat", "acat"),              # whitespace collapses, never vanishes
])
def test_different_texts_differ(a, b):
    assert normalize_caption(a) != normalize_caption(b)
    assert text_fingerprint(a) != text_fingerprint(b)


def test_normalisation_is_idempotent_and_exact():
    assert normalize_caption("  A Photo of  a CAT. ") == "a photo of a cat"
    assert normalize_caption("what? a cat!") == "what? a cat"
    assert normalize_caption("...") == ""
    for s in ("A photo of  a cat.", "Straße…", "ﬁ ǅ Ⅸ !", "ΣΑΣ.", "x\u0130y"):
        once = normalize_caption(s)
        assert normalize_caption(once) == once, s
    # A lone surrogate (a JSON "\ud800" escape) is hashed, not an error.
    assert text_fingerprint("a \ud800 cat") >= 0


def test_same_pixels_in_other_encodings_agree():
    pixels = Image.fromarray(_noise())
    png = _encode(pixels, "PNG")
    encodings = [_encode(pixels, "PNG", compress_level=1), _encode(pixels, "BMP"), _encode(pixels, "TIFF")]
    if features.check("webp"):
        encodings.append(_encode(pixels, "WEBP", lossless=True))
    fp = image_fingerprint(_decoded(png))
    assert fp == image_fingerprint(pixels)
    for data in encodings:
        assert data != png
        assert image_fingerprint(_decoded(data)) == fp
    # The file bytes differ, so their byte fingerprints do too (the old-shard fallback).
    assert len({bytes_fingerprint(d) for d in [png, *encodings]}) == len(encodings) + 1


def test_different_pixels_or_size_differ():
    arr = _noise()
    base = image_fingerprint(Image.fromarray(arr))
    one_pixel = arr.copy()
    one_pixel[5, 7, 1] ^= 1
    assert image_fingerprint(Image.fromarray(one_pixel)) != base
    # The same bytes as another shape: the size is part of the fingerprint.
    flat = np.zeros((4, 6, 3), dtype=np.uint8)
    assert image_fingerprint(Image.fromarray(flat)) != image_fingerprint(Image.fromarray(flat.reshape(6, 4, 3)))
    with pytest.raises(ValueError, match="RGB"):
        image_fingerprint(Image.new("RGBA", (2, 2)))


def test_groups_hash_their_json_text():
    assert group_fingerprint("q1") == group_fingerprint("q1")
    assert group_fingerprint("7") != group_fingerprint(7)  # "7" vs 7 as JSON text
    assert group_fingerprint("Q1") != group_fingerprint("q1")  # identifiers: no folding
    assert group_fingerprint(10**30) >= 0
    for bad in (True, 1.5, None, ["q"], {"q": 1}):
        with pytest.raises(TypeError, match="string or an integer"):
            group_fingerprint(bad)


def test_never_none_and_63_bits():
    values = [text_fingerprint(f"caption {i}") for i in range(300)] + [text_fingerprint("")]
    values += [bytes_fingerprint(bytes([i])) for i in range(256)] + [bytes_fingerprint(b"")]
    values += [group_fingerprint(i) for i in range(-5, 300)] + [group_fingerprint("")]
    values += [image_fingerprint(Image.new("RGB", (1 + i % 5, 1 + i // 5), (i, 0, 0))) for i in range(50)]
    assert all(isinstance(v, int) and 0 <= v < 2**63 and v != NONE for v in values)
    assert len(set(values)) == len(values)
    assert FINGERPRINT_COLUMNS == ("text", "image", "group")


def test_known_values_are_stable():
    """Fixed inputs, fixed outputs: computed once by the documented formula. A change here
    means every `image_fp` already in a shard disagrees with newly computed ones."""
    def formula(payload: bytes, tag: bytes) -> int:
        digest = hashlib.blake2b(payload, digest_size=8, person=tag).digest()
        return int.from_bytes(digest, "little") & (2**63 - 1)

    img = Image.fromarray(np.arange(4 * 3 * 3, dtype=np.uint8).reshape(3, 4, 3))
    header = (4).to_bytes(4, "little") + (3).to_bytes(4, "little")
    assert image_fingerprint(img) == formula(header + bytes(range(36)), b"moco_mm.image") == 7761995361677598094
    assert text_fingerprint("A photo of  a cat.") == formula(b"a photo of a cat", b"moco_mm.text") \
        == 7963830805630453005
    assert bytes_fingerprint(b"moco_mm") == formula(b"moco_mm", b"moco_mm.bytes") == 7473438203407173265
    assert group_fingerprint("q1") == formula(b'"q1"', b"moco_mm.group") == 6817376186650982433
    assert group_fingerprint(7) == formula(b"7", b"moco_mm.group") == 772910239176633474
