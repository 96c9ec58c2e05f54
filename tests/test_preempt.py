"""Preemption agreement (moco_mm/train/preempt.py) without processes: the signal flag, the
stop step the ranks agree on through a c10d store, the marker. The end-to-end runs (SIGTERM
to one of two torchrun ranks, SIGUSR1 to one process, exact resume) are in test_train.py."""

from __future__ import annotations

import json
import os
import signal

import torch.distributed as dist

from moco_mm.train.preempt import EXIT_PREEMPTED, MARKER, Preempted, Preemption, clear_marker, write_marker


def test_one_process_stops_at_the_boundary_where_it_sees_the_signal():
    p = Preemption()
    p.install()
    try:
        assert not p.should_stop(3)
        os.kill(os.getpid(), signal.SIGUSR1)  # the handler only sets the flag
        assert p.signame == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)
        assert p.signame == "SIGUSR1"  # the first one is kept
        assert p.should_stop(4) and p.stop_after == 4 and p.should_stop(5)
    finally:
        p.uninstall()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_ranks_agree_on_one_stop_step_through_the_store():
    store = dist.HashStore()
    r0, r1, r2 = (Preemption(store, rank) for rank in range(3))
    assert not r0.should_stop(6) and not r1.should_stop(6) and not r2.should_stop(5)
    r1.request("SIGTERM")  # only rank 1 is signalled, after step 7
    assert not r1.should_stop(7) and r1.stop_after == 9
    r2.request("SIGUSR1")  # a later signal on another rank does not move the agreed step
    assert not r2.should_stop(6) and r2.stop_after == 9
    # rank 0, one step behind, sees the key at its next boundary: still ahead of the stop
    assert not r0.should_stop(6) and r0.stop_after == 9 and r0.signame == "peer"
    assert [r.should_stop(8) for r in (r0, r1, r2)] == [False] * 3
    assert [r.should_stop(9) for r in (r0, r1, r2)] == [True] * 3


def test_marker_and_exit_status(tmp_path):
    path = write_marker(tmp_path, 17, "SIGTERM", tmp_path / "checkpoints" / "step_00000017")
    assert path == tmp_path / MARKER
    assert json.loads(path.read_text())["step"] == 17 and [p.name for p in tmp_path.iterdir()] == [MARKER]
    clear_marker(tmp_path)
    clear_marker(tmp_path)  # absent: fine
    assert not path.exists()
    e = Preempted(17, "SIGTERM")
    assert isinstance(e, SystemExit) and e.code == EXIT_PREEMPTED == 75
