#!/usr/bin/env bash
# Regenerate requirements.lock from pyproject.toml's ranges, every extra included, with
# torch/torchvision held at constraints.txt's pins. Run after changing a dependency:
#   bash launch/lock.sh                      # keep every other pin that still fits
#   bash launch/lock.sh --upgrade            # move every package to its newest fitting release
#   bash launch/lock.sh --upgrade-package timm
# then run the tests (bash launch/test.sh reinstalls from the new lock) and commit both files.
# The lock is resolved for CPython 3.11 on Linux x86_64 (the CPU machines and the CUDA image).
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=${LOCK_VENV:-${TMPDIR:-/tmp}/moco_mm-lock-tools}
if [ ! -x "$TOOLS/bin/pip-compile" ]; then
    python3 -m venv "$TOOLS"
    "$TOOLS/bin/python" -m pip install -q "pip-tools==7.6.2"
fi
extras=$(python3 -c 'import tomllib; print(" ".join("--extra=" + e for e in sorted(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"])))')
# shellcheck disable=SC2086
"$TOOLS/bin/pip-compile" --quiet --strip-extras --no-emit-index-url --no-emit-find-links \
    --constraint=constraints.txt $extras --output-file=requirements.lock "$@" pyproject.toml
echo "wrote requirements.lock ($(grep -c '==' requirements.lock) pins)"
