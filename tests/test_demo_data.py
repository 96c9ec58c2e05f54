"""The demo generator: deterministic bytes, disjoint split ids, idempotent, a loadable tokenizer,
shards the loader can feed 2 ranks x 2 workers from, and exact duplicate images in train only."""

from __future__ import annotations

import collections
import json
import random

from transformers import AutoTokenizer

from moco_mm.data import ShardSource, build_transforms, make_loader
from moco_mm.data import make_shards as shards
from moco_mm.data.demo import COLOURS, SHAPES, DemoParams, build_demo, duplicate_plan, render_pair
from moco_mm.data.fingerprints import image_fingerprint

SMALL = DemoParams(seed=3, n_train=48, n_val=16, image_size=32, train_shards=4, val_shards=2)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_is_deterministic_and_idempotent(tmp_path):
    a = build_demo(tmp_path / "a", SMALL)
    b = build_demo(tmp_path / "b", SMALL)
    assert a.built and b.built
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    shard_files = [f for f in files_a if f.endswith(".tar")]
    assert len(shard_files) == 6 and set(files_a) == set(files_b)
    for name in files_a:
        if name.endswith((".tar", "manifest.json", "vocab.txt", "demo_build.json")):
            assert files_a[name] == files_b[name], name

    train = json.loads((a.train / "manifest.json").read_text())
    val = json.loads((a.val / "manifest.json").read_text())
    assert train["samples"] == 48 and train["shard_samples"] == [12] * 4 and train["skipped"] == 0
    assert val["samples"] == 16 and val["id_offset"] == 48  # held-out ids follow train's

    # A second call with the same parameters keeps the build; other parameters rebuild it.
    mtime = (a.train / "shard-000000.tar").stat().st_mtime_ns
    assert not build_demo(tmp_path / "a", SMALL).built
    assert (a.train / "shard-000000.tar").stat().st_mtime_ns == mtime
    other = DemoParams(**{**SMALL.__dict__, "seed": 4})
    assert build_demo(tmp_path / "a", other).built
    assert (a.train / "shard-000000.tar").read_bytes() != files_b["train/shard-000000.tar"]


def test_tokenizer_round_trips_and_loader_reads_the_demo(tmp_path):
    paths = build_demo(tmp_path, SMALL)
    tok = AutoTokenizer.from_pretrained(str(paths.tokenizer))
    caption = "a large red circle above a small blue square"
    ids = tok(caption)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == caption

    source = ShardSource.from_spec(paths.train)
    transform = build_transforms(32, (0.5,) * 3, (0.5,) * 3, train=True)
    seen = []
    for rank in (0, 1):
        loader = make_loader(source, batch_size=4, tokenizer=tok, max_length=16, transform=transform,
                             seed=0, epoch=0, rank=rank, world_size=2, workers=2, shuffle_buffer=8)
        batches = list(loader)
        assert len(batches) == len(loader) == 6
        seen += [i for b in batches for i in b["sample_id"].tolist()]
        for b in batches:
            assert b["fingerprints"].shape == (4, 3) and (b["fingerprints"][:, :2] >= 0).all()
            assert (b["fingerprints"][:, 2] == -1).all()  # the demo has no groups
    assert sorted(seen) == list(range(48))  # 4 shards of 12 over 4 readers: nothing dropped


def test_captions_describe_the_scene():
    rng = random.Random(0)
    for _ in range(50):
        img, captions = render_pair(rng, 64, 2)
        assert img.size == (64, 64) and img.mode == "RGB" and len(captions) == 2
        for c in captions:
            words = c.split()
            assert any(s in words for s in SHAPES) and any(k in words for k in COLOURS)
            assert "small" in words or "large" in words


def _samples(split_dir):
    """sample_id -> (KEY.json, stored image bytes, decoded RGB) of every sample of a split."""
    manifest = json.loads((split_dir / "manifest.json").read_text())
    out = {}
    for shard in manifest["shards"]:
        groups = collections.defaultdict(dict)
        for name, data in shards.iter_shard_members(split_dir / shard):
            key, ext = name.split(".", 1)
            groups[key][ext] = data
        for members in groups.values():
            meta = json.loads(members["json"])
            out[meta["sample_id"]] = (meta, members["png"], shards.to_rgb(shards.decode_image(members["png"])))
    return out


def test_train_has_duplicate_images_under_other_ids_and_val_has_none(tmp_path):
    paths = build_demo(tmp_path, SMALL)
    train = _samples(paths.train)
    by_fp = collections.defaultdict(list)
    for sid, (meta, _, rgb) in train.items():
        assert meta["image_fp"] == image_fingerprint(rgb)  # the fingerprint of the stored pixels
        by_fp[meta["image_fp"]].append(sid)
    dup_sets = [sorted(ids) for ids in by_fp.values() if len(ids) > 1]
    n_copies = sum(len(ids) - 1 for ids in dup_sets)
    assert n_copies == round(SMALL.duplicate_image_fraction * SMALL.n_train) == 2
    for original, *copies in dup_sets:
        meta, raw, rgb = train[original]
        for c in copies:
            c_meta, c_raw, c_rgb = train[c]
            assert c != original and c_raw != raw  # another sample, another file: same pixels
            assert c_rgb.tobytes() == rgb.tobytes() and c_meta["image_fp"] == meta["image_fp"]
            assert c_meta["captions"] and set(c_meta["captions"]) <= set(meta["captions"])
    val = _samples(paths.val)
    assert len({m["image_fp"] for m, _, _ in val.values()}) == len(val)  # no duplicates in val

    # No copies when asked for none; the plan itself is a pure function of its rng.
    none = build_demo(tmp_path / "none", DemoParams(**{**SMALL.__dict__, "duplicate_image_fraction": 0.0}))
    assert len({m["image_fp"] for m, _, _ in _samples(none.train).values()}) == SMALL.n_train
    plan = duplicate_plan(random.Random(1), 1000, 0.05)
    assert plan == duplicate_plan(random.Random(1), 1000, 0.05) and len(plan) == 50
    assert all(orig < copy and orig not in plan for copy, orig in plan.items())
