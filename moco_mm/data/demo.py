"""A procedural image-caption dataset and a local tokenizer: the demo needs no download.

    moco-mm demo-data --out data/demo [--seed 0 --train 4096 --val 512 ...]

Each image (default 64x64) shows one or two shapes (circle, square, triangle, star, cross,
diamond) in one of six colours, small or large, placed in the cells of a 2x2 grid on a light
background. Captions are composed from exactly those attributes, e.g.
    "a large red circle above a small blue square"   /  paraphrase
    "a small blue square below a large red circle"
    "a small green star in the top left"             /  "there is a small green star in the top left corner"
so image->text and text->image retrieval are learnable by a tiny model on the CPU and
measurable on the held-out split. With `captions_per_image=2` every image carries both
phrasings (exercising the loader's per-epoch caption choice).

Like web data, the train split holds exact duplicates, which the model's duplicate masking
(batch `fingerprints`) is there for:
  * repeated caption texts, by chance: almost every single-shape caption ("a small green
    star in the top left": 72 shape phrases x 4 cells) and some two-shape ones recur on
    other images; with the default parameters 3559 of the 8095 train captions (44%) are
    also a caption of another image;
  * repeated images: `duplicate_image_fraction` (default 0.05) of the train images,
    round(fraction * n_train) of them at positions drawn from their own rng, are
    pixel-identical copies of an earlier original (non-copy) image of the split, each saved
    as its own PNG file at another zlib level (same pixels, different bytes: make_shards
    keeps each as a sample of its own and gives both the same `image_fp`). A copy carries a
    random non-empty subset of the original scene's captions in random order (with 2
    captions: [a], [b], [a, b] or [b, a], equally likely).
The held-out split has no duplicate images: an image present twice with different caption
lists would make image->text retrieval ambiguous (only its own captions count as hits).

Output layout (all written by `moco_mm.data.make_shards`):
    OUT/train/      shard-*.tar + manifest.json, sample_id 0 .. n_train-1 (copies included)
    OUT/val/        shard-*.tar + manifest.json, sample_id n_train .. n_train+n_val-1 (disjoint)
    OUT/tokenizer/  a WordPiece tokenizer whose vocabulary is learned from the train captions,
                    in Hugging Face BERT format (see `train_tokenizer`):
                    `transformers.AutoTokenizer.from_pretrained(OUT/tokenizer)` loads it
    OUT/demo_build.json  the build parameters, written last: a rerun with the same parameters
                    finds it and does nothing; different parameters rebuild.

Everything is a pure function of the parameters (the seed included): two builds give
byte-identical shards, manifests and vocabulary. A split holds ceil(n / ceil(n / shards))
shards (exactly `shards` when it divides n).
"""

from __future__ import annotations

import collections
import json
import math
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from moco_mm.data import make_shards as shards

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS = {
    "red": (215, 38, 38),
    "green": (34, 160, 60),
    "blue": (36, 84, 220),
    "yellow": (236, 200, 24),
    "purple": (140, 56, 190),
    "orange": (245, 128, 24),
}
SIZES = {"small": 0.12, "large": 0.22}  # radius as a fraction of the image side
CELLS = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
RELATIONS = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
STAMP = "demo_build.json"
_BUILD_VERSION = 3  # 3: duplicate images in train, image_fp in KEY.json
_SUPERSAMPLE = 4  # draw at 4x and reduce: anti-aliased edges without a blurry look


@dataclass(frozen=True)
class DemoParams:
    seed: int = 0
    n_train: int = 4096
    n_val: int = 512
    image_size: int = 64
    train_shards: int = 16
    val_shards: int = 4
    captions_per_image: int = 2
    single_object_fraction: float = 0.25
    vocab_size: int = 512
    duplicate_image_fraction: float = 0.05  # train only; see the module docstring

    def validate(self) -> None:
        for name in ("n_train", "n_val", "image_size", "train_shards", "val_shards", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"demo_data: {name} must be > 0, got {getattr(self, name)}")
        if self.captions_per_image not in (1, 2):
            raise ValueError(f"demo_data: captions_per_image must be 1 or 2, got {self.captions_per_image}")
        if self.image_size < 16:
            raise ValueError(f"demo_data: image_size must be >= 16 to draw shapes, got {self.image_size}")
        if not 0.0 <= self.duplicate_image_fraction < 1.0:
            raise ValueError(f"demo_data: duplicate_image_fraction must be in [0, 1), "
                             f"got {self.duplicate_image_fraction}")


@dataclass(frozen=True)
class DemoPaths:
    train: Path
    val: Path
    tokenizer: Path
    built: bool  # False: an existing complete build was reused


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.kind}"


# ---------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if kind == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if kind == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    raise ValueError(kind)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, cx: float, cy: float, r: float) -> None:
    fill = COLOURS[shape.colour]
    if shape.kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape.kind == "square":
        h = 0.85 * r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape.kind == "cross":
        t = 0.33 * r
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape.kind, cx, cy, r), fill=fill)


