"""Karpathy splits (COCO, Flickr30k): the split JSON -> one shard folder per split, one sample
per image with its captions; its errors; the COCO 5k + 1k-fold and Flickr 1k eval tables.

Everything runs on a hand-made split file in the exact format (a dozen 32x32 PNGs) and a
stub encoder (a fixed random projection), so the whole file takes a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from moco_mm.cli import main as moco_mm
from moco_mm.data import build_transforms
from moco_mm.data import karpathy as K
from moco_mm.data import make_shards as shards
from moco_mm.metrics import retrieval_metrics
from moco_mm.search import SearchError
from moco_mm.search import evaluate as ev
from tests.conftest import CAPTION_WORDS as W
from tests.test_make_shards import read_shards

# (JSON split, number of sentences) per image, in file order. Image 3 has 8 sentences (one
# empty, one duplicate: the first 5 of its 6 distinct ones kept), image 11 has 6, image 6 only
# empty ones, image 9's file is missing.
LAYOUT = [("train", 5), ("restval", 5), ("val", 5), ("train", 8), ("test", 5), ("restval", 5),
          ("val", 5), ("test", 5), ("train", 5), ("test", 5), ("test", 5), ("test", 6)]
EMPTY_CAPTIONS, MISSING = 6, 9


def caption(i: int, j: int) -> str:
    """Distinct per (image, sentence), made of the conftest tokenizer's words."""
    return f"{W[i % 2]} {W[2 + i // 10]} {W[2 + i % 10]} {W[2 + j % 10]} {W[2 + j // 10]}"


def _sentences(i: int, n: int) -> list[dict]:
    raws = [f"  {caption(i, j)}.\n" for j in range(n)]
    if i == 3:  # 8 sentences: an empty one and a duplicate among them -> 6 distinct
        raws[2], raws[4] = "   ", raws[0]
    if i == EMPTY_CAPTIONS:
        raws = [" "] * n
    return [{"raw": r, "tokens": r.split(), "imgid": i, "sentid": 10 * i + j} for j, r in enumerate(raws)]


def expected_captions(i: int) -> list[str]:
    raws = [s["raw"].strip() for s in _sentences(i, LAYOUT[i][1])]
    return list(dict.fromkeys(r for r in raws if r))[:5]


def image_array(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    base = rng.integers(0, 256, 3, dtype=np.uint8)
    noise = rng.integers(-40, 40, (32, 32, 3))
    return np.clip(base[None, None, :].astype(int) + noise, 0, 255).astype(np.uint8)


def write_dataset(root: Path, dataset: str = "coco") -> tuple[Path, Path]:
    """-> (split JSON, image folder) in the Karpathy format of `dataset`."""
    images = root / ("coco" if dataset == "coco" else "flickr30k-images")
    entries = []
    for i, (split, n) in enumerate(LAYOUT):
        sub = "train2014" if split == "train" else "val2014"
        name = f"COCO_{sub}_{i:012d}.png" if dataset == "coco" else f"{1000 + i}.png"
        path = images / sub / name if dataset == "coco" else images / name
        if i != MISSING:
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image_array(i)).save(path, format="PNG")
        entry = {"filename": name, "split": split, "sentences": _sentences(i, n), "imgid": i,
                 "sentids": [10 * i + j for j in range(n)]}
        if dataset == "coco":
            entry.update(filepath=sub, cocoid=500 + i)
        entries.append(entry)
    js = root / f"dataset_{dataset}.json"
    js.write_text(json.dumps({"images": entries, "dataset": dataset}))
    return js, images


def ids_of(split: str, skip=()) -> list[int]:
    return [i for i, (s, _) in enumerate(LAYOUT) if K.SPLIT_OF[s] == split and i not in skip]


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> tuple[Path, Path]:
    """(shard root with train/ val/ test/, image folder), made with the CLI."""
    root = tmp_path_factory.mktemp("karpathy")
    js, images = write_dataset(root, "coco")
    out = root / "shards"
    assert moco_mm(["make-shards", str(js), "--format", "coco-karpathy", "--images", str(images), "--out", str(out),
                    "--samples-per-shard", "2", "--workers", "0", "--no-progress"]) == 0
    return out, images


