"""Content fingerprints: which training pairs are exact duplicates of each other.

The model masks a negative that carries the same caption text, the same image or the same
group as the query's positive (DESIGN.md, "Negatives that are not negatives"). It compares
fingerprints, not content: every training batch carries `fingerprints` int64 [B, 3] with
the columns FINGERPRINT_COLUMNS = (text, image, group), one row per sample.

Every fingerprint is

    int.from_bytes(blake2b(payload, digest_size=8, person=TAG).digest(), "little") & (2**63 - 1)

a 63-bit non-negative integer (it fits int64 and is never negative), the same on every run,
process and machine (no `hash()`, no salt). TAG is a per-kind domain tag (b"moco_mm.text",
b"moco_mm.image", b"moco_mm.bytes", b"moco_mm.group"), so fingerprints of different kinds
never agree by construction of their payloads. NONE (-1) means "no fingerprint" (e.g. a
sample without a group); it is never produced for real content and never matches anything
(the model ignores it). Two different contents collide with probability ~2**-63 per pair:
at 10^6 queue entries x 10^9 queries that is ~10^-4 wrongly masked negatives in a whole run.

    text_fingerprint(caption)   normalize_caption(caption) as UTF-8 (rules there)
    image_fingerprint(rgb)      width, height (uint32 little-endian each) + the RGB bytes of a
                                decoded 8-bit RGB PIL image, row-major: the same pixels give
                                the same fingerprint whatever the file encoding (PNG, lossless
                                WebP, ...); one changed pixel, or another size, gives another
    bytes_fingerprint(data)     the bytes themselves (loader fallback for shards written
                                before make_shards stored `image_fp`: same file bytes only)
    group_fingerprint(value)    the canonical JSON text of a string or int, `json.dumps(value,
                                ensure_ascii=True)`: "q1" and 'q1' agree, the string "7" and
                                the integer 7 do not; group values are used exactly as given
                                (no case or space folding: they are identifiers)

Image and bytes fingerprints share the image column but never agree with each other (their
tags differ): a shard written before `image_fp` existed finds duplicates among its own
byte-identical files only.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata

from PIL import Image

__all__ = ["NONE", "FINGERPRINT_COLUMNS", "normalize_caption", "text_fingerprint", "image_fingerprint",
           "bytes_fingerprint", "group_fingerprint"]

NONE = -1  # "no fingerprint": never produced for content, never matches
FINGERPRINT_COLUMNS = ("text", "image", "group")  # the columns of a batch's `fingerprints` [B, 3]
_MASK63 = (1 << 63) - 1


def _fingerprint(payload: bytes, tag: bytes) -> int:
    digest = hashlib.blake2b(payload, digest_size=8, person=tag).digest()
    return int.from_bytes(digest, "little") & _MASK63


def normalize_caption(caption: str) -> str:
    """The caption text that `text_fingerprint` hashes, in this order:

    1. Unicode NFKC, then `str.casefold()`, then NFKC again (casefolding can leave a string
       that is not NFKC; the second pass makes the whole function idempotent): full-width
       and ligature forms become plain letters, "Straße" and "STRASSE" agree;
    2. every run of whitespace (`str.split()`: Unicode whitespace, tabs, newlines) becomes
       one space, and leading/trailing whitespace goes;
    3. trailing punctuation (Unicode category P*: `.`, `!`, `?`, `,`, `…` (after NFKC
       `...`), quotes, closing brackets) and the spaces around it are stripped, repeatedly.

    So "A photo of  a cat." and "a photo of a cat" are one text. Rule 3 is deliberate: a
    final period is a writing habit, not content, and a caption that differs from the
    positive only by it describes the same image; masking such a negative costs one of
    tens of thousands of negatives, keeping it pushes the model away from a correct match.
    Punctuation elsewhere (inner commas, leading quotes, "?" in mid-sentence) is kept.
    A caption of punctuation only normalises to "".
    """
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", caption).casefold())
    text = " ".join(text.split())
    end = len(text)
    while end and (text[end - 1].isspace() or unicodedata.category(text[end - 1]).startswith("P")):
        end -= 1
    return text[:end]


def text_fingerprint(caption: str) -> int:
    """63-bit fingerprint of `normalize_caption(caption)` (UTF-8; lone surrogates, which a
    JSON `\\ud800` escape can produce, are hashed as their code units instead of raising)."""
    return _fingerprint(normalize_caption(caption).encode("utf-8", "surrogatepass"), b"moco_mm.text")


def image_fingerprint(rgb: Image.Image) -> int:
    """63-bit fingerprint of a decoded 8-bit RGB image: its size and pixels, not its file.

    Raises ValueError for another mode: convert first with the same rules as make_shards
    (`make_shards.to_rgb`: alpha composited on white, 16-bit rescaled), or two copies of one
    picture in different modes would disagree.
    """
    if rgb.mode != "RGB":
        raise ValueError(f"image_fingerprint needs an RGB image, got mode {rgb.mode!r} (convert with to_rgb)")
    header = rgb.width.to_bytes(4, "little") + rgb.height.to_bytes(4, "little")
    return _fingerprint(header + rgb.tobytes(), b"moco_mm.image")


def bytes_fingerprint(data: bytes) -> int:
    """63-bit fingerprint of raw bytes (e.g. an encoded image file)."""
    return _fingerprint(bytes(data), b"moco_mm.bytes")


def group_fingerprint(value: str | int) -> int:
    """63-bit fingerprint of a group value (a string or an int; not bool, float or None),
    hashed as its canonical JSON text `json.dumps(value, ensure_ascii=True)`."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"a group must be a string or an integer, got {type(value).__name__}: {value!r}")
    return _fingerprint(json.dumps(value, ensure_ascii=True).encode("ascii"), b"moco_mm.group")
