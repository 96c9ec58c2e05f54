"""The training loader: exact content (fingerprints included), equal steps on every rank, exact
resume (also across a corrupt sample), a clear error instead of a hang, and the eval iterator."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moco_mm.data import (
    DataError,
    LoaderState,
    ShardSource,
    build_transforms,
    decode_sample,
    iter_eval_batches,
    iter_raw_samples,
    make_loader,
    steps_per_epoch,
)
from moco_mm.data import make_shards as shards
from moco_mm.data.fingerprints import bytes_fingerprint, group_fingerprint, image_fingerprint, text_fingerprint
from moco_mm.data.samples import _BadSample

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
L = 12  # max_length
SIZE = 8  # image side


def caption_for(sample_id: int, variant: int = 0) -> str:
    """Spells the id in words (all in the conftest tokenizer's vocabulary)."""
    return f"{('photo', 'picture')[variant]} " + " ".join(DIGITS[int(d)] for d in str(sample_id))


def colour_for(sample_id: int) -> tuple[int, int, int]:
    """A solid colour naming the sample: any crop of the image keeps it."""
    return ((sample_id * 37) % 256, (sample_id * 91 + 50) % 256, (sample_id * 53 + 100) % 256)


def png_for(sample_id: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (SIZE + 3, SIZE), colour_for(sample_id)).save(out, format="PNG")
    return out.getvalue()


def group_for(sample_id: int) -> str | int | None:
    """The group make_shard_dir(groups=True) gives a sample: a string, an int or none."""
    return (None, f"query {sample_id % 4}", sample_id % 5)[sample_id % 3]


def members_for(sample_id: int, n_captions: int = 1, group: bool = False) -> dict[str, bytes]:
    """A sample as a shard written before make_shards stored `image_fp` (so the loader
    fingerprints the PNG bytes); with `group`, KEY.json carries group_for(sample_id)."""
    captions = [caption_for(sample_id, v) for v in range(n_captions)]
    meta = {"sample_id": sample_id, "captions": captions, "source": f"{sample_id}.png"}
    if group and group_for(sample_id) is not None:
        meta["group"] = group_for(sample_id)
    return {"png": png_for(sample_id), "json": json.dumps(meta).encode(), "txt": captions[0].encode()}


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A tar written member by member (lets tests plant corrupt or oddly named members)."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                shards.add_member(tar, f"{key}.{ext}" if ext else key, data)


def make_shard_dir(root: Path, counts: list[int], *, corrupt: dict[int, dict[str, bytes]] | None = None,
                   n_captions: int = 1, groups: bool = False) -> tuple[Path, list[int]]:
    """Shards of `counts` samples (ids 0..), no manifest; `corrupt` replaces members of given ids;
    `groups`: KEY.json carries group_for(id). Returns (dir, ids of the good samples)."""
    root.mkdir(parents=True, exist_ok=True)
    corrupt = corrupt or {}
    next_id, good = 0, []
    for s, n in enumerate(counts):
        samples = []
        for _ in range(n):
            members = members_for(next_id, n_captions, groups)
            members.update(corrupt.get(next_id, {}))
            if next_id not in corrupt:
                good.append(next_id)
            samples.append((shards.sample_key(next_id), members))
            next_id += 1
        write_tar(root / f"shard-{s:06d}.tar", samples)
    return root, good


@pytest.fixture(scope="module")
def transform():
    return build_transforms(SIZE, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), train=True, crop_scale_min=0.5)


def loader(source, tokenizer, transform, **kw):
    args = dict(batch_size=4, tokenizer=tokenizer, max_length=L, transform=transform, seed=0, epoch=0,
                shuffle_buffer=5)
    args.update(kw)
    return make_loader(source, **args)


