"""A discoverable config: every key documented from the dataclasses, the resolved config
printable, values read as users type them, misspelt keys answered with the closest names."""

from __future__ import annotations

import dataclasses

import pytest

from moco_mm.config import Config, ConfigError, describe_keys, iter_keys, load_config, parse_yaml
from moco_mm.train.cli import main as train_main


def test_every_key_has_a_type_default_and_help():
    keys = list(iter_keys())
    assert len(keys) > 50
    for key, tp, _default, help_ in keys:
        assert tp and help_, f"{key}: no help (give the field opt(default, help))"
    # The listing covers every leaf of the dataclasses: none missed, none invented.
    def leaves(obj, prefix=""):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from leaves(value, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    assert [k for k, *_ in keys] == list(leaves(Config()))


def test_train_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as stop:
        train_main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for key, tp, _default, help_ in iter_keys():
        assert f"  {key} ({tp}; default " in out, key
        assert help_ in out
    assert "model.loss (infonce | vse_max | vse_sum | contrastive | triplet | margin | multi_similarity | circle; " \
           "default infonce)" in describe_keys()


def test_print_config_prints_the_resolved_config_and_exits(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  steps: 50\noptim:\n  lr: 3e-4\n  warmup_steps: 5\n")
    assert train_main(["--config", str(path), "--print-config", "optim.lr=2e-3", "queue.size=128"]) == 0
    printed = capsys.readouterr().out
    cfg = Config()
    cfg.run.steps, cfg.optim.lr, cfg.optim.warmup_steps, cfg.queue.size = 50, 2e-3, 5, 128
    again = tmp_path / "printed.yaml"
    again.write_text(printed)
    assert load_config(again) == cfg
    assert not (tmp_path / "runs").exists()  # nothing was trained or written


@pytest.mark.parametrize("text,value", [("2e-3", 2e-3), ("1e5", 1e5), ("1.0e5", 1e5), ("-3.5E-2", -3.5e-2),
                                        (".5e1", 5.0), ("1e-06", 1e-6), ("0.0001", 1e-4), ("5", 5)])
def test_numbers_read_as_typed(text, value):
    got = parse_yaml(text)
    assert got == value and type(got) is type(value)


def test_floats_in_overrides_and_files_alike(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 2e-3\n  eps: 1e-8\n")
    cfg = load_config(path, ["optim.weight_decay=5e-2", "model.temperature=7e-2"])
    assert (cfg.optim.lr, cfg.optim.eps, cfg.optim.weight_decay, cfg.model.temperature) == (2e-3, 1e-8, 5e-2, 7e-2)


@pytest.mark.parametrize("override,suggestion", [
    ("model.embed_dimm=64", "did you mean model.embed_dim"),
    ("optim.learning_rate=1e-3", None),
    ("optim.wramup_steps=3", "did you mean optim.warmup_steps"),
    ("queue.szie=8", "did you mean queue.size"),
])
def test_misspelt_keys_name_the_closest(override, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert msg.startswith(override.split("=")[0] + ": unknown key")
    if suggestion:
        assert suggestion in msg
    assert "allowed keys under" in msg


def test_bad_config_exits_2_before_any_compute(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  loss: hinge\n")
    assert train_main(["--config", str(path)]) == 2
    assert "model.loss: 'hinge' is not allowed" in capsys.readouterr().err


def test_a_queue_that_a_step_overwrites_whole_is_warned_about():
    from moco_mm import plan
    from moco_mm.config import queue_warnings
    from tests.test_plan_memory import tiny_config

    cfg = Config()
    cfg.data.batch_size, cfg.queue.size = 32, 4096
    assert queue_warnings(cfg, world_size=64) == []  # 2048 keys per step: the queue holds 2 steps
    warned = queue_warnings(cfg, world_size=128)  # 4096 keys per step: every step replaces it
    assert len(warned) == 1 and "queue.size (4096)" in warned[0] and "= 4096" in warned[0]
    cfg.optim.accum_steps = 2
    assert queue_warnings(cfg, world_size=64)  # accumulation enqueues 2 x 64 x 32 per step
    cfg.queue.enabled = False
    assert queue_warnings(cfg, world_size=128) == []
    small = tiny_config(batch=8, queue=16)  # 2 ranks x 8 = 16 keys per step
    p = plan.plan(small, "a100-40gb", world_size=2, vocab_size=120)
    assert any("queue.size (16)" in n for n in p.notes) and "note: queue.size (16)" in p.table()


def test_only_true_and_false_are_booleans(tmp_path):
    """YAML 1.1 would read on/off/yes/no as booleans: `run.channels_last=on` would be
    rejected and a caption-like string would change type."""
    assert [parse_yaml(x) for x in ("on", "off", "yes", "no", "true", "False")] == ["on", "off", "yes", "no", True,
                                                                                   False]
    assert load_config(None, ["run.channels_last=on"]).run.channels_last == "on"
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  channels_last: off\n  compile: true\n")
    cfg = load_config(path)
    assert cfg.run.channels_last == "off" and cfg.run.compile is True
    with pytest.raises(ConfigError, match="run.compile: expected bool"):
        load_config(None, ["run.compile=yes"])
