"""Pictures, not only JSONL: TensorBoard event files that hold what metrics.jsonl holds (read
back with TensorBoard's own EventAccumulator, across a resume), and `moco-mm plot`."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from moco_mm import distributed as D
from moco_mm.cli import main as cli_main
from moco_mm.config import ConfigError, load_config
from moco_mm.train.plot import _labels
from moco_mm.train.run_log import TensorBoardLogger
from tests.trainrun import tiny_train_config, write_config


def _demo(out):
    """A smaller demo set than tests.trainrun.build_demo's, built in this process (no second
    interpreter start): 64 train / 16 held-out pairs of 32 px."""
    assert cli_main(["demo-data", "--out", str(out), "--train", "64", "--val", "16", "--image-size", "32",
                     "--train-shards", "2", "--val-shards", "1"]) == 0
    return out


def _train(demo, run_dir, tmp_path, steps: int) -> list[dict]:
    from moco_mm.train import Trainer

    cfg = tiny_train_config(demo, run_dir, run={"steps": steps, "log_every": 1},
                            data={"batch_size": 8, "workers": 0}, optim={"warmup_steps": 1},
                            checkpoint={"every": 2, "keep": 3}, eval={"every": 2, "max_samples": 8},
                            logging={"tensorboard": True, "progress": False})
    Trainer(load_config(write_config(cfg, tmp_path / f"c{steps}.yaml")), D.init_distributed("cpu")).train()
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _events(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _expected(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)):
                out.setdefault(k, []).append((r["step"], float(v)))
    return out


def _assert_same(events, records):
    want = _expected(records)
    assert set(events) == set(want)
    assert {"loss", "lr", "temperature", "samples_per_s", "data_wait_frac", "eval/i2t_R@1"} <= set(want)
    for key, points in want.items():
        assert [s for s, _ in events[key]] == [s for s, _ in points], key  # each step once, in order
        assert [v for _, v in events[key]] == pytest.approx([v for _, v in points], rel=1e-6, nan_ok=True), key


def test_tensorboard_events_match_metrics_and_resume_appends_without_duplicates(tmp_path):
    demo = _demo(tmp_path / "demo")
    run_dir = tmp_path / "run"
    first = _train(demo, run_dir, tmp_path, steps=3)
    assert [r["step"] for r in first if "loss" in r] == [1, 2, 3]
    _assert_same(_events(run_dir), first)

    # The run "was killed" after logging step 3 but before its step-3 checkpoint completed:
    # the next start resumes from step 2, with run.steps=4 (another LR schedule, so step 3's
    # lr differs from what the killed run logged).
    shutil.rmtree(run_dir / "checkpoints" / "step_00000003")
    second = _train(demo, run_dir, tmp_path, steps=4)
    assert [r["step"] for r in second if "loss" in r] == [1, 2, 3, 4]
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # appended, not replaced
    events = _events(run_dir)
    _assert_same(events, second)
    old3 = next(r for r in first if r["step"] == 3)["lr"]
    new3 = next(r for r in second if r["step"] == 3)["lr"]
    assert old3 != pytest.approx(new3) and dict(events["lr"])[3] == pytest.approx(new3)


def test_tensorboard_not_installed_names_the_key(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # find_spec -> None, import -> ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    cfg = write_config({"run": {"output_dir": str(tmp_path / "r")}, "data": {"train": "x"},
                        "logging": {"tensorboard": True}}, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=r"^logging\.tensorboard: .*pip install 'moco-mm\[logging\]'"):
        load_config(cfg)
    with pytest.raises(ConfigError, match=r"^logging\.tensorboard: "):
        TensorBoardLogger(tmp_path / "tb", enabled=True)
    TensorBoardLogger(tmp_path / "tb", enabled=False).log({"loss": 1.0}, 1)  # off: never imported


def _write_run(path, records, extra_lines=()):
    path.mkdir(parents=True)
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    (path / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines))
    return path


def _records(n, scale, with_eval):
    out = []
    for s in range(1, n + 1):
        r = {"step": s * 10, "loss": scale * 10 / s, "temperature": 0.07 - 0.001 * s,
             "samples_per_s": 100.0 + s, "data_wait_frac": 0.05}
        if with_eval and s % 2 == 0:
            r.update({"eval/i2t_R@1": 5.0 * s, "eval/t2i_R@1": 4.0 * s})
        out.append(r)
    return out


def test_plot_overlays_runs_and_skips_what_no_run_has(tmp_path, capsys):
    from PIL import Image

    a = _write_run(tmp_path / "x" / "infonce", _records(8, 1.0, with_eval=True))
    b = _write_run(tmp_path / "y" / "infonce", _records(6, 1.5, with_eval=False),
                   extra_lines=['{"step": 70, "loss": 3.'])  # a torn last line from a kill
    out = tmp_path / "plots"
    rc = cli_main(["plot", str(a), str(b), "--out", str(out), "--metrics", "loss,R@1,grad_norm"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert f"{b / 'metrics.jsonl'}:7: not JSON" in cap.err  # the file and the line
    assert "no run logged grad_norm" in cap.err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["R_at_1.png", "loss.png", "overview.png"]
    for name in names:
        assert (out / name).stat().st_size > 5000
        with Image.open(out / name) as im:
            im.verify()
    with Image.open(out / "loss.png") as im:
        assert im.size == (640, 400)  # 6.4 x 4 in at --dpi 100
    with Image.open(out / "overview.png") as im:
        assert im.size == (960, 300)  # two panels side by side, 0.75 scale
    assert _labels([a, b]) == ["x/infonce", "y/infonce"]  # legend: the run directory names, told apart


def test_plot_bad_input_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["plot", str(empty)]) == 2
    assert f"{empty / 'metrics.jsonl'}: no such file" in capsys.readouterr().err

    (empty / "metrics.jsonl").write_text("")
    assert cli_main(["plot", str(empty)]) == 2
    assert f"{empty / 'metrics.jsonl'}: no logged step" in capsys.readouterr().err

    junk = _write_run(tmp_path / "junk", [], extra_lines=["not json", '{"loss": 1.0}'])
    assert cli_main(["plot", str(junk)]) == 2
    err = capsys.readouterr().err
    assert f"{junk / 'metrics.jsonl'}:1: not JSON" in err and f"{junk / 'metrics.jsonl'}:2: no integer 'step'" in err
    assert "no logged step" in err

    ok = _write_run(tmp_path / "ok", _records(3, 1.0, with_eval=False))
    assert cli_main(["plot", str(ok), "--metrics", "eval/zeroshot_top1"]) == 2
    assert "nothing to draw" in capsys.readouterr().err
    assert not (ok / "plots").exists()