def check_batch(batch: dict, tokenizer, batch_size: int, *, stored_fp: bool = False, groups: bool = False) -> None:
    """Shapes/dtypes of the contract, and each row's image, caption and fingerprints belong to its
    sample_id. stored_fp: written by make_shards (KEY.json image_fp), else by make_shard_dir
    (fingerprint of the PNG bytes); groups: make_shard_dir(groups=True)."""
    assert batch["image"].shape == (batch_size, 3, SIZE, SIZE) and batch["image"].dtype == torch.uint8
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (batch_size, L)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.int64
    assert batch["sample_id"].shape == (batch_size,) and batch["sample_id"].dtype == torch.int64
    assert batch["fingerprints"].shape == (batch_size, 3) and batch["fingerprints"].dtype == torch.int64
    for key in ("n_skipped", "worker_id", "worker_pos", "epoch", "step"):
        assert type(batch[key]) is int, key  # plain ints: no tensor -> host sync to read them
    for row, sid in enumerate(batch["sample_id"].tolist()):
        pixels = batch["image"][row].to(torch.int64)  # uint8: the pixels themselves
        assert (pixels == torch.tensor(colour_for(sid)).view(3, 1, 1)).all(), sid
        text = tokenizer.decode(batch["input_ids"][row], skip_special_tokens=True)
        assert text in (caption_for(sid, 0), caption_for(sid, 1)), (sid, text)
        text_fp, image_fp, group_fp = batch["fingerprints"][row].tolist()
        assert text_fp == text_fingerprint(text)  # the caption chosen this epoch, not another
        if stored_fp:
            assert image_fp == image_fingerprint(Image.new("RGB", (SIZE + 3, SIZE), colour_for(sid)))
        else:
            assert image_fp == bytes_fingerprint(png_for(sid))
        group = group_for(sid) if groups else None
        assert group_fp == (-1 if group is None else group_fingerprint(group))


def same(a: list[dict], b: list[dict], ignore: tuple[str, ...] = ()) -> bool:
    """Equal batch lists: tensors bit for bit (dtype included), ints by value; keys in
    `ignore` are not compared."""
    def eq(u, v) -> bool:
        if isinstance(u, torch.Tensor) or isinstance(v, torch.Tensor):
            return (isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor) and u.dtype == v.dtype
                    and torch.equal(u, v))
        return type(u) is type(v) and u == v

    return len(a) == len(b) and all(x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x if k not in ignore)
                                    for x, y in zip(a, b))


def ids(batches: list[dict]) -> list[int]:
    return [i for b in batches for i in b["sample_id"].tolist()]


def test_loader_delivers_exactly_the_good_samples(tmp_path, tokenizer, transform):
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    rows = []
    for i in range(14):
        (img_dir / f"{i}.png").write_bytes(png_for(i) if i not in (3, 9) else b"broken")
        rows.append(shards.Row(i, f"img/{i}.png", str(tmp_path), captions=(caption_for(i),)))
    manifest = shards.write_shards(rows, tmp_path / "out", samples_per_shard=6)
    assert manifest["shard_samples"] == [6, 6] and manifest["skipped"] == 2

    source = ShardSource.from_spec(tmp_path / "out" / "manifest.json")
    assert source.counts == (6, 6)
    # A directory with a manifest, a brace pattern and '::' joined paths resolve alike.
    assert ShardSource.from_spec(tmp_path / "out") == source
    pattern = str(tmp_path / "out" / "shard-{000000..000001}.tar")
    assert ShardSource.from_spec(pattern) == source
    assert ShardSource.from_spec("::".join(source.urls)) == source

    epoch = loader(source, tokenizer, transform, batch_size=3)
    batches = list(epoch)
    assert len(epoch) == len(batches) == 4
    assert sorted(ids(batches)) == [i for i in range(14) if i not in (3, 9)]
    for t, b in enumerate(batches):
        check_batch(b, tokenizer, 3, stored_fp=True)
        assert int(b["step"]) == t and int(b["n_skipped"]) == 0


def test_ranks_get_disjoint_samples_and_equal_step_counts(tmp_path, tokenizer, transform):
    # Unequal shards: every rank still yields the same number of full batches.
    src, _ = make_shard_dir(tmp_path / "uneven", [8, 8, 7, 5, 6])
    source = ShardSource.from_spec(src)
    # 5 shards over 2 readers: each gets >= 2 shards, the 2 smallest hold 11 -> 2 batches of 4.
    assert steps_per_epoch(source, batch_size=4, world_size=2, workers=0) == 2
    per_rank = [list(loader(source, tokenizer, transform, rank=r, world_size=2)) for r in (0, 1)]
    assert [len(b) for b in per_rank] == [2, 2]
    assert not set(ids(per_rank[0])) & set(ids(per_rank[1]))

    # Equal shards that divide evenly: 2 ranks x 2 workers cover the epoch exactly.
    src, good = make_shard_dir(tmp_path / "even", [8, 8, 8, 8])
    source = ShardSource.from_spec(src)
    per_rank = [list(loader(source, tokenizer, transform, rank=r, world_size=2, workers=2)) for r in (0, 1)]
    assert [len(b) for b in per_rank] == [4, 4]
    a, b = ids(per_rank[0]), ids(per_rank[1])
    assert not set(a) & set(b)
    assert sorted(a + b) == good
    for batches in per_rank:
        for t, batch in enumerate(batches):
            assert int(batch["step"]) == t and int(batch["worker_id"]) == t % 2
            check_batch(batch, tokenizer, 4)