def test_coco_splits_one_sample_per_image_with_its_captions(coco, capsys):
    out, images = coco
    got = {}
    for split in K.SPLITS:
        manifest, samples = read_shards(out / split)
        got[split] = (manifest, samples)
        assert manifest["rows"] == manifest["samples"] + manifest["merged_rows"] + manifest["skipped"]
        assert manifest["merged_rows"] == 0 and manifest["karpathy"]["split"] == split
        assert manifest["karpathy"]["dataset"] == "coco" and manifest["karpathy"]["max_captions"] == 5
        for s in samples:
            i = s["id"]  # sample_id = position in the JSON's images list
            sub = "train2014" if LAYOUT[i][0] == "train" else "val2014"
            assert s["source"] == f"{sub}/COCO_{sub}_{i:012d}.png"
            assert s["captions"] == expected_captions(i)
            assert s["raw"] == (images / s["source"]).read_bytes()  # PNG kept as it is
    train, val, test = (got[s] for s in K.SPLITS)
    # restval folded into train, in file order; image 3: 6 distinct sentences -> 5 kept, 1 dropped.
    assert [s["id"] for s in train[1]] == ids_of("train") == [0, 1, 3, 5, 8]
    assert train[0]["karpathy"]["json_splits"] == {"train": 3, "restval": 2}
    assert train[0]["karpathy"]["captions_dropped"] == 1 and len(expected_captions(3)) == 5
    assert train[0]["shard_samples"] == [2, 2, 1]
    # Only empty sentences: skipped like any bad row.
    assert [s["id"] for s in val[1]] == [2]
    assert [(r["sample_id"], r["reason"]) for r in val[0]["skipped_rows"]] == [(EMPTY_CAPTIONS, "empty caption")]
    # A missing image file: skipped and counted; its neighbours keep their order.
    assert [s["id"] for s in test[1]] == ids_of("test", skip=(MISSING,)) == [4, 7, 10, 11]
    assert test[0]["skipped"] == 1 and "missing file" in test[0]["skipped_rows"][0]["reason"]
    assert test[0]["skipped_rows"][0]["sample_id"] == MISSING
    assert [len(s["captions"]) for s in test[1]] == [5, 5, 5, 5]  # image 11 has 6: first 5 kept
    assert (test[0]["eval_protocol"], train[0]["eval_protocol"], val[0]["eval_protocol"]) == (
        "coco-5k-1k", "plain", "plain")
    # The same split file again without --overwrite: refused before anything is written.
    capsys.readouterr()
    js = out.parent / "dataset_coco.json"
    before = (out / "test" / "manifest.json").read_bytes()
    assert moco_mm(["make-shards", str(js), "--format", "coco-karpathy", "--images", str(images),
                    "--out", str(out), "--workers", "0", "--no-progress"]) == 2
    assert "already holds shards" in capsys.readouterr().err
    assert (out / "test" / "manifest.json").read_bytes() == before


def test_flickr30k_one_split(tmp_path):
    js, images = write_dataset(tmp_path, "flickr30k")
    out = tmp_path / "f30k"
    manifests = K.make_karpathy_shards(js, out, "flickr30k-karpathy", images=images, splits=["test"], workers=0)
    assert list(manifests) == ["test"] and sorted(p.name for p in out.iterdir()) == ["test"]
    manifest, samples = read_shards(out / "test")
    assert manifest["eval_protocol"] == "flickr-1k" and manifest["karpathy"]["dataset"] == "flickr30k"
    assert [(s["id"], s["source"]) for s in samples] == [(i, f"{1000 + i}.png") for i in ids_of("test", (MISSING,))]
    assert K.read_eval_protocol(out / "test") == "flickr-1k" == K.read_eval_protocol(out / "test" / "manifest.json")
    assert K.read_eval_protocol(out / "test" / "shard-000000.tar") is None


def _coco_entry(**over) -> dict:
    e = {"filepath": "val2014", "filename": "a.png", "split": "test", "sentences": [{"raw": "a cat"}]}
    e.update(over)
    return {k: v for k, v in e.items() if v is not None}


