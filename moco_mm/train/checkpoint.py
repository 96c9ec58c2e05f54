"""Atomic, rotating, code-free checkpoints: one directory per saved step.

On-disk layout (``root`` is ``RUN_DIR/checkpoints``)::

    root/
      step_00001000/
        model.safetensors   every model tensor under its stable name (query towers,
                            key towers, queues), CPU, contiguous, no shared storage
        train_state.pt      torch.save of plain containers (dict/list/tuple) holding
                            tensors, int, float, str, bool, None, bytes: optimizer,
                            scheduler, step, data position, RNG states
        COMPLETE            JSON marker written last: {"format", "step", "files":
                            {name: {"size", "sha256"}}}
      step_00002000/ ...
      step_00003000/        a SHARDED checkpoint (run.parallel: fsdp), every rank writes:
        dcp/                torch.distributed.checkpoint: .metadata + one __R_0.distcp per
                            rank ({"model": model state, "optim": optimizer state}; FSDP
                            shards as shards, replicated tensors once)
        train_state.pt      as above, less the optimizer (it is in dcp/)
        COMPLETE            marker with "layout": "sharded" and every file's size and hash
      .tmp-step_00003000-<pid>/    a save in progress (or killed mid-way)
      .old-step_00002000-<pid>/    a same-step re-save moved the previous copy aside
      .trash-step_00001000-<pid>/  a rotated-out checkpoint being deleted

Guarantees (single writer per ``root``: only rank 0 calls `CheckpointManager.save`):

* Atomicity. A save is written into a ``.tmp-*`` sibling, every file and the directory
  are fsynced, and only then is it renamed to ``step_NNNNNNNN`` (and ``root`` fsynced).
  A SIGKILL at any moment therefore leaves every previously completed checkpoint intact
  and never leaves a ``step_*`` directory that lacks its marker. Deletions rename the
  victim to ``.trash-*`` first, for the same reason.
* Same-step re-save (e.g. after a resume) moves the old copy to ``.old-*`` before the new
  one is renamed into place. If the writer dies between those two renames, the ``.old-*``
  copy is still reported by `complete_checkpoints` for its step, and the next save
  renames it back; a completed checkpoint is never lost.
* Rotation. After each save the newest ``keep`` complete checkpoints (by step) are kept
  and older ones deleted; the one just written is never deleted, even if newer steps
  exist. Stale ``.tmp-*`` / ``.trash-*`` directories from killed writers are removed at
  the start of each save. Nothing in ``root`` is touched by readers.
* Safe loading. `CheckpointManager.load` refuses a directory without a valid marker,
  checks file sizes and (by default) SHA-256 sums, reads tensors with safetensors and the
  training state with ``torch.load(weights_only=True)``: no pickled code ever runs. Every
  failure is a `CheckpointError` naming the directory and the cause.
  `CheckpointManager.load_latest_valid` walks from the newest complete checkpoint down
  and skips (with a warning naming it) any that fails to load.

* Sharded checkpoints (`save_sharded`, `load_sharded`, `load_latest_valid_sharded`) keep
  every guarantee above: every rank writes its shard into the same ``.tmp-*`` directory
  (shared storage), rank 0 writes the state and the marker (each rank hashes its own
  shard) and commits and rotates; loading verifies the files (split between the ranks)
  and every rank agrees on which checkpoint it loads. `load` reads one in a single
  process as whole tensors under the same names, so export, `checkpoint.init_weights`
  and `consolidate` work on both layouts.

* Off the training thread. `BackgroundWriter.submit` copies the tensors and state to the
  CPU (`snapshot`) on the caller's thread and runs the same `save` on a writer thread; one
  write at a time (the next submit waits), and a failed write is raised by the next
  `submit` or `wait`.

`capture_rng_state` / `restore_rng_state` turn the Python, NumPy, torch CPU and CUDA
generators into a value that fits in ``train_state`` (weights_only-safe types only).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import random
import re
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from moco_mm import distributed as D
from moco_mm.config import CHECKPOINT_MARKER

__all__ = [
    "MARKER_FILE",
    "MODEL_FILE",
    "STATE_FILE",
    "CheckpointError",
    "BackgroundWriter",
    "CheckpointManager",
    "capture_rng_state",
    "consolidate",
    "restore_rng_state",
    "snapshot",
    "step_dir_name",
]

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
SHARDS_DIR = "dcp"  # a sharded checkpoint's torch.distributed.checkpoint directory
MARKER_FILE = CHECKPOINT_MARKER
_FORMAT = 1
_STEP_RE = re.compile(r"step_(\d{8,})")
# Hidden working names: ".<kind>-step_NNNNNNNN-<pid>". The leading dot keeps them out of
# anything that globs "step_*".
_WORK_RE = re.compile(r"\.(tmp|old|trash)-step_(\d{8,})-(\d+)")
_HASH_CHUNK = 1 << 20
log = logging.getLogger("moco_mm.train")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or loaded. The message names the path and the cause."""