@pytest.mark.parametrize("workers", [0, 2])
def test_start_step_equals_dropping_the_first_batches(tmp_path, tokenizer, transform, workers):
    src, _ = make_shard_dir(tmp_path, [9, 9, 9, 9], n_captions=2)
    source = ShardSource.from_spec(src)
    full_loader = loader(source, tokenizer, transform, workers=workers)
    full = list(full_loader)
    assert len(full) == len(full_loader) == (9 if workers == 0 else 8)
    for s in (1, 2, 5, len(full) - 1, len(full)):
        part_loader = loader(source, tokenizer, transform, workers=workers, start_step=s)
        assert len(part_loader) == len(full) - s
        assert same(list(part_loader), full[s:]), s


def test_resume_from_positions_is_exact_across_corrupt_samples(tmp_path, tokenizer, transform):
    bad_fp = json.dumps({"sample_id": 31, "captions": ["photo three one"], "image_fp": -5}).encode()
    bad_group = json.dumps({"sample_id": 36, "captions": ["photo three six"], "group": 1.5}).encode()
    corrupt = {13: {"png": b"\x89PNG but not really"}, 24: {"json": b"{not json"}, 31: {"json": bad_fp},
               36: {"json": bad_group}}
    # Two captions and groups: the fingerprints (caption choice included) must replay too.
    src, good = make_shard_dir(tmp_path, [10, 10, 10, 10], corrupt=corrupt, n_captions=2, groups=True)
    source = ShardSource.from_spec(src)
    full = list(loader(source, tokenizer, transform, workers=2))
    assert len(full) == 10
    assert sum(int(b["n_skipped"]) for b in full) == 4
    assert set(ids(full)) <= set(good)
    for b in full:
        check_batch(b, tokenizer, 4, groups=True)
    state = LoaderState.start(epoch=0, workers=2)
    plain_differs = False
    for s in range(1, len(full)):
        state.update(full[s - 1])
        saved = LoaderState.from_dict(json.loads(json.dumps(state.to_dict())))  # as a checkpoint would
        resumed = list(loader(source, tokenizer, transform, workers=2, start_step=saved.step,
                              positions=saved.positions))
        assert same(resumed, full[s:]), s
        if s >= 5:  # after both corrupt samples: a step-only resume is off by the skips
            plain = list(loader(source, tokenizer, transform, workers=2, start_step=s))
            plain_differs |= not same(plain, full[s:])
    assert plain_differs
    with pytest.raises(ValueError, match="workers changed"):
        loader(source, tokenizer, transform, workers=0, start_step=2, positions=[8, 8])