def _random_shape(rng: random.Random) -> Shape:
    return Shape(rng.choice(SHAPES), rng.choice(sorted(COLOURS)), rng.choice(sorted(SIZES)))


def render_pair(rng: random.Random, image_size: int = 64, captions_per_image: int = 2,
                single_object_fraction: float = 0.25) -> tuple[Image.Image, list[str]]:
    """One random scene: (RGB image of image_size^2, its captions). Uses only `rng`."""
    big = image_size * _SUPERSAMPLE
    shade = rng.randint(215, 250)
    tint = [max(0, min(255, shade + rng.randint(-8, 8))) for _ in range(3)]
    img = Image.new("RGB", (big, big), tuple(tint))
    draw = ImageDraw.Draw(img)
    jitter = 0.04 * big

    def place(shape: Shape, cell: tuple[int, int]) -> None:
        cx = (0.27 + 0.46 * cell[0]) * big + rng.uniform(-jitter, jitter)
        cy = (0.27 + 0.46 * cell[1]) * big + rng.uniform(-jitter, jitter)
        _draw_shape(draw, shape, cx, cy, SIZES[shape.size] * big)

    if rng.random() < single_object_fraction:
        shape = _random_shape(rng)
        where = rng.choice(sorted(CELLS))
        place(shape, CELLS[where])
        captions = [f"a {shape.phrase} in the {where}", f"there is a {shape.phrase} in the {where} corner"]
    else:
        a = _random_shape(rng)
        b = _random_shape(rng)
        while b == a:
            b = _random_shape(rng)
        relation = rng.choice(sorted(RELATIONS))
        # a's cell and b's cell follow from the relation; the free axis is random.
        free = rng.randint(0, 1)
        if relation in ("above", "below"):
            cell_a, cell_b = (free, 0), (free, 1)
        else:
            cell_a, cell_b = (0, free), (1, free)
        if relation in ("below", "right of"):
            cell_a, cell_b = cell_b, cell_a
        place(a, cell_a)
        place(b, cell_b)
        captions = [f"a {a.phrase} {relation} a {b.phrase}", f"a {b.phrase} {RELATIONS[relation]} a {a.phrase}"]
    return img.reduce(_SUPERSAMPLE), captions[:captions_per_image]


# ---------------------------------------------------------------------------------------
# Splits, tokenizer, build
# ---------------------------------------------------------------------------------------


def duplicate_plan(rng: random.Random, n: int, fraction: float) -> dict[int, int]:
    """{copy position: original position} for a split of n images: round(fraction * n)
    copies (at most n - 1), each of a uniformly drawn earlier position that is not a copy.
    Uses only `rng`."""
    k = min(round(fraction * n), n - 1)
    copies = set(rng.sample(range(1, n), k)) if k > 0 else set()
    plan: dict[int, int] = {}
    originals: list[int] = []
    for i in range(n):  # in position order, so the draws do not depend on set order
        if i in copies:
            plan[i] = rng.choice(originals)  # position 0 is never a copy: never empty
        else:
            originals.append(i)
    return plan


def _copy_captions(rng: random.Random, captions: list[str]) -> list[str]:
    """A random non-empty subset of `captions` in random order (all subsets and orders of a
    given size equally likely; sizes uniform)."""
    k = rng.randint(1, len(captions))
    return rng.sample(captions, k)


def _render_split(folder: Path, rng: random.Random, n: int, p: DemoParams,
                  duplicates: dict[int, int] | None = None,
                  dup_rng: random.Random | None = None) -> tuple[Path, list[str]]:
    """Render n pairs as PNGs + a JSONL (list captions) in `folder`; returns (jsonl, all captions).

    `duplicates` ({copy position: original position}, `duplicate_plan`) makes those positions
    pixel copies of their original, with captions drawn from `dup_rng`; originals use `rng`
    only, so the scenes do not depend on where the copies go.
    """
    (folder / "images").mkdir(parents=True)
    duplicates = duplicates or {}
    all_captions: list[str] = []
    lines = []
    scenes: dict[int, tuple[Image.Image, list[str]]] = {}
    keep = set(duplicates.values())  # originals some copy needs later (held in memory: 64x64 each)
    for i in range(n):
        rel = f"images/{i:06d}.png"
        if i in duplicates:
            assert dup_rng is not None
            img, orig_caps = scenes[duplicates[i]]
            caps = _copy_captions(dup_rng, orig_caps)
            # Same pixels, other bytes: a web copy is rarely the same file.
            img.save(folder / rel, format="PNG", compress_level=1)
        else:
            img, caps = render_pair(rng, p.image_size, p.captions_per_image, p.single_object_fraction)
            img.save(folder / rel, format="PNG")
            if i in keep:
                scenes[i] = (img, caps)
        lines.append(json.dumps({"image": rel, "caption": caps}))
        all_captions.extend(caps)
    jsonl = folder / "pairs.jsonl"
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return jsonl, all_captions


