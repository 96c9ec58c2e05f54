"""The memory planner (moco_mm.plan, `moco-mm plan-memory`).

Fast on two CPU cores: tiny towers are traced with fake tensors in about a second; the
shipped A100 configs are planned from tower profiles kept in tests/data/tower_profiles.json
(traced by the planner itself; keyed by what they depend on in our code and config, see
tests/tower_profiles.py), and one test re-traces every shipped tower and compares the
numbers, so a library release that changes what is saved fails it and one that does not
passes.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

import pytest
import torch

from moco_mm import plan as memory
from moco_mm.config import Config, QueueConfig, load_config
from moco_mm.plan import GIB, trace
from tests import tower_profiles
from tests.tiny import VOCAB, tiny_model_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.name for p in (ROOT / "configs").glob("a100-*gb-*.yaml"))
BATCH_PARTS = {"inputs", "activations.image", "activations.text", "backward.transient", "negatives",
               "logits", "logit_grads", "gathered.keys"}


def tiny_config(batch: int = 8, queue: int = 64, precision: str = "fp32", **queue_kw) -> Config:
    cfg = Config(model=tiny_model_config(), queue=QueueConfig(size=queue, **queue_kw))
    cfg.data.batch_size = batch
    cfg.run.precision = precision
    return cfg.validate()


def tiny_plan(batch: int = 8, queue: int = 64, world_size: int = 2, **kw):
    return memory.plan(tiny_config(batch, queue, **kw), "a100-40gb", world_size, vocab_size=VOCAB)


# --- the plan's arithmetic -----------------------------------------------------------


def test_parts_add_up_to_the_peak():
    p = tiny_plan()
    assert p.peak_bytes == sum(p.parts.values())
    assert p.parts is p.phases[p.phase]
    assert p.peak_bytes == max(sum(ph.values()) for ph in p.phases.values())
    assert p.required_bytes == p.peak_bytes + p.margin_bytes
    assert p.margin_bytes == memory.Margin().bytes(p.peak_bytes) >= GIB
    assert p.fits == (p.required_bytes <= p.capacity_bytes)
    d = p.to_dict()
    for key in ("peak_bytes", "capacity_bytes", "parts", "max_batch_per_gpu", "max_queue_size", "state_bytes"):
        assert key in d
    assert d["parallel"] == "ddp"
    json.dumps(d)


def test_doubling_the_batch_grows_only_activations_logits_and_gathered_keys():
    """Weights, gradients, optimizer states, buckets and queues do not move; what grows is
    per-sample: the batch itself, activations and their transients, the logits (and the
    gathered batch keys among the negatives) and the gathered keys."""
    small, large = tiny_plan(batch=8), tiny_plan(batch=16)
    for phase in ("backward", "forward"):
        a, b = small.phases[phase], large.phases[phase]
        assert a.keys() == b.keys()
        grown = {k for k in a if b[k] != a[k]}
        assert grown <= BATCH_PARTS | {"key_forward.transient", "loss.forward", "gathered.shuffle"}, grown
        for k in grown:
            assert b[k] > a[k], k
    grown = {k for k in small.phases["backward"] if large.phases["backward"][k] != small.phases["backward"][k]}
    assert {"activations.image", "activations.text", "logits", "gathered.keys"} <= grown
    # Saved activations are linear in the batch (plus batch-independent autocast copies).
    def act(p):
        return p.phases["backward"]["activations.image"] + p.phases["backward"]["activations.text"]

    assert act(tiny_plan(batch=32)) - act(large) == pytest.approx(2 * (act(large) - act(small)), abs=4)


@pytest.mark.parametrize("dtype,nbytes", [("float32", 4), ("bfloat16", 2)])
def test_a_queue_of_k_rows_stores_exactly_2_k_d_bytes_and_its_meta(dtype, nbytes):
    d = tiny_model_config().embed_dim
    plans = {k: tiny_plan(queue=k, dtype=dtype) for k in (64, 1000)}
    for k, p in plans.items():
        for phase in p.phases.values():
            assert phase["queues.features"] == 2 * k * d * nbytes
            assert phase["queues.ids"] == 2 * k * 4 * 8  # sample id + 3 fingerprints, int64
    # ... and nothing but the queue and what the loss computes over it depends on K.
    a, b = plans[64].phases["backward"], plans[1000].phases["backward"]
    assert {k for k in a if a[k] != b[k]} <= {"queues.features", "queues.ids", "negatives", "logits", "logit_grads"}


def test_disabled_queue_holds_nothing():
    p = tiny_plan(queue=64, enabled=False)
    assert p.parts["queues.features"] == p.parts["queues.ids"] == 0
    assert p.queue_size == p.max_queue_size == 0


def test_max_batch_and_queue_are_the_largest_that_fit():
    cfg = tiny_config()
    gpu = memory.GpuSpec("small", 2 * GIB, "a 2 GiB test device")
    p = memory.plan(cfg, gpu, 1, vocab_size=VOCAB)
    assert p.max_batch_per_gpu > cfg.data.batch_size and p.max_queue_size > cfg.queue.size

    def at(b, k):
        return memory.plan(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=b),
                                               queue=dataclasses.replace(cfg.queue, size=k)),
                           gpu, 1, vocab_size=VOCAB)

    assert at(p.max_batch_per_gpu, cfg.queue.size).fits and not at(p.max_batch_per_gpu + 1, cfg.queue.size).fits
    assert at(cfg.data.batch_size, p.max_queue_size).fits
    assert not at(cfg.data.batch_size, p.max_queue_size + max(1, p.max_queue_size // 500)).fits


def test_loss_fit_matches_an_exact_trace():
    args = ("infonce", True, 256, True, "float32", True)
    fit = memory.loss_model(*args)
    exact = memory.loss_footprint("infonce", True, 256, 96, 65536, 8 * 96, "float32", True)
    for f in dataclasses.fields(memory.LossFootprint):
        want = getattr(exact, f.name)
        assert fit[f.name].at(96, 65536 + 8 * 96) == pytest.approx(want, rel=0.01, abs=4096), f.name


# --- the tracing ---------------------------------------------------------------------


@pytest.mark.parametrize("momentum_encoder", [True, False])
def test_planner_matches_a_real_cpu_step_within_15_percent(momentum_encoder):
    """Validation: parameters + gradients + AdamW + saved activations of one real fp32
    step of DualQueueMoCo on the CPU (real tensors, full queues, padded captions) against
    the planner's figure for the same config (traced with fake tensors at batches 2 and 4,
    extrapolated to 16). Also in the CLIP mode: no key towers, no queue."""
    cfg = tiny_config(batch=16, queue=64, enabled=momentum_encoder)
    cfg.model.momentum_encoder = momentum_encoder
    cfg.validate()
    plan = memory.plan(cfg, "a100-40gb", 1, vocab_size=VOCAB)
    measured = memory.measure_step(cfg, VOCAB)
    p = plan.phases["backward"]
    planned = (p["params.query"] + p["params.key"] + p["grads"] + p["optimizer.adamw"]
               + p["activations.image"] + p["activations.text"])
    assert planned == pytest.approx(measured.total, rel=0.15)
    assert p["activations.image"] + p["activations.text"] == pytest.approx(measured.saved_towers, rel=0.15)
    assert p["params.query"] + p["params.key"] == measured.params
    assert p["grads"] == measured.grads and p["optimizer.adamw"] == measured.optimizer
    assert (p["params.key"] == 0) is (not momentum_encoder)
    assert (plan.phases["forward"]["key_forward.transient"] == 0) is (not momentum_encoder)


def _tiny_tower(kind: str, ckpt: bool):
    """A 3-block tower (the shortest run that is extrapolated) and its inputs."""
    from moco_mm.config import ImageTowerConfig, TextTowerConfig
    from moco_mm.model import hf_text_tower, timm_image_tower

    with torch.device("meta"):
        if kind == "text":
            cfg = TextTowerConfig(name="bert", max_length=16, grad_checkpointing=ckpt,
                                  overrides=dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
                                                 intermediate_size=128, vocab_size=VOCAB))
            return hf_text_tower(cfg, 32), lambda b: (torch.zeros(b, 16, dtype=torch.long),
                                                  torch.ones(b, 16, dtype=torch.long))
        cfg = ImageTowerConfig(name="vit_tiny_patch16_224", image_size=32, grad_checkpointing=ckpt,
                               kwargs=dict(patch_size=8, depth=3, embed_dim=64, num_heads=2))
        return timm_image_tower(cfg, 32), lambda b: (torch.empty(b, 3, 32, 32),)


# Plain ViT blocks (each keeps its input and autocast weight copies) and checkpointed BERT
# layers (a wrapper saves each layer's input before the layer runs, and the last one's
# output reaches the head in bf16): the two ways a block's share can be misattributed.
@pytest.mark.parametrize("kind,ckpt", [("image", False), ("text", True)])
def test_depth_extrapolation_equals_a_full_trace(kind, ckpt):
    tower, inputs = _tiny_tower(kind, ckpt)
    with trace._fake_mode():
        tower = tower.to_empty(device="cpu")
        short, method = trace._profile_fake_tower(tower, inputs, torch.bfloat16, depth_extrapolation=True)
        full, _ = trace._profile_fake_tower(tower, inputs, torch.bfloat16, depth_extrapolation=False)
    assert "3 blocks" in method
    assert short == full
    # Autocast's copies of the weights: every Linear/Conv weight and bias cast to bf16 once,
    # and kept (cached) to the end of the forward; of them, checkpointed blocks save none.
    cast = sum(2 * p.numel() for m in tower.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
               for p in m.parameters(recurse=False))
    assert full["autocast_live"] == memory.Linear(cast, 0)
    assert full["autocast_saved"].per_sample == 0 and full["autocast_saved"].fixed <= full["saved"].fixed
    assert (full["autocast_saved"].fixed < cast / 4) is ckpt


def test_checkpointing_keeps_less_and_recomputes_more():
    cfg = tiny_config()
    plain = memory.profile_model(cfg, VOCAB)
    cfg.model.image.grad_checkpointing = cfg.model.text.grad_checkpointing = True
    ckpt = memory.profile_model(cfg, VOCAB)
    for a, b in ((plain.image, ckpt.image), (plain.text, ckpt.text)):
        assert b.saved.per_sample < a.saved.per_sample
        assert b.backward_extra.per_sample > a.backward_extra.per_sample


def test_fast_outputs_match_the_fake_implementation():
    aten = torch.ops.aten

    def meta(x):
        if isinstance(x, torch.Tensor):
            return tuple(x.shape), x.dtype, x.stride()
        return [meta(y) for y in x] if isinstance(x, (tuple, list)) else x

    with trace._fake_mode():
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.empty(2, 8, 5, 5, dtype=dtype)
            w, b, rm, rv = (torch.empty(8) for _ in range(4))
            for training in (True, False):
                cases = [(aten.native_batch_norm.default, (x, w, b, rm, rv, training, 0.1, 1e-5))]
                _, sm, si = aten.native_batch_norm.default(x, w, b, rm, rv, training, 0.1, 1e-5)
                for mask in ([True, True, True], [True, False, False]):
                    cases.append((aten.native_batch_norm_backward.default,
                                  (torch.empty_like(x), x, w, rm, rv, sm, si, training, 1e-5, mask)))
                cases += [(aten.silu_backward.default, (torch.empty_like(x), x)),
                          (aten.sigmoid_backward.default, (torch.empty_like(x), x))]
                for func, args in cases:
                    assert meta(trace._fast_outputs(func, args, {})) == meta(func(*args)), func


def test_attention_dropout_is_traced_as_cuda_fused_attention():
    """CPU attention with dropout keeps the probabilities; CUDA's fused kernels do not."""
    cfg = tiny_config()
    base = memory.profile_model(cfg, VOCAB).text.saved
    cfg.model.text.overrides = {**cfg.model.text.overrides, "attention_probs_dropout_prob": 0.1}
    assert memory.profile_model(cfg, VOCAB).text.saved == base


