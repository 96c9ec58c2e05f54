"""Retrieval metrics with several captions per image (the Flickr30k / COCO protocol), and
zero-shot classification (CLIP's prompt ensemble; at the end of this file).

    sim [N_img, N_txt]: similarity of image i and caption j
    txt_to_img [N_txt]: index of caption j's own image

image->text: an image query hits at k when ANY of its captions ranks in its top k; its
rank is that of its best-ranked caption. text->image: each caption has exactly one image.
Ranks are 1-based; ties are broken against the query (a tie counts as ranked below);
the median rank of an even count is the lower middle value (torch.median).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

KS = (1, 5, 10)


def retrieval_metrics(sim: torch.Tensor, txt_to_img: torch.Tensor, ks=KS) -> dict[str, float]:
    """-> {"i2t_R@1", ..., "i2t_medr", "t2i_R@1", ..., "t2i_medr"} (recalls in percent)."""
    sim = sim.float()
    n_img, n_txt = sim.shape
    txt_to_img = txt_to_img.long()
    if txt_to_img.shape != (n_txt,):
        raise ValueError(f"txt_to_img must be [{n_txt}], got {tuple(txt_to_img.shape)}")
    own = torch.zeros(n_img, n_txt, dtype=torch.bool)
    own[txt_to_img, torch.arange(n_txt)] = True

    # image -> text: rank of the best own caption = 1 + #captions scoring strictly above
    # it, + #other captions tied with it (ties count against the query).
    best_own = sim.masked_fill(~own, float("-inf")).max(dim=1).values  # [n_img]
    higher = (sim > best_own[:, None]) | ((sim == best_own[:, None]) & ~own)
    i2t_rank = 1 + higher.sum(dim=1)

    # text -> image: 1 + #images scoring above (or tied with) the caption's own image.
    sim_t = sim.t()  # [n_txt, n_img]
    own_score = sim_t[torch.arange(n_txt), txt_to_img]
    others = torch.ones_like(sim_t, dtype=torch.bool)
    others[torch.arange(n_txt), txt_to_img] = False
    t2i_rank = 1 + ((sim_t > own_score[:, None]) | ((sim_t == own_score[:, None]) & others)).sum(dim=1)

    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        for k in ks:
            out[f"{name}_R@{k}"] = 100.0 * (ranks <= k).float().mean().item()
        out[f"{name}_medr"] = float(ranks.float().median().item())
    return out


def format_table(m: dict[str, float], ks=KS) -> str:
    """A small plain-text table of `retrieval_metrics` output."""
    head = "direction    " + "  ".join(f"R@{k:<5}" for k in ks) + "  medr"
    rows = [head]
    for name, label in (("i2t", "image->text"), ("t2i", "text->image")):
        vals = "  ".join(f"{m[f'{name}_R@{k}']:6.2f}" for k in ks)
        rows.append(f"{label:<12} {vals}  {m[f'{name}_medr']:.0f}")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------
# Zero-shot classification: CLIP's prompt-ensemble protocol
# ---------------------------------------------------------------------------------------
#
# One implementation for `moco-mm eval-zeroshot` (an export's Encoder) and the trainer's
# `eval.zeroshot` (its query towers): both pass an "embed images" and an "embed texts"
# callable. Reading labelled images (an image folder or shards) is moco_mm.data.labeled.

# The seven prompts the CLIP authors selected for ImageNet in their prompt-engineering
# notebook (OpenCLIP calls the same seven SIMPLE_IMAGENET_TEMPLATES), so numbers compare
# with theirs. A templates file replaces them (e.g. the paper's 80 ImageNet prompts, or
# prompts that suit the data better).
ZEROSHOT_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
TOP5_MIN_CLASSES = 6  # with 5 classes or fewer every image's class is in its top 5


class ZeroShotError(ValueError):
    """A classes or templates file, or the labelled data against it, cannot be used. The
    message names the file (and line)."""


@dataclass(frozen=True)
class ClassList:
    """The classes of a zero-shot task, in label order.

    texts: what replaces `{}` in each template ("golden retriever").
    keys:  the label names of the FOLDER<TAB>text form (image-folder names, string labels),
           None for the one-name-per-line form (labels are indices into `texts`).
    lines: the line of each class in `path` (for error messages).
    """

    path: str
    texts: tuple[str, ...]
    keys: tuple[str, ...] | None = None
    lines: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def from_names(cls, names: Sequence[str]) -> "ClassList":
        return cls("<list>", tuple(names), None, tuple(range(1, len(names) + 1)))

    def where(self, i: int) -> str:
        """'classes.txt:12' for class i."""
        return f"{self.path}:{self.lines[i]}" if self.lines else self.path


def _content_lines(path: str | Path, what: str) -> list[tuple[int, str]]:
    """(line number, line) of every line that is not blank or a '#' comment."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ZeroShotError(f"{path}: no such {what} file") from None
    except UnicodeDecodeError as e:
        raise ZeroShotError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise ZeroShotError(f"{path}: unreadable {what} file: {e}") from None
    return [(n, line) for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")]


def read_classes(path: str | Path) -> ClassList:
    """Read a classes file. Blank lines and lines starting with '#' are skipped; every other
    line is one class, in one of two forms (the whole file in the same one):

        golden retriever             the class text; labels are line order (0, 1, ...): an
                                     image folder's sub-folders in sorted order, a shard's
                                     integer label
        n02099601<TAB>golden retriever   FOLDER (the label name) and the class text

    Raises ZeroShotError naming the file and line: empty file, fewer than 2 classes, forms
    mixed, an empty name, a repeated folder or class text (two classes with one text are
    indistinguishable).
    """
    rows = _content_lines(path, "classes")
    if not rows:
        raise ZeroShotError(f"{path}: no classes (one class name per line, or FOLDER<TAB>class name)")
    tabbed = "\t" in rows[0][1]
    keys: list[str] = []
    texts: list[str] = []
    for n, line in rows:
        if ("\t" in line) != tabbed:
            raise ZeroShotError(
                f"{path}:{n}: {'no' if tabbed else 'a'} TAB, unlike line {rows[0][0]}: either every line is "
                f"FOLDER<TAB>class name or none is")
        if tabbed:
            key, text = (s.strip() for s in line.split("\t", 1))
            if not key or not text:
                raise ZeroShotError(f"{path}:{n}: expected FOLDER<TAB>class name, got {line!r}")
            keys.append(key)
        else:
            text = line.strip()
        texts.append(text)
    lines = tuple(n for n, _ in rows)
    for what, values in (("folder", keys), ("class name", texts)):
        first: dict[str, int] = {}
        for n, v in zip(lines, values):
            if v in first:
                raise ZeroShotError(f"{path}:{n}: {what} {v!r} again (first on line {first[v]}); "
                                    f"every class needs its own")
            first[v] = n
    if len(texts) < 2:
        raise ZeroShotError(f"{path}: only 1 class; zero-shot classification needs at least 2")
    return ClassList(str(path), tuple(texts), tuple(keys) if tabbed else None, lines)


def check_templates(templates: Sequence[str], where: Sequence[str] | None = None) -> None:
    """Every template must hold `{}` (where the class name goes; CLIP_benchmark's `{c}` is
    read the same). Raises ZeroShotError; `where[i]` names template i (a file:line), else
    its position."""
    if isinstance(templates, str):
        raise TypeError("templates: a list of strings, not one string")
    if not templates:
        raise ZeroShotError("no templates: give at least one, such as 'a photo of a {}.'")
    for i, t in enumerate(templates):
        if "{}" not in t and "{c}" not in t:
            at = where[i] if where else f"template {i + 1}"
            raise ZeroShotError(f"{at}: template {t!r} has no {{}} where the class name goes "
                                f"(e.g. 'a photo of a {{}}.')")


def read_templates(path: str | Path) -> tuple[str, ...]:
    """One template per line, each with `{}` (or CLIP_benchmark's `{c}`) where the class name
    goes (every occurrence is replaced); blank lines and lines starting with '#' are skipped. Raises ZeroShotError
    naming the file and line."""
    rows = _content_lines(path, "templates")
    if not rows:
        raise ZeroShotError(f"{path}: no templates (one per line, e.g. 'a photo of a {{}}.')")
    templates = tuple(line.strip() for _, line in rows)
    check_templates(templates, [f"{path}:{n}" for n, _ in rows])
    return templates


def fill_template(template: str, class_text: str) -> str:
    """'a photo of a {}.' -> 'a photo of a dog.' (every `{}` and `{c}` replaced; other braces kept)."""
    return template.replace("{}", class_text).replace("{c}", class_text)


def zeroshot_classifier(embed_texts: Callable[[list[str]], Any], class_texts: Sequence[str],
                        templates: Sequence[str] = ZEROSHOT_TEMPLATES, *, batch_size: int = 256,
                        progress: bool = False) -> torch.Tensor:
    """CLIP's prompt ensemble -> float32 [C, D] on the CPU, unit rows. Row c is
    normalize(mean over templates t of normalize(embed_texts(t with {} -> class c))).

    `embed_texts(list of M strings)` -> [M, D] (torch or numpy; any dtype or device). It is
    called with whole classes, about `batch_size` prompts at a time."""
    check_templates(templates)
    n_t = len(templates)
    per_call = max(1, batch_size // n_t)
    starts: Iterable[int] = range(0, len(class_texts), per_call)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="embedding class prompts", unit="batch")
    rows = []
    for s in starts:
        prompts = [fill_template(t, c) for c in class_texts[s:s + per_call] for t in templates]
        emb = torch.as_tensor(embed_texts(prompts)).float().cpu()
        if emb.ndim != 2 or emb.shape[0] != len(prompts):
            raise ValueError(f"embed_texts returned {tuple(emb.shape)} for {len(prompts)} prompts")
        emb = torch.nn.functional.normalize(emb, dim=-1).reshape(-1, n_t, emb.shape[1]).mean(dim=1)
        rows.append(torch.nn.functional.normalize(emb, dim=-1))
    return torch.cat(rows)


def class_ranks(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [N, C], labels [N] -> int64 [N]: 1 + the number of other classes scoring at
    least as high as the true class (ties count against the image, as in retrieval_metrics)."""
    logits = logits.float()
    own = logits.gather(1, labels.long()[:, None])
    return (logits >= own).sum(dim=1)


@dataclass
class ZeroShotResult:
    """Zero-shot classification of n_images images into n_classes classes (percentages).

    top5 is None with fewer than TOP5_MIN_CLASSES classes (it would be 100 % by construction).
    per_class[c]: top-1 accuracy of the images of class c (None for a class without images);
    mean_per_class: their mean over classes with images (CLIP_benchmark's
    "mean_per_class_recall", times 100).
    """

    n_images: int
    n_classes: int
    top1: float
    top5: float | None
    mean_per_class: float
    per_class: list[float | None]
    per_class_n: list[int]
    n_templates: int = 0
    n_skipped: int = 0  # unreadable images left out (set by the caller that read them)

    @property
    def top5_note(self) -> str | None:
        if self.top5 is not None:
            return None
        return (f"top-5 not reported: with {self.n_classes} classes every image's class is in its top 5 "
                f"(top-5 needs at least {TOP5_MIN_CLASSES} classes)")

    def metrics(self, prefix: str = "zeroshot_") -> dict[str, float]:
        """The summary as flat floats (what the trainer logs as eval/zeroshot_*)."""
        out = {f"{prefix}top1": self.top1}
        if self.top5 is not None:
            out[f"{prefix}top5"] = self.top5
        out[f"{prefix}mean_per_class"] = self.mean_per_class
        out[f"{prefix}n_images"] = float(self.n_images)
        return out


def classification_metrics(ranks: torch.Tensor, labels: torch.Tensor, n_classes: int, *,
                           n_templates: int = 0, n_skipped: int = 0) -> ZeroShotResult:
    """ranks [N] (class_ranks), labels [N] in [0, n_classes) -> ZeroShotResult."""
    ranks, labels = ranks.long(), labels.long()
    if ranks.shape != labels.shape or ranks.ndim != 1 or len(ranks) == 0:
        raise ValueError(f"ranks and labels must be equal non-empty [N], got {tuple(ranks.shape)} "
                         f"and {tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
        raise ValueError(f"labels must be in [0, {n_classes}), got {int(labels.min())}..{int(labels.max())}")
    hit1 = (ranks == 1).double()
    n = torch.bincount(labels, minlength=n_classes)
    correct = torch.bincount(labels, weights=hit1, minlength=n_classes)
    per_class = [100.0 * float(c) / int(k) if k else None for c, k in zip(correct.tolist(), n.tolist())]
    seen = [a for a in per_class if a is not None]
    return ZeroShotResult(
        n_images=len(ranks), n_classes=n_classes, top1=100.0 * float(hit1.mean()),
        top5=100.0 * float((ranks <= 5).double().mean()) if n_classes >= TOP5_MIN_CLASSES else None,
        mean_per_class=sum(seen) / len(seen), per_class=per_class, per_class_n=n.tolist(),
        n_templates=n_templates, n_skipped=n_skipped)


def zeroshot_evaluate(embed_images: Callable[[Any], Any], embed_texts: Callable[[list[str]], Any],
                      batches: Iterable[dict], classes: ClassList | Sequence[str],
                      templates: Sequence[str] = ZEROSHOT_TEMPLATES, *, text_batch_size: int = 256,
                      progress: bool = False, total: int | None = None,
                      gather: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
                      ) -> ZeroShotResult:
    """Zero-shot classification with CLIP's prompt ensemble (see zeroshot_classifier).

    batches: dicts with "image" (whatever `embed_images` takes, e.g. uint8 [b,3,S,S]) and
    "label" int64 [b] (class indices); moco_mm.data.labeled yields these. `embed_images(batch["image"])` -> [b, D].
    logits = normalize(image embedding) . class embedding; -> ZeroShotResult.
    gather: when `batches` is one rank's share of the images, (ranks [n], labels [n]) of this
    share -> those of every share (the trainer passes moco_mm.distributed.all_gather_varlen);
    the metrics are sums of per-image integers, so the order of the images does not matter.
    """
    texts = classes.texts if isinstance(classes, ClassList) else tuple(classes)
    weights = zeroshot_classifier(embed_texts, texts, templates, batch_size=text_batch_size, progress=progress)
    ranks, labels = [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="classifying images", unit="img")
    try:
        for batch in batches:
            img = torch.as_tensor(embed_images(batch["image"])).float().cpu()
            img = torch.nn.functional.normalize(img, dim=-1)
            label = torch.as_tensor(batch["label"]).long()
            ranks.append(class_ranks(img @ weights.t(), label))
            labels.append(label)
            if bar is not None:
                bar.update(len(label))
    finally:
        if bar is not None:
            bar.close()
    all_ranks = torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.int64)
    all_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
    if gather is not None:
        all_ranks, all_labels = gather(all_ranks, all_labels)
    if not len(all_ranks):
        raise ZeroShotError("no image to classify")
    return classification_metrics(all_ranks, all_labels, len(texts), n_templates=len(templates))
