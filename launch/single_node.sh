#!/usr/bin/env bash
# One node, N GPUs (or CPU processes):
#   CONFIG=configs/a100-80gb-vitb16-bertbase.yaml NPROC=8 bash launch/single_node.sh [key=value ...]
# Variables: CONFIG (required), NPROC (processes, default: number of GPUs or 1),
#            MASTER_PORT (default 29500). Add torchrun's --max-restarts via MAX_RESTARTS
#            (default 3): with checkpoint.resume=auto a crashed rank brings the run back.
set -euo pipefail
: "${CONFIG:?set CONFIG=configs/NAME.yaml}"
NPROC=${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
exec torchrun --nproc_per_node="$NPROC" --max-restarts="${MAX_RESTARTS:-3}" \
    --rdzv_backend=c10d --rdzv_endpoint="127.0.0.1:${MASTER_PORT:-29500}" \
    -m moco_mm.train --config "$CONFIG" "$@"
