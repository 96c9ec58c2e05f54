"""The lock file: it pins every package of every extra, each pin satisfies pyproject's range,
and the virtual environment the tests run in is exactly what it pins (`pip check` clean)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)\s*$")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            m = PIN.match(line.strip())
            assert m, f"requirements.lock: not a plain pin: {line!r}"
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def test_every_extra_is_locked():
    header = (ROOT / "requirements.lock").read_text().split("\n\n", 1)[0]
    extras = sorted(_pyproject()["project"]["optional-dependencies"])
    for extra in extras:
        assert f"--extra={extra}" in header, f"extra {extra!r} is not in the lock: run bash launch/lock.sh"


def test_every_requirement_is_pinned_within_its_range():
    project = _pyproject()["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    pins = _pins()
    for text in reqs:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in requirements.lock: run bash launch/lock.sh"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {req.name}=={pins[name]}, outside pyproject's {text!r}: run bash launch/lock.sh")


def test_the_environment_is_the_lock():
    """What is installed is what the lock pins (a stale venv or a stray upgrade shows here)."""
    wrong = {}
    for name, version in _pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        # torch's local build tag (+cu130 / +cpu) is the wheel's, not a different release
        if installed is None or installed.split("+")[0] != version.split("+")[0]:
            wrong[name] = (version, installed)
    assert not wrong, f"installed packages differ from requirements.lock (pinned, installed): {wrong}"


def test_pip_check_passes():
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_failed_install_stops_the_setup_and_is_not_marked_done(tmp_path):
    """launch/_venv.sh under launch/test.sh (no `set -e`): when pip fails (here: a venv
    without pip; a full disk or a registry down alike), the setup returns non-zero before
    pytest and leaves no install stamp, so the next run installs again instead of testing
    a broken venv."""
    import os

    for name in ("requirements.lock", "pyproject.toml"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    env = dict(os.environ, VENV=str(tmp_path / "venv"))
    env.pop("VIRTUAL_ENV", None)
    script = f"set -uo pipefail; source {ROOT / 'launch' / '_venv.sh'} || exit 7; echo reached pytest"
    res = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 7 and "reached pytest" not in res.stdout, res.stdout + res.stderr
    assert "not marked installed" in res.stderr
    assert not (tmp_path / "venv" / ".moco_mm-installed").exists()
