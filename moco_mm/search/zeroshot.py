"""Zero-shot classification of an export (`moco-mm eval-zeroshot`), CLIP's protocol.

    result = evaluate_zeroshot(Encoder.from_export("exports/demo"), "imagenet/val", "classes.txt")
    result.top1, result.top5, result.mean_per_class, result.per_class

The work is moco_mm.metrics.zeroshot_evaluate (shared with the trainer's eval.zeroshot):
for each class, every template with `{}` replaced by the class name is embedded and
L2-normalised; their mean, L2-normalised again, is the class embedding; an image's logits
are its embedding . each class embedding. The data (an image folder or labelled shards) is
read and checked by moco_mm.data.labeled.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from moco_mm.data import DataError
from moco_mm.data.labeled import LabeledImages, open_labeled
from moco_mm.metrics import (
    TOP5_MIN_CLASSES,
    ZEROSHOT_TEMPLATES,
    ClassList,
    ZeroShotError,
    ZeroShotResult,
    read_classes,
    read_templates,
    zeroshot_evaluate,
)
from moco_mm.search.encoder import Encoder, SearchError
from moco_mm.search.export import ExportError


def prepare(data: str | os.PathLike, classes: str | os.PathLike | ClassList,
            templates: str | os.PathLike | Sequence[str] | None = None
            ) -> tuple[LabeledImages, tuple[str, ...]]:
    """Read and check the classes file, the templates (a file, a list, or None: the default
    seven) and the data against the classes, before anything is embedded."""
    class_list = classes if isinstance(classes, ClassList) else read_classes(classes)
    if templates is None:
        temps = ZEROSHOT_TEMPLATES
    elif isinstance(templates, (str, os.PathLike)):
        temps = read_templates(templates)
    else:
        temps = tuple(templates)
    return open_labeled(data, class_list), temps


def evaluate_zeroshot(encoder: Encoder, data: str | os.PathLike, classes: str | os.PathLike | ClassList,
                      templates: str | os.PathLike | Sequence[str] | None = None, *, batch_size: int = 64,
                      workers: int = 4, progress: bool = False) -> ZeroShotResult:
    """Top-1 / top-5 / per-class accuracy of `encoder` on labelled images (moco_mm.data.labeled).
    Raises ZeroShotError or DataError (naming the file, folder or line) before any compute
    when the inputs do not fit."""
    labeled, temps = prepare(data, classes, templates)
    return evaluate_prepared(encoder, labeled, temps, batch_size=batch_size, workers=workers, progress=progress)


def evaluate_prepared(encoder: Encoder, labeled: LabeledImages, templates: Sequence[str], *, batch_size: int = 64,
                      workers: int = 4, progress: bool = False) -> ZeroShotResult:
    """evaluate_zeroshot on the output of `prepare`."""

    def embed_images(pixels: torch.Tensor) -> torch.Tensor:
        return encoder.image_features(encoder.normalize(pixels))

    def embed_texts(texts: list[str]) -> torch.Tensor:
        return encoder.text_features(*encoder.tokenize(texts))

    result = zeroshot_evaluate(embed_images, embed_texts,
                               labeled.batches(encoder.transform, batch_size, workers=workers),
                               labeled.classes, templates, progress=progress, total=labeled.total)
    result.n_skipped = labeled.n_skipped
    return result


def format_result(result: ZeroShotResult, classes: ClassList, per_class_rows: int | None = None) -> str:
    """A plain-text report: top-1, top-5 (or why not), mean per-class, the per-class table."""
    chance = 100.0 / result.n_classes
    lines = [f"top-1           {result.top1:6.2f} %   (chance {chance:.2f} %)"]
    if result.top5 is not None:
        lines.append(f"top-5           {result.top5:6.2f} %   (chance {min(100.0, 5 * chance):.2f} %)")
    else:
        lines.append(f"top-5              n/a   ({result.n_classes} classes: needs at least {TOP5_MIN_CLASSES})")
    lines.append(f"mean per-class  {result.mean_per_class:6.2f} %")
    names = [_label(classes, i) for i in range(result.n_classes)]
    width = min(40, max(len("class"), *(len(n) for n in names)))
    lines += ["", f"{'class':<{width}}  {'images':>6}  top-1 %"]
    order = range(result.n_classes)
    shown = list(order if per_class_rows is None else order[:per_class_rows])
    for i in shown:
        acc = result.per_class[i]
        lines.append(f"{names[i][:width]:<{width}}  {result.per_class_n[i]:>6}  "
                     f"{'n/a' if acc is None else f'{acc:6.2f}':>7}")
    if len(shown) < result.n_classes:
        lines.append(f"... {result.n_classes - len(shown)} more classes (all in --json)")
    return "\n".join(lines)


def _label(classes: ClassList, i: int) -> str:
    return f"{classes.keys[i]} ({classes.texts[i]})" if classes.keys else classes.texts[i]


def result_json(result: ZeroShotResult, classes: ClassList, templates: Sequence[str], **extra) -> dict:
    per_class = []
    for i, text in enumerate(classes.texts):
        row = {"class": text, "images": result.per_class_n[i], "top1": result.per_class[i]}
        if classes.keys:
            row["folder"] = classes.keys[i]
        per_class.append(row)
    out = {"top1": result.top1, "top5": result.top5, "mean_per_class": result.mean_per_class,
           "chance_top1": 100.0 / result.n_classes, "n_images": result.n_images, "n_classes": result.n_classes,
           "n_templates": result.n_templates, "n_skipped": result.n_skipped}
    if result.top5_note:
        out["top5_note"] = result.top5_note
    return {**out, **extra, "templates": list(templates), "per_class": per_class}


USAGE = """Zero-shot classification of an exported encoder, with CLIP's prompt ensemble.

    moco-mm eval-zeroshot --export EXPORT --data IMAGE_FOLDER|SHARDS --classes classes.txt
        [--templates templates.txt] [--json OUT] [--batch-size 64] [--workers 4] [--no-progress]