def train_tokenizer(captions: Sequence[str], out_dir: str | Path, *, vocab_size: int = 512,
                    model_max_length: int = 64) -> Path:
    """Learn a lower-casing WordPiece vocabulary from `captions`; save it in Hugging Face BERT
    format (tokenizer.json, tokenizer_config.json, vocab.txt) loadable by AutoTokenizer.

    The vocabulary is: special tokens, every character seen and its `##` continuation (so
    any word of those characters tokenises without [UNK]), then the most frequent whole words
    (ties by spelling) up to `vocab_size`. Words are found with the `tokenizers` library's
    BERT normaliser and pre-tokeniser. `tokenizers.trainers.WordPieceTrainer` is not used:
    its merges break ties in hash-map order, so two runs on the same captions give different
    vocabularies, and the demo must be byte-reproducible.

    `model_max_length` is what `truncation=True` alone cuts to. A tokenizer does not know
    the text tower it will feed, so the default is the demo tower's position embeddings
    (configs/demo.yaml: max_position_embeddings 64), not BERT's usual 512: anything longer
    cannot be embedded. Training passes model.text.max_length explicitly, and an export
    rewrites this value to that max_length (moco_mm.search.export).
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    counts: collections.Counter[str] = collections.Counter()
    for caption in captions:
        counts.update(w for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(caption)))
    chars = sorted({ch for word in counts for ch in word})
    base = [*SPECIAL_TOKENS, *chars, *(f"##{ch}" for ch in chars)]
    budget = max(0, vocab_size - len(base))
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1][:budget]
    vocab = {t: i for i, t in enumerate([*base, *sorted(words)])}
    # The standard BERT pipeline (normaliser, pre-tokeniser, [CLS] x [SEP] template, WordPiece
    # decoder) built with `tokenizers` itself: transformers' BertTokenizer constructors differ
    # between 4.x (vocab_file) and 5.x (vocab dict), and 5.x ignores a vocab_file silently.
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = splitter
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece(prefix="##")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                 sep_token="[SEP]", mask_token="[MASK]", model_max_length=model_max_length)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    # vocab.txt as well, for tokenizer loaders that read the classic BERT file.
    ordered = sorted(vocab, key=vocab.__getitem__)
    (out / "vocab.txt").write_text("\n".join(ordered) + "\n", encoding="utf-8")
    return out


def _stamp_payload(p: DemoParams) -> dict:
    return {"version": _BUILD_VERSION, **asdict(p)}


def _is_complete(out: Path, p: DemoParams) -> bool:
    stamp = out / STAMP
    try:
        found = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return found == _stamp_payload(p) and all((out / d).is_dir() for d in ("train", "val", "tokenizer"))


def build_demo(out: str | Path, params: DemoParams | None = None, *, force: bool = False,
               workers: int = 0, progress: bool = False) -> DemoPaths:
    """Build (or reuse) the demo dataset and tokenizer under `out`. See the module docstring."""
    p = params or DemoParams()
    p.validate()
    root = Path(out)
    paths = DemoPaths(root / "train", root / "val", root / "tokenizer", built=True)
    if not force and _is_complete(root, p):
        return DemoPaths(paths.train, paths.val, paths.tokenizer, built=False)
    root.mkdir(parents=True, exist_ok=True)
    (root / STAMP).unlink(missing_ok=True)  # incomplete until the stamp is written again
    splits = (("train", p.n_train, p.train_shards, 0), ("val", p.n_val, p.val_shards, p.n_train))
    train_captions: list[str] = []
    with tempfile.TemporaryDirectory(prefix="demo-render-", dir=root) as tmp:
        for name, n, n_shards, offset in splits:
            rng = random.Random(f"moco_mm.demo_data:{p.seed}:{name}")  # str seeds are stable
            dup_rng = random.Random(f"moco_mm.demo_data:{p.seed}:{name}:duplicates")
            # Train only: see the module docstring (duplicates would blur val retrieval).
            plan = duplicate_plan(dup_rng, n, p.duplicate_image_fraction) if name == "train" else {}
            jsonl, caps = _render_split(Path(tmp) / name, rng, n, p, plan, dup_rng)
            if name == "train":
                train_captions = caps
            shards.write_shards(
                shards.read_rows(jsonl), root / name, samples_per_shard=math.ceil(n / n_shards),
                workers=workers, id_offset=offset, progress=progress, overwrite=True,
                input_label=f"moco_mm.demo_data seed={p.seed} split={name}")
    if paths.tokenizer.exists():
        shutil.rmtree(paths.tokenizer)
    train_tokenizer(train_captions, paths.tokenizer, vocab_size=p.vocab_size)
    stamp_tmp = root / (STAMP + ".tmp")
    stamp_tmp.write_text(json.dumps(_stamp_payload(p), indent=1) + "\n", encoding="utf-8")
    stamp_tmp.replace(root / STAMP)
    return paths
