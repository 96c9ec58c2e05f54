# Sourced by the launch scripts and .ci/run: create .venv when missing, install the
# package with its pinned torch, and activate it. Idempotent and quick when up to date.
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
stamp="$VENV/.moco_mm-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    python -m pip install -q --upgrade pip
    python -m pip install -q -c constraints.txt -e ".[dev,export,search,bench]"
    touch "$stamp"
fi