def test_batches_carry_fingerprints_and_malformed_ones_are_skipped(tmp_path, tokenizer, transform):
    def sample(sid: int, caption: str, **extra) -> tuple[str, dict[str, bytes]]:
        meta = {"sample_id": sid, "captions": [caption], **extra}
        return shards.sample_key(sid), {"png": png_for(sid), "json": json.dumps(meta).encode()}

    write_tar(tmp_path / "shard-000000.tar", [
        sample(0, "photo one two", image_fp=12345, group="q"),
        sample(1, "Photo  one two.", group=7),  # the same text once normalised; no image_fp
        sample(2, "photo two", image_fp=12345, group=None),  # an image duplicate of 0; null: no group
        sample(3, "photo three", image_fp="12345"),  # malformed: skipped and counted
        sample(4, "photo four", image_fp=True),
        sample(5, "photo five", image_fp=2**63),  # does not fit int64
        sample(6, "photo six", group={"q": 1}),
        sample(7, "picture seven", group="q"),
        sample(8, "picture eight", image_fp=0),
        sample(9, "picture nine", group="7"),
    ])
    source = ShardSource.from_spec(tmp_path)
    (batch,) = list(loader(source, tokenizer, transform, batch_size=6, shuffle_buffer=0))
    assert batch["sample_id"].tolist() == [0, 1, 2, 7, 8, 9] and int(batch["n_skipped"]) == 4
    text, image, group = batch["fingerprints"].T.tolist()
    assert text[0] == text[1] == text_fingerprint("photo one two") != text[2]
    assert text[3:] == [text_fingerprint(c) for c in ("picture seven", "picture eight", "picture nine")]
    assert image == [12345, bytes_fingerprint(png_for(1)), 12345, bytes_fingerprint(png_for(7)), 0,
                     bytes_fingerprint(png_for(9))]
    assert group == [group_fingerprint("q"), group_fingerprint(7), -1, group_fingerprint("q"), -1,
                     group_fingerprint("7")]
    assert group[0] == group[3] and group[1] != group[5]  # 7 and "7" are different groups
    assert min(text + image) >= 0
    raws = list(iter_raw_samples(source.urls[0]))
    for i, key in ((3, "image_fp"), (4, "image_fp"), (5, "image_fp"), (6, "group")):
        with pytest.raises(_BadSample, match=f"'{key}' must be"):
            decode_sample(raws[i])
    assert decode_sample(raws[2]).group_fp == -1 and decode_sample(raws[2]).image_fp == 12345


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("naming", ["odd_extensions", "no_extension"])
def test_unexpected_member_names_raise_instead_of_hanging(tmp_path, tokenizer, transform, workers, naming):
    for s in range(2):
        samples = []
        for i in range(12):
            if naming == "odd_extensions":
                samples.append((f"{s}{i:04d}", {"image": png_for(i), "caption": b"photo one"}))
            else:  # names without any dot
                samples.append((f"img{s}{i:04d}", {"": png_for(i)}))
        write_tar(tmp_path / f"odd-{s}.tar", samples)
    source = ShardSource.from_spec(str(tmp_path / "odd-{0..1}.tar"))
    epoch = loader(source, tokenizer, transform, workers=workers, max_consecutive_bad=7, batch_size=2)
    expected = r"\.image" if naming == "odd_extensions" else "img0"
    with pytest.raises(DataError, match=rf"(?s)7 consecutive samples.*odd-\d\.tar.*{expected}"):
        list(epoch)


def test_batch_order_depends_on_seed_and_epoch_only(tmp_path, tokenizer, transform):
    src, _ = make_shard_dir(tmp_path, [8, 8, 8, 8], n_captions=2)
    source = ShardSource.from_spec(src)

    def run(seed, epoch):
        return list(loader(source, tokenizer, transform, seed=seed, epoch=epoch))

    base = run(0, 0)
    assert same(base, run(0, 0))
    assert ids(base) != ids(run(0, 1))
    assert ids(base) != ids(run(1, 0))
    # One caption per image per epoch, chosen from (seed, epoch, sample_id): both get used.
    chosen = {}
    for epoch in range(4):
        for b in run(0, epoch):
            for sid, row in zip(b["sample_id"].tolist(), b["input_ids"]):
                chosen.setdefault(sid, set()).add(tokenizer.decode(row, skip_special_tokens=True).split()[0])
    assert any(len(v) == 2 for v in chosen.values())


def test_pipe_urls_need_a_manifest_and_match_local_reading(tmp_path, tokenizer, transform):
    src, _ = make_shard_dir(tmp_path / "shards", [6, 6])
    local = ShardSource.from_spec(src)
    bare = ShardSource.from_spec(f"pipe:cat {src}/shard-{{000000..000001}}.tar")
    assert bare.counts is None
    with pytest.raises(DataError, match="manifest"):
        loader(bare, tokenizer, transform)
    manifest = tmp_path / "remote.json"
    manifest.write_text(json.dumps({"shards": list(bare.urls), "shard_samples": list(local.counts)}))
    piped = ShardSource.from_spec(manifest)
    assert same(list(loader(piped, tokenizer, transform, batch_size=3)),  # byte offsets: local shards only
                list(loader(local, tokenizer, transform, batch_size=3)), ignore=("worker_offset",))


def test_planning_errors_are_clear(tmp_path, tokenizer, transform):
    src, _ = make_shard_dir(tmp_path, [4, 4, 4])
    source = ShardSource.from_spec(src)
    with pytest.raises(DataError, match=r"3 shard\(s\) cannot feed 2 rank\(s\) x 2 reader\(s\)"):
        loader(source, tokenizer, transform, world_size=2, workers=2)
    with pytest.raises(DataError, match="batch_size 16"):
        loader(source, tokenizer, transform, batch_size=16)
    with pytest.raises(DataError, match="missing"):
        ShardSource.from_spec(str(tmp_path / "shard-{000000..000009}.tar"))


