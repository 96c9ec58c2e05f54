"""Checkpoint manager: round trips, rotation, refusal of incomplete / corrupt / pickled-code
checkpoints, RNG round trips, and SIGKILL at arbitrary moments of real writer processes."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from moco_mm.train.checkpoint import (
    MARKER_FILE,
    MODEL_FILE,
    STATE_FILE,
    BackgroundWriter,
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    restore_rng_state,
)

REPO = Path(__file__).resolve().parents[1]


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def _tiny(step: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4,), float(step))}


def _hidden_entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def _rewrite_marker(ckpt: Path) -> None:
    """Make the marker agree with the files as they are now: the strongest tampering case."""
    marker = json.loads((ckpt / MARKER_FILE).read_text())
    for name in marker["files"]:
        data = (ckpt / name).read_bytes()
        marker["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / MARKER_FILE).write_text(json.dumps(marker))


# ---------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45])
    tied = torch.randn(8, 3, generator=g)
    tensors = {
        "f32": base,
        "special": special,
        "bf16": torch.randn(7, 3, generator=g).to(torch.bfloat16),
        "i64": torch.tensor([-(2**62), -1, 0, 2**62 + 12345], dtype=torch.int64),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "transposed": base.t(),  # non-contiguous view of f32's storage
        "tied_a": tied,
        "tied_b": tied,  # same tensor under two names (tied weights)
        "row": tied[2],  # contiguous slice of the same storage
        "param": torch.nn.Parameter(torch.randn(3, generator=g)),
    }
    originals = {k: v.detach().clone() for k, v in tensors.items()}

    # Shaped like an AdamW state_dict (building a real optimizer costs seconds of imports).
    optimizer = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3, generator=g)}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "foreach": None, "amsgrad": False, "params": [0]}],
    }
    state = {
        "step": 17,
        "optimizer": optimizer,
        "nested": {"list": [1, 2.5, "x", None, True], "tuple": (1, (2, 3)), 7: b"raw"},
        "ordered": collections.OrderedDict([("b", torch.arange(3)), ("a", 1.0)]),
        "size": torch.Size([2, 3]),
    }

    mgr = CheckpointManager(tmp_path / "checkpoints", keep=2)
    path = mgr.save(17, tensors, state)
    assert path == tmp_path / "checkpoints" / "step_00000017"
    assert sorted(p.name for p in path.iterdir()) == sorted([MODEL_FILE, STATE_FILE, MARKER_FILE])
    assert _hidden_entries(path.parent) == []

    loaded, loaded_state = CheckpointManager.load(path)
    assert set(loaded) == set(tensors)
    for name, original in originals.items():
        assert _bits_equal(loaded[name], original), name
        assert _bits_equal(tensors[name].detach(), original), f"caller's {name} was modified"
    assert loaded["tied_a"].untyped_storage().data_ptr() != loaded["tied_b"].untyped_storage().data_ptr()

    assert loaded_state["step"] == 17
    assert loaded_state["nested"] == state["nested"]
    assert type(loaded_state["nested"]["tuple"]) is tuple
    assert type(loaded_state["ordered"]) is collections.OrderedDict
    assert list(loaded_state["ordered"]) == ["b", "a"]
    assert loaded_state["size"] == torch.Size([2, 3])
    assert loaded_state["optimizer"]["param_groups"] == optimizer["param_groups"]
    for key in ("step", "exp_avg"):
        assert _bits_equal(loaded_state["optimizer"]["state"][0][key], optimizer["state"][0][key])
    assert CheckpointManager.step_of(path) == 17


def test_unsafe_train_state_fails_the_save_and_names_the_key(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=2)
    with pytest.raises(CheckpointError, match=r"train_state\['sched'\]\['lr'\].*numpy"):
        mgr.save(1, _tiny(1), {"sched": {"lr": np.float64(0.1)}})
    with pytest.raises(CheckpointError, match="tensors must be"):
        mgr.save(1, [torch.ones(1)], {})  # type: ignore[arg-type]
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_empty_root_is_a_fresh_start_and_readers_create_nothing(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    mgr = CheckpointManager(root, keep=1)
    assert mgr.complete_checkpoints() == [] and mgr.latest() is None
    assert mgr.load_latest_valid() is None
    assert not root.exists()
    with pytest.raises(ValueError, match="keep"):
        CheckpointManager(root, keep=0)


# ---------------------------------------------------------------------------------------
# Rotation and same-step re-saves
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_rotation_keeps_exactly_the_newest(tmp_path: Path, keep: int) -> None:
    mgr = CheckpointManager(tmp_path, keep=keep)
    for step in range(1, 6):
        mgr.save(step * 10, _tiny(step), {"step": step * 10})
    assert [CheckpointManager.step_of(p) for p in mgr.complete_checkpoints()] == [
        10 * s for s in range(6 - keep, 6)
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"step_{10 * s:08d}" for s in range(6 - keep, 6)]
    assert mgr.latest() == tmp_path / "step_00000050"


def test_saving_an_older_step_never_deletes_it(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=1)
    mgr.save(5, _tiny(5), {})
    with pytest.warns(RuntimeWarning, match=r"later steps \[5\]"):
        path = mgr.save(3, _tiny(3), {})
    assert path.is_dir() and mgr.latest() == tmp_path / "step_00000005"


def test_resave_of_same_step_replaces_it(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=2)
    mgr.save(4, {"w": torch.zeros(3)}, {"v": "old"})
    mgr.save(4, {"w": torch.ones(3)}, {"v": "new"})
    tensors, state = CheckpointManager.load(tmp_path / "step_00000004")
    assert state == {"v": "new"} and torch.equal(tensors["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004"]


def test_copy_displaced_by_an_interrupted_resave_is_not_lost(tmp_path: Path) -> None:
    """The writer died between moving step_4 aside and renaming the new copy in."""
    mgr = CheckpointManager(tmp_path, keep=2)
    mgr.save(3, _tiny(3), {"step": 3})
    mgr.save(4, _tiny(4), {"step": 4})
    aside = tmp_path / ".old-step_00000004-999999"
    os.replace(tmp_path / "step_00000004", aside)
    (tmp_path / ".tmp-step_00000004-999999").mkdir()  # the new copy that never landed

    assert mgr.latest() == aside
    found = mgr.load_latest_valid()
    assert found is not None and found[0] == aside and found[2] == {"step": 4}

    mgr.save(5, _tiny(5), {"step": 5})  # the next save puts step 4 back and tidies up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000005"]
    assert CheckpointManager.load(tmp_path / "step_00000004")[1] == {"step": 4}


# ---------------------------------------------------------------------------------------
# Incomplete, corrupt and malicious checkpoints
# ---------------------------------------------------------------------------------------


def test_directory_without_marker_is_ignored_and_refused(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=3)
    good = mgr.save(1, _tiny(1), {"step": 1})
    partial = tmp_path / "step_00000002"
    partial.mkdir()
    for name in (MODEL_FILE, STATE_FILE):
        (partial / name).write_bytes((good / name).read_bytes())
    renamed = tmp_path / "step_00000009"  # a complete copy under another step's name
    renamed.mkdir()
    for name in (MODEL_FILE, STATE_FILE, MARKER_FILE):
        (renamed / name).write_bytes((good / name).read_bytes())

    assert mgr.complete_checkpoints() == [good] and mgr.latest() == good
    with pytest.raises(CheckpointError, match=rf"{partial}.*no {MARKER_FILE} marker"):
        CheckpointManager.load(partial)
    with pytest.raises(CheckpointError, match="name disagrees"):
        CheckpointManager.load(renamed)


def test_truncated_model_is_skipped_with_a_warning(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=3)
    mgr.save(1, {"w": torch.randn(1000)}, {"step": 1})
    bad = mgr.save(2, {"w": torch.randn(1000)}, {"step": 2})
    model = bad / MODEL_FILE
    with open(model, "r+b") as f:
        f.truncate(model.stat().st_size // 2)

    assert mgr.latest() == bad  # complete when written: damage is found by loading
    with pytest.warns(RuntimeWarning, match=r"skipping checkpoint .*step_00000002"):
        found = mgr.load_latest_valid()
    assert found is not None
    path, tensors, state = found
    assert path == tmp_path / "step_00000001" and state == {"step": 1} and tensors["w"].shape == (1000,)

    with pytest.raises(CheckpointError, match=rf"{bad}.*{MODEL_FILE} has"):
        CheckpointManager.load(bad, verify=False)
    # Even with a marker that agrees, safetensors' own failure comes out as CheckpointError.
    _rewrite_marker(bad)
    with pytest.raises(CheckpointError, match=rf"cannot load checkpoint {bad}"):
        CheckpointManager.load(bad, verify=False)


def test_flipped_bytes_fail_the_checksum(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=3)
    bad = mgr.save(1, {"w": torch.zeros(1000)}, {})
    model = bad / MODEL_FILE
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{bad}.*sha256"):
        CheckpointManager.load(bad)


class _Payload:
    """Unpickling this would run a shell command that creates the sentinel file."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