@pytest.mark.parametrize("content, fmt, message", [
    ("{not json", "coco-karpathy", "not a JSON file"),
    ("[]", "coco-karpathy", "missing the top-level 'images' list"),
    ({"dataset": "coco", "annotations": []}, "coco-karpathy", "missing the top-level 'images' list"),
    ({"dataset": "coco", "images": []}, "coco-karpathy", "the 'images' list is empty"),
    ({"dataset": "flickr30k", "images": [_coco_entry()]}, "coco-karpathy",
     "'dataset' is 'flickr30k' but --format coco-karpathy expects 'coco' (use --format flickr30k-karpathy)"),
    ({"images": [_coco_entry(filepath=None)]}, "coco-karpathy", "images[0] has no 'filepath'"),
    ({"images": [_coco_entry(), _coco_entry(sentences=None, filename=None)]}, "coco-karpathy",
     "images[1] has no 'filename', 'sentences'"),
    ({"images": [_coco_entry(split="trainval")]}, "coco-karpathy", "images[0]: unknown split 'trainval'"),
    ({"images": [_coco_entry(sentences=[{"raw": "x"}, {"tokens": ["x"]}])]}, "flickr30k-karpathy",
     "images[0].sentences[1] has no 'raw'"),
    ({"images": ["a.png"]}, "flickr30k-karpathy", "images[0] is a str"),
    ({"images": [_coco_entry(filename="")]}, "coco-karpathy", "'filename' must be a non-empty string"),
])
def test_not_a_split_file_is_refused_naming_file_and_what_is_missing(tmp_path, content, fmt, message):
    js = tmp_path / "dataset.json"
    js.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(shards.InputError) as e:
        K.make_karpathy_shards(js, tmp_path / "out", fmt, workers=0)
    assert str(js) in str(e.value) and message in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()