def test_eval_iterator_yields_every_sample_once_in_order(tmp_path, tokenizer):
    src, good = make_shard_dir(tmp_path, [5, 5], corrupt={6: {"png": b"junk"}}, n_captions=2)
    source = ShardSource.from_spec(src)
    tf = build_transforms(SIZE, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), train=False)
    batches = list(iter_eval_batches(source, batch_size=3, transform=tf, tokenizer=tokenizer, max_length=L))
    assert ids(batches) == good  # tar order, each once, corrupt one left out
    assert sum(int(b["n_skipped"]) for b in batches) == 1
    for b in batches:
        assert b["image"].shape[1:] == (3, SIZE, SIZE) and b["image"].dtype == torch.uint8
        assert b["captions"] == [[caption_for(i, 0), caption_for(i, 1)] for i in b["sample_id"].tolist()]
        assert b["caption_sample_id"].tolist() == [i for i in b["sample_id"].tolist() for _ in range(2)]
        texts = tokenizer.batch_decode(b["input_ids"], skip_special_tokens=True)
        assert texts == [c for cs in b["captions"] for c in cs]
    split = [ids(list(iter_eval_batches(source, batch_size=4, transform=tf, rank=r, world_size=2)))
             for r in (0, 1)]
    assert sorted(split[0] + split[1]) == good and not set(split[0]) & set(split[1])
    # block=3: whole runs of 3 raw samples dealt out in turn (raw 6 is the corrupt one);
    # `position` is each sample's raw index.
    blocks = [list(iter_eval_batches(source, batch_size=3, transform=tf, rank=r, world_size=2, block=3))
              for r in (0, 1)]
    assert [b["position"].tolist() for b in blocks[0]] == [[0, 1, 2], [7, 8]]
    assert [b["position"].tolist() for b in blocks[1]] == [[3, 4, 5], [9]]
    assert torch.equal(torch.cat([b["position"] for b in batches]), torch.tensor([0, 1, 2, 3, 4, 5, 7, 8, 9]))


def test_transforms(tokenizer):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    train = build_transforms(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), train=True)
    a = train(noise, torch.Generator().manual_seed(1))
    assert a.shape == (3, 16, 16) and a.dtype == torch.uint8  # normalised later, by the consumer
    assert train.normalize(a[None]).dtype == torch.float32
    assert torch.equal(a, train(noise, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, train(noise, torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match="Generator"):
        train(noise)
    evaluate = build_transforms(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), train=False)
    e = evaluate(noise)
    assert e.shape == (3, 16, 16) and e.dtype == torch.uint8 and torch.equal(e, evaluate(noise))
    assert not train.hflip  # off by default: captions say "left" and "right"


def test_corrupt_samples_are_counted_and_warned_at_a_bounded_rate(tmp_path, tokenizer, transform, caplog):
    corrupt = {i: {"png": b"not a png"} for i in range(0, 40, 4)}
    src, good = make_shard_dir(tmp_path, [20, 20], corrupt=corrupt)
    source = ShardSource.from_spec(src)
    with caplog.at_level("WARNING", logger="moco_mm.data"):
        batches = list(loader(source, tokenizer, transform, batch_size=3))
    assert len(batches) == 13  # 40 raw samples // 3: the reader wraps around for the 10 skipped
    assert sum(int(b["n_skipped"]) for b in batches) >= 10
    assert set(ids(batches)) <= set(good)
    warnings = [r for r in caplog.records if "corrupt sample" in r.getMessage()]
    assert len(warnings) == 1  # the first at once, then at most one per WARN_INTERVAL_S


def test_a_shard_cut_short_is_reported_and_the_epoch_stays_full(tmp_path, tokenizer, transform, caplog):
    src, _ = make_shard_dir(tmp_path, [10, 10])
    source = ShardSource.from_spec(src)  # counts read before the damage: 10 + 10
    shard = tmp_path / "shard-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with caplog.at_level("WARNING", logger="moco_mm.data"):
        batches = list(loader(source, tokenizer, transform, batch_size=4))
    assert len(batches) == 5 and all(b["sample_id"].shape == (4,) for b in batches)
    assert any("shard-000001.tar ended early" in r.getMessage() for r in caplog.records)
