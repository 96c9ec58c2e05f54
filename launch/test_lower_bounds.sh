#!/usr/bin/env bash
# Keep pyproject's lower bounds honest: a second virtual environment with the lock's
# versions except the lowest releases pyproject admits for the libraries whose behaviour
# we depend on, then the core tests (not the ones for the [bench] extra, whose
# open-clip-torch needs a newer timm). Not part of CI (a second torch install); run it
# when a lower bound changes:   bash launch/test_lower_bounds.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
LOW=${LOW_VENV:-.venv-lowest}
if [ ! -x "$LOW/bin/python" ]; then
    python3 -m venv "$LOW"
    "$LOW/bin/python" -m pip install -q -r requirements.lock
    # The lowest releases pyproject.toml admits (torch stays at the lock's: only it is on disk here).
    "$LOW/bin/python" -m pip install -q "timm==1.0.13" "transformers==4.45.2" "tokenizers==0.20.3" \
        "huggingface-hub<1.0" "safetensors==0.4.5" "webdataset==0.2.100"
    "$LOW/bin/python" -m pip install -q --no-deps -e .
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=disabled
PATH="$PWD/$LOW/bin:$PATH" "$LOW/bin/python" -m pytest -q -p no:cacheprovider \
    --ignore=tests/test_bench.py --ignore=tests/test_lock.py --ignore=tests/test_plan_memory.py "$@"
