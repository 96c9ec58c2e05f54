"""The demo generator: deterministic bytes, disjoint split ids, idempotent, a loadable tokenizer,
and shards the loader can feed 2 ranks x 2 workers from."""

from __future__ import annotations

import json
import random

from transformers import AutoTokenizer

from moco_mm.data import ShardSource, build_transforms, make_loader
from moco_mm.data.demo import COLOURS, SHAPES, DemoParams, build_demo, render_pair

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