def step_dir_name(step: int) -> str:
    """``step_NNNNNNNN``: zero-padded so a listing reads in step order; the manager itself
    always orders by the number, so steps past 10^8 (9 digits) still sort right."""
    return f"step_{step:08d}"


# ---------------------------------------------------------------------------------------
# Durability helpers
# ---------------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes its entries durable)."""
    if os.name != "posix":  # directories cannot be opened for fsync elsewhere
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# What may be written
# ---------------------------------------------------------------------------------------


def _prepare_tensors(tensors: dict[str, torch.Tensor], copy: bool = False) -> dict[str, torch.Tensor]:
    """Detached, dense, contiguous CPU tensors, no two sharing storage (safetensors refuses
    aliases). The caller's tensors are never modified. ``copy``: every tensor is a fresh
    CPU copy (never the caller's storage), so training may go on changing the originals."""
    if not isinstance(tensors, dict):
        raise CheckpointError(f"tensors must be a dict[str, Tensor], got {type(tensors).__name__}")
    out: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise CheckpointError(f"tensor names must be str, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"tensors[{name!r}] is a {type(tensor).__name__}, not a Tensor")
        if tensor.layout != torch.strided:
            raise CheckpointError(f"tensors[{name!r}] is {tensor.layout}; only dense tensors are saved")
        # resolve_*: lazy conjugate/negative views would otherwise be written un-applied.
        t = tensor.detach().to("cpu", copy=copy).resolve_conj().resolve_neg().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen_storages:
            # Tied weights / views of one buffer: give each name its own copy on disk.
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen_storages.add(ptr)
        out[name] = t
    return out


_SAFE_SCALARS = (int, float, str, bool, bytes, type(None))


def _safe_state(obj: Any, where: str, copy: bool = False) -> Any:
    """A copy of ``obj`` that ``torch.load(weights_only=True)`` is known to read back.

    Checked at save time so that a bad value fails the save that introduced it, naming
    the key, instead of failing a resume days later. Parameters become plain tensors;
    with ``copy`` every tensor is a fresh CPU copy (a snapshot the caller may go on changing).
    """
    kind = type(obj)
    if kind in _SAFE_SCALARS:
        return obj
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if type(t) is not torch.Tensor or t.layout != torch.strided:
            raise CheckpointError(f"{where}: tensor of type {type(obj).__name__} / {t.layout} is not saved")
        return t.to("cpu", copy=True) if copy else t
    if kind in (dict, collections.OrderedDict):
        out = kind()
        for key, value in obj.items():
            if type(key) not in _SAFE_SCALARS:
                raise CheckpointError(f"{where}: dict key {key!r} of type {type(key).__name__} is not saved")
            out[key] = _safe_state(value, f"{where}[{key!r}]", copy)
        return out
    if kind in (list, tuple):
        return kind(_safe_state(v, f"{where}[{i}]", copy) for i, v in enumerate(obj))
    if kind is torch.Size:
        return obj
    raise CheckpointError(
        f"{where}: {kind.__module__}.{kind.__qualname__} is not a weights_only-safe type "
        "(use dict/list/tuple of tensors, int, float, str, bool, bytes, None)"
    )


# ---------------------------------------------------------------------------------------
# Marker
# ---------------------------------------------------------------------------------------


def _read_marker(directory: Path) -> dict:
    """The parsed marker of ``directory``; `CheckpointError` if missing or malformed."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a checkpoint: no such directory")
    marker_path = directory / MARKER_FILE
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{directory} is not a complete checkpoint: no {MARKER_FILE} marker "
            "(the save was interrupted, or this is not a checkpoint directory)"
        ) from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{directory}: unreadable {MARKER_FILE} marker: {exc}") from exc
    ok = (
        isinstance(marker, dict)
        and marker.get("format") == _FORMAT
        and type(marker.get("step")) is int
        and isinstance(marker.get("files"), dict)
        and _expected_files(marker.get("layout", "full"), set(marker["files"]))
        and all(
            isinstance(info, dict) and type(info.get("size")) is int and isinstance(info.get("sha256"), str)
            for info in marker["files"].values()
        )
    )
    if not ok:
        raise CheckpointError(f"{directory}: malformed {MARKER_FILE} marker: {marker!r}")
    # A copied or renamed directory must not pass for another step.
    if (m := _STEP_RE.fullmatch(directory.name)) and int(m[1]) != marker["step"]:
        raise CheckpointError(f"{directory}: marker says step {marker['step']}, the name disagrees")
    if (m := _WORK_RE.fullmatch(directory.name)) and int(m[2]) != marker["step"]:
        raise CheckpointError(f"{directory}: marker says step {marker['step']}, the name disagrees")
    return marker


def _expected_files(layout: str, names: set[str]) -> bool:
    """The files a marker of this layout must list: the model and the state (full), or the
    state, the DCP metadata and only DCP files beside them (sharded)."""
    if layout == "full":
        return names == {MODEL_FILE, STATE_FILE}
    if layout == "sharded":
        meta = f"{SHARDS_DIR}/.metadata"
        return {STATE_FILE, meta} <= names and all(n == STATE_FILE or n.startswith(f"{SHARDS_DIR}/") for n in names)
    return False


def _check_files(path: Path, files: dict, verify: bool) -> None:
    """Raise `CheckpointError` unless each file has the marker's size (and hash)."""
    for name, info in files.items():
        try:
            size = (path / name).stat().st_size
        except OSError as exc:
            raise CheckpointError(f"{name}: {exc}") from exc
        if size != info["size"]:
            raise CheckpointError(f"{name} has {size} bytes, the marker says {info['size']}")
        if verify and _sha256(path / name) != info["sha256"]:
            raise CheckpointError(f"{name} does not match its sha256 in the marker")


def _marker_step(directory: Path) -> int | None:
    """The step of a complete checkpoint directory, or None if it is not one."""
    try:
        return _read_marker(directory)["step"]
    except CheckpointError:
        return None


# ---------------------------------------------------------------------------------------
# The manager
# ---------------------------------------------------------------------------------------


class CheckpointManager:
    """Saves, rotates and finds the step directories under ``root``.

    Invariants: a ``step_*`` directory under ``root`` exists only once all its files and
    its marker are durable; at most one process (rank 0) writes under ``root``; readers
    (`complete_checkpoints`, `latest`, `load*`) never modify anything.
    """

    def __init__(self, root: Path | str, keep: int = 2) -> None:
        if type(keep) is not int or keep < 1:
            raise ValueError(f"checkpoint.keep must be an int >= 1, got {keep!r}")
        self.root = Path(root)
        self.keep = keep

    # -- finding -------------------------------------------------------------------------

    def _complete_by_step(self) -> dict[int, Path]:
        if not self.root.is_dir():
            return {}
        live: dict[int, Path] = {}
        displaced: dict[int, Path] = {}
        for entry in self.root.iterdir():
            if (m := _STEP_RE.fullmatch(entry.name)) and entry.name == step_dir_name(int(m[1])):
                if _marker_step(entry) is not None:
                    live[int(m[1])] = entry
            elif (m := _WORK_RE.fullmatch(entry.name)) and m[1] == "old":
                if _marker_step(entry) is not None:
                    displaced[int(m[2])] = entry
        # A displaced copy counts only while the re-save that displaced it has not landed.
        for step, path in displaced.items():
            live.setdefault(step, path)
        return live

    def complete_checkpoints(self) -> list[Path]:
        """Directories with a valid marker, oldest step first.

        Marker-only check (cheap): file damage after completion is caught by `load`.
        """
        by_step = self._complete_by_step()
        return [by_step[s] for s in sorted(by_step)]

    def latest(self) -> Path | None:
        """The complete checkpoint with the highest step, or None."""
        found = self.complete_checkpoints()
        return found[-1] if found else None

    @staticmethod
    def step_of(path: Path | str) -> int:
        """The step recorded in a complete checkpoint's marker."""
        return _read_marker(Path(path))["step"]

    @staticmethod
    def layout_of(path: Path | str) -> str:
        """"full" (model.safetensors, one writer) or "sharded" (dcp/, every rank wrote)."""
        return _read_marker(Path(path)).get("layout", "full")

    # -- saving --------------------------------------------------------------------------

    def save(self, step: int, tensors: dict[str, torch.Tensor], train_state: dict) -> Path:
        """Write ``root/step_{step:08d}`` atomically, then rotate. Rank 0 only.

        Returns the final directory. An exception before the final rename leaves every
        ``step_*`` directory as it was (a same-step copy moved aside is moved back); one
        during rotation leaves the new checkpoint in place and rotation to the next save.
        """
        if type(step) is not int or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if not isinstance(train_state, dict):
            raise CheckpointError(f"train_state must be a dict, got {type(train_state).__name__}")
        # Validate before touching the disk: a bad value must not cost a half-written save.
        prepared = _prepare_tensors(tensors)
        state = _safe_state(train_state, "train_state")

        self.root.mkdir(parents=True, exist_ok=True)
        # Stale work dirs go first: they may hold the disk space this save needs.
        self._cleanup_stale()
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{final.name}-{os.getpid()}"
        tmp.mkdir()
        try:
            self._write(tmp, step, prepared, state)
            self._commit(tmp, final, step)
        except BaseException:
            _rmtree(tmp)
            raise
        newer = sorted(s for s in self._complete_by_step() if s > step)
        if newer:
            # Usually a resume from an older checkpoint: `latest()` still points past it.
            warnings.warn(
                f"saved {final}, but checkpoints of later steps {newer} exist and stay the newest",
                RuntimeWarning,
                stacklevel=2,
            )
        self._rotate(protect=final)
        return final

    def _write(self, tmp: Path, step: int, tensors: dict[str, torch.Tensor], state: dict) -> None:
        model_path = tmp / MODEL_FILE
        # One metadata key only: safetensors stores metadata in a hash map whose order
        # changes from process to process, and two identical runs must write identical
        # bytes (the step is in the completion marker).
        safetensors.torch.save_file(tensors, model_path, metadata={"format": "pt"})
        _fsync_path(model_path)
        state_path = tmp / STATE_FILE
        with open(state_path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        # Hash what is on disk (page cache, so cheap) rather than what we meant to write.
        _write_marker(tmp, step, {name: _file_entry(tmp, name) for name in (MODEL_FILE, STATE_FILE)})

    def save_sharded(self, step: int, state_dict: dict, train_state: dict) -> Path | None:
        """Write ``root/step_{step:08d}`` as a sharded checkpoint. COLLECTIVE: every rank
        calls it with its own `state_dict` ({"model": ..., "optim": ...} holding FSDP shards
        and replicated tensors); the directory must be on storage every rank sees.

        Rank 0 validates `train_state` and makes the ``.tmp-*`` directory; every rank writes
        its shard there (`torch.distributed.checkpoint`, files fsynced) and hashes it; rank
        0 writes the state, the marker listing every file, commits and rotates exactly as
        `save` does. Returns the final directory on rank 0, None on the others."""
        from torch.distributed.checkpoint import FileSystemWriter
        from torch.distributed.checkpoint import save as dcp_save

        main = D.rank() == 0
        tmp_name, state = None, None
        if main:
            state = _safe_state(train_state, "train_state")  # a bad value fails before any write
            self.root.mkdir(parents=True, exist_ok=True)
            self._cleanup_stale()
            tmp_name = f".tmp-{step_dir_name(step)}-{os.getpid()}"
            (self.root / tmp_name).mkdir()
        tmp = self.root / D.broadcast_object(tmp_name)
        try:
            dcp_save(state_dict, storage_writer=FileSystemWriter(tmp / SHARDS_DIR, sync_files=True))
            own = sorted(p.name for p in (tmp / SHARDS_DIR).iterdir() if p.name.startswith(f"__{D.rank()}_"))
            files: dict = {}
            for part in D.gather_objects({f"{SHARDS_DIR}/{n}": _file_entry(tmp, f"{SHARDS_DIR}/{n}") for n in own}):
                files.update(part)
            if not main:
                return None
            unseen = sorted(n for n in files if not (tmp / n).is_file())
            if unseen:  # each node wrote into a directory of its own
                raise CheckpointError(f"rank 0 cannot see {unseen[:3]} in {tmp}: a sharded checkpoint needs "
                                      f"run.output_dir on storage every rank shares")
            with open(tmp / STATE_FILE, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            for name in (STATE_FILE, f"{SHARDS_DIR}/.metadata"):
                files[name] = _file_entry(tmp, name)
            _fsync_path(tmp / SHARDS_DIR)
            _write_marker(tmp, step, dict(sorted(files.items())), layout="sharded", world_size=D.world_size())
            final = self.root / step_dir_name(step)
            self._commit(tmp, final, step)
        except BaseException:
            if main:
                _rmtree(tmp)
            raise
        self._rotate(protect=final)
        return final

    def _commit(self, tmp: Path, final: Path, step: int) -> None:
        """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first because
        rename(2) cannot replace a non-empty directory."""
        if not final.exists():
            os.replace(tmp, final)
            _fsync_path(self.root)
            return
        aside = self.root / f".old-{final.name}-{os.getpid()}"
        _rmtree(aside)
        os.replace(final, aside)
        _fsync_path(self.root)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(aside, final)
            _fsync_path(self.root)
            raise
        _fsync_path(self.root)
        self._discard(aside, step)

    def _discard(self, path: Path, step: int) -> None:
        """Delete a directory without ever exposing a partly deleted checkpoint: rename it
        to ``.trash-*`` (atomic), then remove it."""
        trash = self.root / f".trash-{step_dir_name(step)}-{os.getpid()}"
        _rmtree(trash)
        os.replace(path, trash)
        _fsync_path(self.root)
        _rmtree(trash)

    def _cleanup_stale(self) -> None:
        """Remove what killed writers left; put back a displaced copy whose re-save never
        landed. Safe only because there is a single writer per root."""
        changed = False
        for entry in list(self.root.iterdir()):  # listed first: the loop renames entries
            name = entry.name
            if name.startswith((".tmp-", ".trash-")):
                _rmtree(entry)
                changed = True
            elif (m := _WORK_RE.fullmatch(name)) and m[1] == "old":
                step = int(m[2])
                live = self.root / step_dir_name(step)
                if _marker_step(live) is None and _marker_step(entry) is not None:
                    # Same rule as `complete_checkpoints`: the displaced copy is the one.
                    if live.exists():
                        self._discard(live, step)
                    os.replace(entry, live)
                else:
                    _rmtree(entry)
                changed = True
        if changed:
            _fsync_path(self.root)

    def _rotate(self, protect: Path) -> None:
        by_step = self._complete_by_step()
        steps = sorted(by_step)
        for step in steps[: max(0, len(steps) - self.keep)]:
            if by_step[step] != protect:
                self._discard(by_step[step], step)

    # -- loading -------------------------------------------------------------------------

    @staticmethod
    def load(path: Path | str, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
        """``(tensors, train_state)`` of one checkpoint directory, all on the CPU.

        Refuses a directory without a valid marker; checks sizes always and SHA-256 sums
        when ``verify``. Never unpickles code. Any failure is a `CheckpointError`.
        """
        path = Path(path)
        marker = _read_marker(path)
        try:
            _check_files(path, marker["files"], verify)
            if marker.get("layout", "full") == "sharded":
                tensors = _whole_model_tensors(path / SHARDS_DIR)
            else:
                tensors = safetensors.torch.load_file(path / MODEL_FILE, device="cpu")
            state = _load_state(path)
        except Exception as exc:
            raise CheckpointError(f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}") from exc
        return tensors, state

    @staticmethod
    def load_sharded(path: Path | str, state_dict: dict, verify: bool = True, check=None) -> dict:
        """Load a sharded checkpoint into `state_dict` IN PLACE (every rank its own shards,
        resharded by DCP if the world size changed) and return its train state. COLLECTIVE.
        The files are verified first, split between the ranks, and every rank raises the
        same `CheckpointError` when any check fails. `check(path, train_state)`, when given,
        runs before any tensor is read (e.g. to refuse an incompatible config)."""
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint import load as dcp_load

        path = Path(path)
        error = None
        try:
            marker = _read_marker(path)
            if marker.get("layout", "full") != "sharded":
                raise CheckpointError(f"{path} was written by a whole-model (run.parallel=ddp) run")
            names = sorted(marker["files"])
            _check_files(path, {n: marker["files"][n] for n in names[D.rank()::D.world_size()]}, verify)
            state = _load_state(path)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        errors = [e for e in D.gather_objects(error) if e]
        if errors:
            raise CheckpointError(f"cannot load checkpoint {path}: {errors[0]}")
        if check is not None:
            check(path, state)
        try:
            dcp_load(state_dict, storage_reader=FileSystemReader(path / SHARDS_DIR))
        except Exception as exc:  # DCP raises the same failure on every rank
            raise CheckpointError(f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}") from exc
        return state

    def load_latest_valid_sharded(self, state_dict: dict, verify: bool = True, check=None) -> tuple[Path, dict] | None:
        """`load_latest_valid` for sharded checkpoints (COLLECTIVE): the newest one that
        loads, into `state_dict` in place, as (path, train_state); None when there is none.
        Rank 0's listing decides, so every rank tries the same directories in the same order;
        a full-layout checkpoint among them is an error (`CheckpointError`), not skipped."""
        for path in D.broadcast_object(self.complete_checkpoints())[::-1]:
            if self.layout_of(path) != "sharded":
                raise CheckpointError(f"{path} was written by a whole-model (run.parallel=ddp) run")
            try:
                return path, self.load_sharded(path, state_dict, verify, check)
            except CheckpointError as exc:
                if D.rank() == 0:
                    warnings.warn(f"skipping checkpoint {path}: {exc}", RuntimeWarning, stacklevel=2)
        return None

    def load_latest_valid(self, verify: bool = True) -> tuple[Path, dict[str, torch.Tensor], dict] | None:
        """The newest checkpoint that loads, as ``(path, tensors, train_state)``; None when
        there is none (a fresh start). Each one skipped is reported with a warning."""
        for path in reversed(self.complete_checkpoints()):
            try:
                tensors, state = self.load(path, verify=verify)
            except CheckpointError as exc:
                warnings.warn(f"skipping checkpoint {path}: {exc}", RuntimeWarning, stacklevel=2)
                continue
            return path, tensors, state
        return None


def consolidate(src: Path | str, out: Path | str) -> Path:
    """Write checkpoint `src` (either layout) as a whole-model checkpoint directory `out`:
    model.safetensors (every tensor whole, the same names), train_state.pt and COMPLETE,
    atomically (a ``.tmp`` sibling renamed into place). A sharded source's optimizer
    state stays behind (it is keyed by parameter name, sharded): `out` serves export,
    `checkpoint.init_weights` and evaluation, and a DDP resume from it is refused.
    `out` must not exist."""
    src, out = Path(src), Path(out)
    if out.exists():
        raise CheckpointError(f"{out} already exists")
    tensors, state = CheckpointManager.load(src)
    state = {**state, "consolidated_from": str(src)}
    step = CheckpointManager.step_of(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    _rmtree(tmp)
    tmp.mkdir()
    try:
        CheckpointManager(out.parent)._write(tmp, step, _prepare_tensors(tensors), _safe_state(state, "train_state"))
        os.replace(tmp, out)
    except BaseException:
        _rmtree(tmp)
        raise
    _fsync_path(out.parent)
    return out


def _file_entry(directory: Path, name: str) -> dict:
    return {"size": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}


def _write_marker(directory: Path, step: int, files: dict, **extra) -> None:
    """The COMPLETE marker, written last and fsynced with its directory."""
    marker = {"format": _FORMAT, "step": step, **extra, "files": files, "created_unix": time.time()}
    with open(directory / MARKER_FILE, "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_path(directory)


def _load_state(path: Path) -> dict:
    state = torch.load(path / STATE_FILE, weights_only=True, map_location="cpu")
    if not isinstance(state, dict):
        raise CheckpointError(f"{STATE_FILE} holds a {type(state).__name__}, not a dict")
    return state


def _whole_model_tensors(shards: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a DCP directory, whole, on the CPU, in this process (no process
    group): the "model" half of what `save_sharded` wrote, under the model's own names."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    # What torch's own `dcp_to_torch_save` does (the public `load` only fills keys the
    # caller already has), restricted to the model half.
    loaded: dict = {}
    with warnings.catch_warnings():  # "no process group: loading in a single process": meant
        warnings.simplefilter("ignore", UserWarning)
        _load_state_dict(loaded, storage_reader=FileSystemReader(shards),
                         planner=_EmptyStateDictLoadPlanner(keys={"model"}), no_dist=True)
    return {name: t.contiguous() for name, t in loaded["model"].items()}


# ---------------------------------------------------------------------------------------
# Saving off the training thread
# ---------------------------------------------------------------------------------------


def snapshot(tensors: dict[str, torch.Tensor], train_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """CPU copies of what a save writes, validated as `CheckpointManager.save` validates it:
    the only part of a save that has to run on the training thread (on CUDA the device ->
    host copy; on the CPU a memcpy). Training may change the originals right after."""
    if not isinstance(train_state, dict):
        raise CheckpointError(f"train_state must be a dict, got {type(train_state).__name__}")
    return _prepare_tensors(tensors, copy=True), _safe_state(train_state, "train_state", copy=True)


class BackgroundWriter:
    """Writes checkpoints with a `CheckpointManager` on one background thread.

    `submit` takes the CPU snapshot on the calling (training) thread, then writes, hashes,
    commits and rotates on the writer thread: the same atomic ``.tmp-*`` directory, fsyncs,
    ``COMPLETE`` marker and rename as a synchronous `CheckpointManager.save`, so the bytes
    are the same and a kill at any moment leaves only complete checkpoints. At most one
    write is in flight: `submit` first waits for the previous one. A write that failed is
    raised (as `CheckpointError`, its cause chained) by the next `submit` or `wait`, never
    lost. Rank 0 only, like the manager.
    """

    def __init__(self, manager: CheckpointManager) -> None:
        self.manager = manager
        self._thread: threading.Thread | None = None
        self._step: int | None = None
        self._done: Path | None = None
        self._error: BaseException | None = None

    @property
    def busy(self) -> bool:
        """A write is still running."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, step: int, tensors: dict[str, torch.Tensor], train_state: dict) -> float:
        """Wait for the previous write (raising its failure), snapshot, start writing
        ``step``. Returns the seconds the caller was held (waiting + copying)."""
        t0 = time.perf_counter()
        self.wait()
        cpu_tensors, state = snapshot(tensors, train_state)
        self._step, self._done = step, None
        self._thread = threading.Thread(target=self._write, args=(step, cpu_tensors, state),
                                        name=f"checkpoint-{step_dir_name(step)}", daemon=True)
        self._thread.start()
        return time.perf_counter() - t0

    def _write(self, step: int, tensors: dict[str, torch.Tensor], state: dict) -> None:
        try:
            t0 = time.perf_counter()
            self._done = self.manager.save(step, tensors, state)
            log.info("saved %s (%.2f s on the writer thread)", self._done, time.perf_counter() - t0)
        except BaseException as exc:  # handed to the training thread by `wait`
            self._error = exc

    def wait(self) -> Path | None:
        """Block until the write in flight (if any) is done. Returns its directory (None if
        there was none); raises `CheckpointError` if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            exc, self._error = self._error, None
            raise CheckpointError(
                f"background write of checkpoint step {self._step} under {self.manager.root} failed: "
                f"{type(exc).__name__}: {exc}") from exc
        done, self._done = self._done, None
        return done


# ---------------------------------------------------------------------------------------
# Random number generators
# ---------------------------------------------------------------------------------------


def capture_rng_state() -> dict:
    """Python ``random``, NumPy's global RNG, torch CPU and every CUDA device's generator,
    as ints, floats, str, None, tuples and tensors only (weights_only-safe)."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    cuda: list[torch.Tensor] = []
    if torch.cuda.is_available():
        # Generator states live on the host; reading them creates no per-device context.
        cuda = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    return {
        "python": {"version": py_version, "internal": tuple(py_internal), "gauss_next": py_gauss},
        "numpy": {
            "bit_generator": str(np_name),
            # uint32 words widened to int64: exact, and a dtype every torch op supports.
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state`. CUDA states are restored for the devices present
    in both the state and this process; a mismatch is warned about (not exact then)."""
    try:
        py = state["python"]
        random.setstate((py["version"], tuple(int(x) for x in py["internal"]), py["gauss_next"]))
        npy = state["numpy"]
        np.random.set_state(
            (
                npy["bit_generator"],
                npy["keys"].numpy().astype(np.uint32),
                npy["pos"],
                npy["has_gauss"],
                npy["cached_gaussian"],
            )
        )
        torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
        cuda_states = list(state.get("cuda", []))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"malformed RNG state: {type(exc).__name__}: {exc}") from exc
    if not cuda_states:
        return
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have != len(cuda_states):
        warnings.warn(
            f"RNG state has {len(cuda_states)} CUDA generator(s), this process sees {have}; "
            f"restoring {min(have, len(cuda_states))}, so CUDA random draws will not repeat exactly",
            RuntimeWarning,
            stacklevel=2,
        )
    for index in range(min(have, len(cuda_states))):
        torch.cuda.set_rng_state(cuda_states[index].to("cpu", torch.uint8), index)