def test_cli_errors(tmp_path, capsys):
    js = tmp_path / "dataset_coco.json"
    js.write_text(json.dumps({"images": [_coco_entry(filepath=None)]}))
    assert moco_mm(["make-shards", str(js), "--format", "coco-karpathy", "--out", str(tmp_path / "o"),
                    "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{js}: images[0] has no 'filepath'" in err
    # A split JSON without --format says which --format it needs.
    assert moco_mm(["make-shards", str(js), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "--format coco-karpathy" in capsys.readouterr().err
    assert moco_mm(["make-shards", str(js), "--format", "coco-karpathy", "--splits", "test,dev",
                    "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "choose among train, val, test" in capsys.readouterr().err
    assert moco_mm(["make-shards", str(js), "--format", "coco-karpathy", "--images", str(tmp_path / "nope"),
                    "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "nope: no such folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# Protocol tables
# ---------------------------------------------------------------------------------------


def _embeddings(n_img: int, seed: int = 0):
    """Random unit embeddings; image i owns 3 + i % 3 captions (the folds must slice by owner)."""
    g = torch.Generator().manual_seed(seed)
    owner = torch.tensor([i for i in range(n_img) for _ in range(3 + i % 3)])
    img = F.normalize(torch.randn(n_img, 8, generator=g), dim=-1)
    txt = F.normalize(img[owner] + 0.9 * torch.randn(len(owner), 8, generator=g), dim=-1)
    return img, txt, owner


def _close(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-9), k


def test_coco_folds_are_retrieval_metrics_of_each_fold_averaged():
    img, txt, owner = _embeddings(10)
    report = ev.protocol_tables(img, txt, owner, "coco-5k-1k", fold_size=2)
    assert list(report.tables) == ["coco-5k", "coco-1k"] and len(report.folds) == 5
    whole = retrieval_metrics(img @ txt.t(), owner)
    _close({k: report.tables["coco-5k"][k] for k in whole}, whole)
    by_hand = []
    for f in range(5):
        caps = [j for j in range(len(owner)) if 2 * f <= owner[j] < 2 * f + 2]
        m = retrieval_metrics(img[2 * f: 2 * f + 2] @ txt[caps].t(), owner[caps] - 2 * f)
        _close({k: report.folds[f][k] for k in m}, m)
        assert report.folds[f]["n_captions"] == len(caps)
        by_hand.append(m)
    mean = report.tables["coco-1k"]
    for k in whole:
        assert mean[k] == pytest.approx(np.mean([m[k] for m in by_hand]), abs=1e-9), k
    for t in (*report.tables.values(), *report.folds):
        assert t["rsum"] == pytest.approx(sum(t[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))
    assert (mean["n_folds"], mean["fold_size"]) == (5, 2)
    # The folds are easier than the whole set (fewer candidates), as with COCO 1k vs 5k.
    assert mean["rsum"] > report.tables["coco-5k"]["rsum"]
    assert len(report.warnings) == 1 and "5000 images, this one 10" in report.warnings[0]


def test_protocol_edge_cases():
    img, txt, owner = _embeddings(11)
    report = ev.protocol_tables(img, txt, owner, "coco-5k-1k", fold_size=2)
    assert report.tables["coco-1k"]["n_folds"] == 5 and any("last 1 images are in no fold" in w
                                                            for w in report.warnings)
    with pytest.raises(SearchError, match="fewer than one fold"):
        ev.protocol_tables(img[:1], txt[:3], owner[:3], "coco-5k-1k", fold_size=2)
    flickr = ev.protocol_tables(img, txt, owner, "flickr-1k")
    plain = ev.protocol_tables(img, txt, owner)
    assert list(flickr.tables) == ["flickr-1k"] and list(plain.tables) == ["all"] and not plain.warnings
    _close(flickr.whole, plain.whole)
    assert "1000 images, this one 11" in flickr.warnings[0]
    with pytest.raises(ValueError, match="choose one of"):
        ev.protocol_tables(img, txt, owner, "coco")


# ---------------------------------------------------------------------------------------
# From shards, through an encoder and the CLI
# ---------------------------------------------------------------------------------------


class StubEncoder:
    """What evaluate needs of an Encoder: fixed random projections of pixels and tokens."""

    def __init__(self, tokenizer):
        self.transform = build_transforms(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), train=False)
        self.tokenizer, self.max_length, self.fingerprint, self.root = tokenizer, 10, "stub", None
        g = torch.Generator().manual_seed(0)
        self.proj = torch.randn(3 * 16 * 16, 8, generator=g)
        self.emb = torch.randn(len(tokenizer), 8, generator=g)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.transform.normalize(pixels)

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.flatten(1) @ self.proj, dim=-1)

    def text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.normalize((self.emb[ids] * mask[..., None]).sum(1), dim=-1)


def test_eval_on_test_split_matches_tables_from_the_source_files(coco, tokenizer):
    """The shards' order and caption owners are the JSON's: tables from embedding the
    original PNGs and JSON captions directly are the same numbers."""
    out, images = coco
    enc = StubEncoder(tokenizer)
    report = ev.evaluate_protocol(enc, out / "test", fold_size=2, batch_size=3)  # auto -> the manifest's
    assert report.protocol == "coco-5k-1k" and list(report.tables) == ["coco-5k", "coco-1k"]
    ids = ids_of("test", skip=(MISSING,))
    pix = torch.stack([enc.transform(Image.open(images / "val2014" / f"COCO_val2014_{i:012d}.png").convert("RGB"))
                       for i in ids])
    caps = [c for i in ids for c in expected_captions(i)]
    tok = tokenizer(caps, padding="max_length", truncation=True, max_length=enc.max_length, return_tensors="pt")
    want = ev.protocol_tables(enc.image_features(enc.normalize(pix)), enc.text_features(
        tok["input_ids"], tok["attention_mask"]), torch.arange(len(ids)).repeat_interleave(5), "coco-5k-1k",
        fold_size=2)
    for name in want.tables:
        _close(report.tables[name], want.tables[name])
    assert report.whole["n_images"] == 4 and report.whole["n_captions"] == 20
    # plain / --max-samples: one table of everything asked for.
    assert list(ev.evaluate_protocol(enc, out / "test", "plain").tables) == ["all"]
    assert ev.evaluate_protocol(enc, out / "test" / "manifest.json", max_samples=2).whole["n_images"] == 2
    assert ev.resolve_protocol("auto", out / "train") == "plain"


def test_eval_cli_reports_both_coco_tables(coco, tokenizer, tmp_path, monkeypatch, capsys):
    from moco_mm import search

    out, _ = coco
    enc = StubEncoder(tokenizer)
    monkeypatch.setattr(search.Encoder, "from_export", classmethod(lambda cls, root, **kw: enc))
    js = tmp_path / "eval.json"
    assert moco_mm(["eval-retrieval", "--export", str(tmp_path), "--data", str(out / "test" / "manifest.json"),
                    "--fold-size", "2", "--json", str(js), "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert "coco-5k: 4 images, 20 captions" in cap.out and "coco-1k: mean over 2 folds of 2 images" in cap.out
    assert cap.out.count("rsum") == 2 and "the standard test set has 5000 images" in cap.err
    m = json.loads(js.read_text())
    assert m["protocol"] == "coco-5k-1k" and list(m["tables"]) == ["coco-5k", "coco-1k"] and len(m["folds"]) == 2
    assert m["i2t_R@1"] == m["tables"]["coco-5k"]["i2t_R@1"] and m["rsum"] == m["tables"]["coco-5k"]["rsum"]
    assert m["chance_t2i_R@1"] == 25.0 and m["warnings"]
    # Too few images for one fold: a clear error, exit status 2.
    assert moco_mm(["eval-retrieval", "--export", str(tmp_path), "--data", str(out / "test"),
                    "--no-progress"]) == 2
    assert "fewer than one fold of 1000" in capsys.readouterr().err
    assert moco_mm(["eval-retrieval", "--export", str(tmp_path), "--data", str(out / "test"), "--protocol",
                    "flickr-1k", "--no-progress"]) == 0
    assert "flickr-1k: 4 images, 20 captions" in capsys.readouterr().out
