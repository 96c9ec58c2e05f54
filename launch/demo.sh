#!/usr/bin/env bash
# The demo, start to finish on the CPU: virtual environment, demo data + tokenizer,
# a 2-process pretraining (torchrun, gloo), and the held-out retrieval table.
#
#   bash launch/demo.sh            # from the repository root; extra args go to the trainer,
#   bash launch/demo.sh run.steps=100   # e.g. dotted overrides of configs/demo.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_venv.sh

moco-mm demo-data --out data/demo
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # 2 ranks x 1 thread on a 2-core machine
export TOKENIZERS_PARALLELISM=false
torchrun --nproc_per_node="${NPROC:-2}" --master_port="${MASTER_PORT:-29517}" \
    -m moco_mm.train --config configs/demo.yaml "$@"