Each class's embedding is the L2-normalised mean of the L2-normalised embeddings of every
template with {} replaced by the class name; an image's logits are its embedding times each
class embedding. Prints top-1 and top-5 accuracy (top-5 only with 6 or more classes: with
fewer every class is in the top 5), the mean per-class accuracy and each class's top-1.

--data: an image folder with one sub-folder of images per class (torchvision ImageFolder
layout), or shards whose samples carry the class index as KEY.cls (webdataset /
CLIP_benchmark) or as "label" in KEY.json.
--classes: one class name per line, in sorted sub-folder order (= label index), or
FOLDER<TAB>class name lines; blank lines and lines starting with # are skipped.
--templates: one template per line, each with {} or {c} (CLIP_benchmark's files) where the
class name goes (default: the 7 templates the CLIP authors chose for ImageNet, OpenCLIP's
SIMPLE_IMAGENET_TEMPLATES).
Inputs are checked before anything is embedded. Exit status 0 on success, 2 on an error."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moco-mm eval-zeroshot", description=USAGE,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", required=True, help="export directory (moco-mm export)")
    ap.add_argument("--data", required=True, help="image folder (one sub-folder per class) or labelled shards")
    ap.add_argument("--classes", required=True, help="classes file: names in sorted folder order, or FOLDER<TAB>name")
    ap.add_argument("--templates", default=None, help="templates file, one per line with {} (default: CLIP's 7 "
                    "ImageNet templates)")
    ap.add_argument("--json", default=None, help="write the metrics, per-class accuracies and settings here")
    ap.add_argument("--batch-size", type=int, default=64, help="images per forward")
    ap.add_argument("--workers", type=int, default=4, help="threads decoding images (image folders); 0: none")
    ap.add_argument("--per-class-rows", type=int, default=50, help="per-class rows printed (all go to --json)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        labeled, temps = prepare(args.data, args.classes, args.templates)  # every input checked first
        encoder = Encoder.from_export(args.export)
        result = evaluate_prepared(encoder, labeled, temps, batch_size=args.batch_size, workers=args.workers,
                                   progress=not args.no_progress)
    except (ZeroShotError, DataError, SearchError, ExportError, ValueError) as e:
        print(f"eval_zeroshot: error: {e}", file=sys.stderr)
        return 2
    skipped = f", {result.n_skipped} unreadable skipped" if result.n_skipped else ""
    print(f"{result.n_images} images{skipped}, {result.n_classes} classes, {result.n_templates} templates "
          f"({time.perf_counter() - t0:.1f}s)")
    print(format_result(result, labeled.classes, args.per_class_rows))
    if args.json:
        out = result_json(result, labeled.classes, temps, export=str(Path(args.export).resolve()),
                          model_fingerprint=encoder.fingerprint, data=args.data, classes_file=args.classes,
                          templates_file=args.templates)
        Path(args.json).write_text(json.dumps(out, indent=1, ensure_ascii=False), encoding="utf-8")
    return 0