# --- the shipped configs -------------------------------------------------------------


def _planner_line(path: Path) -> dict[str, float]:
    text = path.read_text()
    m = re.search(r"peak ([\d.]+) GiB \+ margin ([\d.]+) GiB\n# \(10% \+ 1 GiB\) = ([\d.]+) of ([\d.]+) GiB", text)
    assert m, f"{path.name}: no planner line"
    return dict(zip(("peak", "margin", "required", "capacity"), map(float, m.groups())))


@pytest.fixture(scope="module")
def cached_towers():
    for key, entry in tower_profiles.load()["towers"].items():
        memory.register_tower_profile(key, entry["profile"])


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_fits_its_gpu(name, cached_towers):
    path = ROOT / "configs" / name
    gpu = name[: len("a100-40gb")]
    cfg = load_config(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = memory.plan(cfg, gpu, world_size=8)
    assert p.fits, p.table()
    assert p.max_batch_per_gpu >= cfg.data.batch_size and p.max_queue_size >= cfg.queue.size
    # The comment in the config states this plan.
    stated = _planner_line(path)
    assert stated["peak"] == pytest.approx(p.peak_bytes / GIB, abs=0.006)
    assert stated["margin"] == pytest.approx(p.margin_bytes / GIB, abs=0.006)
    assert stated["required"] == pytest.approx(p.required_bytes / GIB, abs=0.006)
    assert stated["capacity"] == pytest.approx(p.capacity_bytes / GIB, abs=0.006)


def test_shipped_configs_use_only_cached_towers():
    """Every tower of a shipped config has a cache entry (else the test above traces)."""
    cached = tower_profiles.load()["towers"]
    for name in SHIPPED:
        cfg = load_config(ROOT / "configs" / name)
        vocab, _ = memory.default_vocab_size(cfg)
        for kind in ("image", "text"):
            key = memory.tower_profile_key(kind, cfg.model, memory.autocast_dtype_for(cfg), vocab)
            assert key in cached, f"{name} {kind}: not kept; run python -m tests.tower_profiles"


def test_cached_tower_profiles_are_current():
    """Re-trace every shipped tower with the installed libraries and compare the numbers
    (not library versions) with the kept profiles."""
    kept = tower_profiles.load()
    fresh = tower_profiles.trace_shipped()
    assert sorted(fresh) == sorted(kept["towers"]), "run python -m tests.tower_profiles"
    changed = {}
    for key, entry in fresh.items():
        old = kept["towers"][key]["profile"]
        diff = {f: (old[f], v) for f, v in entry["profile"].items() if old[f] != v}
        if diff:
            changed[", ".join(entry["used_by"])] = diff
    assert not changed, (
        f"traced numbers differ from tests/data/tower_profiles.json (kept: traced with {kept['traced_with']}; "
        f"now: {tower_profiles.library_versions()}): {changed}. If the new numbers are right, run "
        f"`python -m tests.tower_profiles`, re-plan the configs and commit both.")


# --- the command line ----------------------------------------------------------------


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    import yaml

    from moco_mm.plan.cli import main

    cfg = tiny_config()
    raw = {"model": dataclasses.asdict(cfg.model), "queue": dataclasses.asdict(cfg.queue),
           "data": {"batch_size": 8}, "run": {"precision": "fp32"}}
    raw["model"]["text"]["overrides"]["vocab_size"] = VOCAB
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "plan.json"
    assert main(["--config", str(path), "--gpu", "a100-80gb", "--world-size", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for word in ("params.query", "activations.image", "logits", "margin", "required", "FITS"):
        assert word in printed
    plan = json.loads(out.read_text())
    assert plan["peak_bytes"] == sum(plan["parts"].values())
    assert plan["capacity_bytes"] == memory.GPUS["a100-80gb"].capacity_bytes
    assert plan["max_batch_per_gpu"] > 8 and plan["max_queue_size"] > 64
    assert main(["--config", str(path), "--gpu", "a100-40gb", "data.batch_size=10000000"]) == 1
    assert main(["--config", str(path), "--gpu", "a100-40gb", "data.batch_size=0"]) == 2


@pytest.mark.parametrize("true", [0, 1, 5, 100, 12345])
def test_the_exact_confirmation_finds_the_largest_fit_from_any_guess(true):
    """The fitted search's answer is corrected with exact traces by galloping and bisecting
    (a linear walk from a far-off guess took 300 exact traces: 85 s for a bf16 queue)."""
    from moco_mm.plan.planner import _confirmed

    calls = []

    def fits(n, exact=False):
        calls.append(n)
        return n <= true

    for guess in (0, 1, 3, 99, 100, 101, 5000, 2_000_000):
        calls.clear()
        assert _confirmed(fits, guess) == true
        assert len(calls) <= 2 * 24 + 4


def test_shuffle_bn_and_ddp_buckets_do_not_grow_with_the_world(cached_towers):
    """Shuffle-BN exchanges about B rows per rank whatever W (all-to-all), and DDP's buckets
    are the gradients themselves (gradient_as_bucket_view): WenLan-large still fits a 40 GB
    A100 at W = 256 (it did not when Shuffle-BN gathered every rank's images)."""
    cfg = load_config(ROOT / "configs" / "a100-40gb-wenlan-large.yaml", world_size=256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plans = {w: memory.plan(cfg, "a100-40gb", world_size=w) for w in (8, 256)}
    assert plans[256].fits
    for part in ("gathered.shuffle", "ddp.buckets"):
        assert plans[8].phases["forward"][part] == plans[256].phases["forward"][part], part
    assert plans[256].phases["backward"]["ddp.buckets"] == 0


# --- run.parallel: fsdp ---------------------------------------------------------------

VITG = ROOT / "configs" / "a100-40gb-vitg14-bertlarge-fsdp.yaml"
SHARDED = ("params.sharded", "grads.sharded", "optimizer.adamw.sharded", "optimizer.step_temp.sharded")


def _with_parallel(cfg: Config, parallel: str) -> Config:
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, parallel=parallel))


def test_fsdp_shards_the_state_gathers_units_and_makes_no_autocast_copies(cached_towers):
    """ViT-g/14 + BERT-large in bf16 at W = 8: the DDP state's shardable bytes / W, whole
    buffers, the largest block gathered twice, both query roots gathered, and activations
    less the traced autocast weight copies (FSDP gathers bf16 weights: autocast copies none)."""
    cfg = load_config(VITG)
    profile = memory.profile_model(cfg)
    img, txt = profile.image, profile.text
    b, k = cfg.data.batch_size, cfg.queue.size
    ddp = memory.estimate_phases(_with_parallel(cfg, "ddp"), profile, 8, b, k)
    fsdp = memory.estimate_phases(cfg, profile, 8, b, k)
    for phase in fsdp.values():
        assert not {"params.query", "params.key", "grads", "ddp.buckets"} & phase.keys()
    d, f = ddp["optimizer"], fsdp["optimizer"]
    # BERT's buffers (position and token type ids) in the query and the key tower, T once.
    assert f["params.replicated"] == 2 * (img.buffer_bytes + txt.buffer_bytes) + 4 > 4
    whole = d["params.query"] + d["params.key"] - f["params.replicated"]
    assert f["params.sharded"] == pytest.approx(whole / 8, abs=1)
    assert f["grads.sharded"] == pytest.approx((d["grads"] - 4) / 8 + 4, abs=1)  # the learnt T stays whole
    assert f["optimizer.adamw.sharded"] == 2 * f["grads.sharded"] == f["optimizer.step_temp.sharded"] * 2
    assert f.keys() & {"fsdp.unsharded_roots", "fsdp.gathered_blocks"} == set()  # resharded after backward
    block = max(img.largest_block_params, txt.largest_block_params)
    roots = img.root_params + txt.root_params
    assert fsdp["forward"]["fsdp.gathered_blocks"] == 2 * 2 * block
    assert fsdp["forward"]["fsdp.unsharded_roots"] == fsdp["backward"]["fsdp.unsharded_roots"] == 2 * roots
    assert fsdp["forward"]["fsdp.key_root"] == 2 * max(img.root_params, txt.root_params)
    assert fsdp["backward"]["fsdp.unsharded_grads"] >= (2 + 4) * block
    for kind, tower in (("image", img), ("text", txt)):
        assert tower.autocast_live.fixed > 0
        assert fsdp["forward"][f"activations.{kind}"] == ddp["forward"][f"activations.{kind}"] - \
            tower.autocast_live.at(b)
        assert fsdp["backward"][f"activations.{kind}"] == ddp["backward"][f"activations.{kind}"] - \
            tower.autocast_saved.at(b)
    # The units: ViT-g's 40 and BERT-large's 24 identical layers, a root over the rest.
    assert (img.n_blocks, txt.n_blocks) == (40, 24)
    for tower in (img, txt):
        assert tower.root_params + tower.n_blocks * tower.largest_block_params == tower.n_params


def test_a_tower_without_a_block_list_is_planned_as_one_fsdp_unit():
    """resnet10t has one block a stage, no list of blocks (`model.tower_blocks`, the rule the
    trainer shards by): the trainer makes the tower one FSDP unit, and the plan gathers
    all of it, its root being every parameter, while the ViT/BERT towers have 2 blocks."""
    from tests.tiny import tiny_bn_model_config

    cfg = tiny_config()
    cfg.model = tiny_bn_model_config()
    plan = memory.plan(_with_parallel(cfg, "fsdp"), "a100-40gb", 2, vocab_size=VOCAB)
    profile = memory.profile_model(cfg, VOCAB)
    assert (profile.image.n_blocks, profile.text.n_blocks) == (0, 2)
    assert profile.image.root_params == profile.image.n_params
    assert any("image tower has no list of blocks: one FSDP unit" in n for n in plan.notes)


def test_fsdp_state_shrinks_as_one_over_the_world(cached_towers):
    """ViT-g/14 + BERT-large: every sharded part at W = 8 is a quarter of W = 2's (to the
    rounding of a shard), and W changes nothing else that is not per global batch."""
    cfg = load_config(VITG)
    profile = memory.profile_model(cfg)
    b, k = cfg.data.batch_size, cfg.queue.size
    at = {w: memory.estimate_phases(cfg, profile, w, b, k) for w in (2, 8)}
    grows_with_w = {"gathered.keys", "negatives", "logits", "logit_grads", "loss.forward"}
    for phase in at[8]:
        two, eight = at[2][phase], at[8][phase]
        assert two.keys() == eight.keys()
        for part in two:
            if part in SHARDED:
                assert eight[part] == pytest.approx(two[part] / 4, abs=8), (phase, part)
            elif part not in grows_with_w:
                assert eight[part] == two[part], (phase, part)

    def state(w):
        return sum(at[w]["optimizer"][p] for p in SHARDED)

    assert state(8) == pytest.approx(state(2) / 4, abs=32)


@pytest.fixture(scope="module")
def vitg_plans(cached_towers):
    cfg = load_config(VITG)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {par: memory.plan(_with_parallel(cfg, par), "a100-40gb", world_size=8) for par in ("ddp", "fsdp")}


def _comment(path: Path) -> str:
    """The config's header comment as one line."""
    lines = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")]
    return " ".join(lines)


def test_vitg14_bertlarge_needs_fsdp_on_40gb(vitg_plans):
    """Under DDP every 40 GB A100 holds 30.10 GiB of state (query weights, their momentum
    copy, gradients, AdamW states, the step's temporaries; the buckets are the gradients):
    at most 122 pairs fit, not the config's 192. Sharded over 8 GPUs the state is 3.76 GiB
    and the largest batch more than triples. The config's comment states these figures."""
    ddp, fsdp = vitg_plans["ddp"], vitg_plans["fsdp"]
    cfg = load_config(VITG)
    assert ddp.parallel == "ddp" and fsdp.parallel == "fsdp"
    assert ddp.state_bytes / GIB == pytest.approx(30.10, abs=0.005)
    assert not ddp.fits and 0 < ddp.max_batch_per_gpu < cfg.data.batch_size
    assert fsdp.fits and fsdp.max_batch_per_gpu >= 3 * ddp.max_batch_per_gpu
    assert fsdp.state_bytes / GIB == pytest.approx(3.76, abs=0.005)
    assert fsdp.peak_bytes == sum(fsdp.parts.values())
    m = re.search(r"([\d.]+) GiB of state before any activation, so at most (\d+) pairs/GPU fit and this batch "
                  r"does not \(([\d.]+) of ([\d.]+) GiB with --parallel ddp\)\. .* that state is ([\d.]+) GiB",
                  _comment(VITG))
    assert m, "the config's comment on DDP vs FSDP"
    assert float(m[1]) == pytest.approx(ddp.state_bytes / GIB, abs=0.006)
    assert int(m[2]) == ddp.max_batch_per_gpu
    assert float(m[3]) == pytest.approx(ddp.required_bytes / GIB, abs=0.006)
    assert float(m[5]) == pytest.approx(fsdp.state_bytes / GIB, abs=0.006)


def test_cli_parallel_overrides_the_config(vitg_plans, tmp_path, capsys):
    from moco_mm.cli import main  # what tools/plan_memory.py calls

    out = tmp_path / "plan.json"
    args = ["plan-memory", "--config", str(VITG), "--gpu", "a100-40gb", "--json", str(out)]
    assert main([*args, "--parallel", "ddp"]) == 1
    assert json.loads(out.read_text())["parallel"] == "ddp"
    assert main([*args, "run.parallel=ddp", "--parallel", "fsdp"]) == 0  # the flag wins
    printed = capsys.readouterr().out
    plan = json.loads(out.read_text())
    assert plan["parallel"] == "fsdp" and plan["max_batch_per_gpu"] == vitg_plans["fsdp"].max_batch_per_gpu
    assert f"largest per-GPU batch that fits (queue 65536): {plan['max_batch_per_gpu']}" in printed
    for part in ("params.sharded", "fsdp.gathered_blocks", "fsdp.unsharded_roots", "world size 8, fsdp"):
        assert part in printed
    with pytest.raises(SystemExit) as e:
        main([*args, "--parallel", "zero"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