class _Custom:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __setstate__(self, state: dict) -> None:  # runs only if the class is unpickled
        Path(state["sentinel"]).touch()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("kind", ["reduce-os-system", "custom-class", "plain-pickle"])
def test_pickled_code_is_never_executed(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "checkpoints"
    mgr = CheckpointManager(root, keep=3)
    mgr.save(1, _tiny(1), {"step": 1})
    evil = mgr.save(2, _tiny(2), {"step": 2})
    sentinel = tmp_path / "pwned"
    state_file = evil / STATE_FILE
    if kind == "reduce-os-system":
        torch.save({"step": 2, "x": _Payload(sentinel)}, state_file)
    elif kind == "custom-class":
        torch.save({"step": 2, "x": _Custom(sentinel)}, state_file)
    else:
        state_file.write_bytes(pickle.dumps({"step": 2, "x": _Payload(sentinel)}))
    _rewrite_marker(evil)  # the marker is no defence: weights_only is

    with pytest.raises(CheckpointError, match=rf"cannot load checkpoint {evil}"):
        CheckpointManager.load(evil)
    with pytest.warns(RuntimeWarning, match="step_00000002"):
        found = mgr.load_latest_valid()
    assert found is not None and found[2] == {"step": 1}
    assert not sentinel.exists()


# ---------------------------------------------------------------------------------------
# RNG
# ---------------------------------------------------------------------------------------


def _draws() -> tuple:
    return (
        [random.random() for _ in range(3)],
        random.gauss(0.0, 1.0),
        np.random.rand(3).tolist(),
        float(np.random.standard_normal()),
        torch.rand(3).tolist(),
        torch.randint(0, 1000, (4,)).tolist(),
    )


def test_rng_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    # Leave a cached Gaussian in both Python and NumPy so their extra state is exercised.
    random.gauss(0.0, 1.0)
    np.random.standard_normal()
    state = capture_rng_state()
    expected = _draws()

    mgr = CheckpointManager(tmp_path, keep=1)
    mgr.save(1, _tiny(1), {"rng": state})
    _, loaded = CheckpointManager.load(tmp_path / "step_00000001")

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    assert _draws() != expected
    restore_rng_state(loaded["rng"])
    assert _draws() == expected
    restore_rng_state(state)
    assert _draws() == expected


# ---------------------------------------------------------------------------------------
# SIGKILL at arbitrary moments
# ---------------------------------------------------------------------------------------

# One interpreter pays for `import torch` once; each round forks a writer from it, and
# the test SIGKILLs that writer. Each writer resumes like a trainer: it re-saves the
# latest step (the same-step replace path), then keeps saving ~4 MB checkpoints.
_SUPERVISOR = r"""
import os, sys
from pathlib import Path
import torch
from moco_mm.train.checkpoint import BackgroundWriter, CheckpointManager

root = Path(sys.argv[1])

def write_forever():
    mgr = CheckpointManager(root, keep=3)
    # As the trainer saves: on the background writer thread, each submit waiting for the
    # previous write, so kills also land while the writer thread writes.
    writer = BackgroundWriter(mgr)
    latest = mgr.latest()
    step = start = CheckpointManager.step_of(latest) if latest is not None else 0
    while True:
        tensors = {
            "w": torch.full((1 << 20,), float(step)),
            "ids": torch.arange(step, step + 1000),
            "half": torch.full((1000,), float(step % 256), dtype=torch.bfloat16),
        }
        writer.submit(step, tensors, {"step": step, "pid": os.getpid(), "nested": {"l": [step, 0.5]}})
        if step > start:  # submit returned: the previous write is complete
            os.write(1, f"saved {step - 1}\n".encode())
        step += 1

pid = None
for line in sys.stdin:
    if line.strip() == "fork":
        pid = os.fork()
        if pid == 0:
            try:
                write_forever()
            finally:
                os._exit(1)
        print(f"child {pid}", flush=True)
    elif line.strip() == "reap":
        _, status = os.waitpid(pid, 0)
        print(f"reaped {os.WTERMSIG(status) if os.WIFSIGNALED(status) else -1}", flush=True)
"""


def _check_invariants(mgr: CheckpointManager, confirmed: int | None) -> int:
    """Every step_* directory is complete and loads with consistent contents; the newest
    confirmed save survived. Returns the number of complete checkpoints."""
    complete = mgr.complete_checkpoints()
    if not mgr.root.exists():  # killed before its first save
        assert confirmed is None
        return 0
    step_dirs = sorted(p for p in mgr.root.iterdir() if p.name.startswith("step_"))
    assert set(step_dirs) <= set(complete), f"incomplete step dirs: {set(step_dirs) - set(complete)}"
    for path in complete:
        tensors, state = CheckpointManager.load(path)
        step = state["step"]
        assert CheckpointManager.step_of(path) == step
        assert torch.equal(tensors["w"], torch.full((1 << 20,), float(step)))
        assert torch.equal(tensors["ids"], torch.arange(step, step + 1000))
    if confirmed is not None:
        latest = mgr.latest()
        assert latest is not None and CheckpointManager.step_of(latest) >= confirmed
        assert latest == max(complete, key=CheckpointManager.step_of)
    assert len(complete) <= mgr.keep + 1  # +1: killed after the rename, before rotation
    return len(complete)


def test_sigkill_at_any_moment_leaves_only_complete_checkpoints(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    mgr = CheckpointManager(root, keep=3)
    err_path = tmp_path / "supervisor.stderr"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    rng = random.Random(1234)
    # (saves to wait for, then seconds to sleep) before each SIGKILL. Waiting on reported
    # saves keeps the plan independent of machine speed; the jitter (a save takes tens of
    # ms) lands kills in different phases: writing, hashing, fsync, renames, rotation.
    plan = [(0, 0.0), (0, 0.005), (0, 0.03)] + [(n, rng.uniform(0.0, 0.05)) for n in (1, 1, 2, 2, 3, 1)]
    confirmed: int | None = None
    total_saves = 0
    left_tmp = 0
    with open(err_path, "w") as err:
        sup = subprocess.Popen(
            [sys.executable, "-c", _SUPERVISOR, str(root)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=env,
        )
    try:
        def read_until(saved: list[int], until: str = "", min_saves: int = 0) -> str:
            """Collect 'saved N' lines into `saved` until a line starting with `until`
            (returns its argument) or until `min_saves` saves were seen."""
            assert sup.stdout is not None
            while not (min_saves and len(saved) >= min_saves):
                line = sup.stdout.readline()
                assert line, f"supervisor died: {err_path.read_text()}"
                if line.startswith("saved "):
                    saved.append(int(line.split()[1]))
                elif until and line.startswith(until):
                    return line.split()[1]
            return ""

        def command(cmd: str, saved: list[int], until: str) -> str:
            assert sup.stdin is not None
            sup.stdin.write(cmd + "\n")
            sup.stdin.flush()
            return read_until(saved, until)

        for after_saves, delay in plan:
            saved: list[int] = []
            child = command("fork", saved, "child")
            if after_saves:
                read_until(saved, min_saves=after_saves)
            time.sleep(delay)
            os.kill(int(child), signal.SIGKILL)
            signum = command("reap", saved, "reaped")
            assert int(signum) == signal.SIGKILL, f"writer did not die by SIGKILL: {err_path.read_text()}"
            total_saves += len(saved)
            if saved:
                confirmed = max(saved)
            left_tmp += any(p.name.startswith(".tmp-") for p in root.iterdir()) if root.exists() else 0
            n_complete = _check_invariants(mgr, confirmed)
            hidden = _hidden_entries(root) if root.exists() else []
            # Shown by pytest on failure: where each kill landed.
            print(f"after {after_saves} saves + {delay:.3f}s: saved {saved}, complete {n_complete}, left {hidden}")
    finally:
        sup.kill()
        sup.wait()
    assert total_saves >= sum(n for n, _ in plan)

    # A new writer (another pid) sweeps what killed writers left behind.
    stale = root / ".tmp-step_00000999-4242"  # planted so the sweep is always exercised
    stale.mkdir()
    (stale / MODEL_FILE).write_bytes(b"partial")
    (root / ".trash-step_00000001-4242").mkdir()
    before = _check_invariants(mgr, confirmed)
    latest = mgr.latest()
    assert latest is not None
    step = CheckpointManager.step_of(latest) + 1
    mgr.save(step, {"w": torch.full((1 << 20,), float(step)), "ids": torch.arange(step, step + 1000)}, {"step": step})
    assert _hidden_entries(root) == [], f"kills that left a .tmp dir: {left_tmp}"
    assert _check_invariants(mgr, step) == min(mgr.keep, before + 1)


# --- the background writer --------------------------------------------------------------


def _payload() -> tuple[dict[str, torch.Tensor], dict]:
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(1000, generator=g), "half": torch.randn(10, generator=g).bfloat16(),
               "ids": torch.arange(7)}
    state = {"step": 5, "optimizer": {"state": {0: {"exp_avg": torch.randn(1000, generator=g)}}}, "l": [1, 0.5]}
    return tensors, state


def test_background_writer_writes_the_bytes_of_a_synchronous_save_from_a_snapshot(tmp_path: Path) -> None:
    tensors, state = _payload()
    sync = CheckpointManager(tmp_path / "sync").save(5, tensors, state)
    writer = BackgroundWriter(CheckpointManager(tmp_path / "bg"))
    stall = writer.submit(5, tensors, state)
    # Training goes on at once, changing the very tensors being written: the snapshot holds.
    tensors["w"].add_(1.0)
    state["optimizer"]["state"][0]["exp_avg"].mul_(0.0)
    done = writer.wait()
    assert done == tmp_path / "bg" / "step_00000005" and stall >= 0
    for name in (MODEL_FILE, STATE_FILE):
        assert (done / name).read_bytes() == (sync / name).read_bytes(), name
    marker = json.loads((done / MARKER_FILE).read_text())
    assert marker["files"] == json.loads((sync / MARKER_FILE).read_text())["files"]
    assert writer.wait() is None  # nothing in flight


def test_a_second_save_waits_for_the_first(tmp_path: Path, monkeypatch) -> None:
    import threading

    mgr = CheckpointManager(tmp_path, keep=5)
    release, entered = threading.Event(), threading.Event()
    real_write = mgr._write

    def slow_write(tmp, step, tensors, state):
        if step == 1:
            entered.set()
            assert release.wait(10)
        real_write(tmp, step, tensors, state)

    monkeypatch.setattr(mgr, "_write", slow_write)
    writer = BackgroundWriter(mgr)
    writer.submit(1, _tiny(1), {"step": 1})
    assert entered.wait(10) and writer.busy
    second = threading.Thread(target=writer.submit, args=(2, _tiny(2), {"step": 2}))
    second.start()
    second.join(0.3)
    assert second.is_alive(), "the second save did not wait for the first"
    assert not (tmp_path / "step_00000002").exists() and not (tmp_path / "step_00000001").exists()
    release.set()
    second.join(10)
    assert not second.is_alive()
    writer.wait()
    assert [CheckpointManager.step_of(p) for p in mgr.complete_checkpoints()] == [1, 2]


@pytest.mark.parametrize("surfaces_at", ["next save", "end"])
def test_a_failed_background_write_is_raised_on_the_training_thread(tmp_path: Path, monkeypatch,
                                                                    surfaces_at: str) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, _tiny(1), {"step": 1})

    def full_disk(tmp, step, tensors, state):
        (tmp / MODEL_FILE).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mgr, "_write", full_disk)
    writer = BackgroundWriter(mgr)
    writer.submit(2, _tiny(2), {"step": 2})  # returns: the failure happens on the writer thread
    with pytest.raises(CheckpointError, match=r"step 2 .*No space left on device") as info:
        if surfaces_at == "next save":
            writer.submit(3, _tiny(3), {"step": 3})
        else:
            writer.wait()
    assert isinstance(info.value.__cause__, OSError)
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]  # no partial directory left
    assert writer.wait() is None  # raised once, not lost and not repeated
