"""Preemption: SIGTERM / SIGUSR1 -> every rank checkpoints the same step and exits 75.

A signal handler only sets a flag. At each step boundary every rank calls
`Preemption.should_stop(step)`:

* one process: the flag alone; the run stops at the boundary where it is first seen;
* several processes: a rank that sees its flag at boundary s writes "stop after step s + 2"
  into the c10d store the process group already uses (`compare_set`: the first rank to ask
  wins, every later one reads the winner's step). Every rank checks the key with one cheap
  store call per step (`check`, a round trip to the store, not a collective). Under DDP the
  ranks are at most one step apart (each step's gather and gradient all-reduce need every
  rank), so no rank is past boundary s + 1 when the key appears: every rank sees it before
  boundary s + 2 and all of them stop there, with no collective added to ordinary steps.

The trainer then writes a checkpoint of that step (not the last `checkpoint.every`
multiple), rank 0 waits until it is complete and writes ``RUN_DIR/PREEMPTED`` (JSON: step,
signal, checkpoint), and every process exits with `EXIT_PREEMPTED` (75, EX_TEMPFAIL). A run
that starts (resume=auto) removes the marker. torchrun reports its own exit status, not the
worker's, so launchers read the marker: launch/slurm.sbatch requeues the job when it exists.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

log = logging.getLogger("moco_mm.train")

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: "try again later"
MARKER = "PREEMPTED"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STORE_KEY = "moco_mm/preempt/stop_after_step"
# Ranks are at most one step apart: a stop this far ahead of the first rank that asks is
# still ahead of every rank when the others read it.
LEAD_STEPS = 2


class Preempted(SystemExit):
    """Raised by `Trainer.train` after the preemption checkpoint: exit status 75."""

    def __init__(self, step: int, signame: str):
        super().__init__(EXIT_PREEMPTED)
        self.step, self.signame = step, signame


class Preemption:
    """The signal flag and the cross-rank agreement on the step to stop after.

    `store`: the process group's c10d store (None for one process)."""

    def __init__(self, store=None, rank: int = 0):
        self.store = store
        self.rank = rank
        self.signame: str | None = None  # the first signal received, by name
        self.stop_after: int | None = None
        self._previous: dict = {}

    def install(self) -> None:
        """Catch SIGTERM and SIGUSR1 (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handler(self, signum, frame) -> None:
        # Only a flag: no I/O, no lock, nothing that could deadlock inside a signal handler.
        if self.signame is None:
            self.signame = signal.Signals(signum).name

    def request(self, signame: str = "SIGTERM") -> None:
        """What the handler does, callable from code (tests)."""
        if self.signame is None:
            self.signame = signame

    def should_stop(self, step: int) -> bool:
        """At the boundary after `step` optimizer steps: stop here (checkpoint, exit)?
        Every rank calls it at every boundary; it never issues a collective."""
        if self.stop_after is None:
            if self.store is None:
                if self.signame is not None:
                    self.stop_after = step
            elif self.signame is not None:
                agreed = int(self.store.compare_set(STORE_KEY, "", str(step + LEAD_STEPS)))
                self.stop_after = agreed
                log.warning("rank %d: %s received after step %d; all ranks stop after step %d",
                            self.rank, self.signame, step, agreed)
            elif self.store.check([STORE_KEY]):
                self.stop_after = int(self.store.get(STORE_KEY))
                self.signame = "peer"
        return self.stop_after is not None and step >= self.stop_after


def write_marker(run_dir: Path, step: int, signame: str, checkpoint: Path | None) -> Path:
    """``RUN_DIR/PREEMPTED`` (atomic): the step saved, the signal, the checkpoint."""
    path = Path(run_dir) / MARKER
    tmp = path.with_name(f".{MARKER}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"step": step, "signal": signame, "checkpoint": str(checkpoint or ""),
                               "exit_code": EXIT_PREEMPTED, "time_unix": time.time()}) + "\n")
    os.replace(tmp, path)
    return path


def clear_marker(run_dir: Path) -> None:
    (Path(run_dir) / MARKER).unlink(missing_ok=True)
