#!/usr/bin/env bash
# Several nodes with c10d rendezvous. Run the same line on every node:
#   CONFIG=configs/a100-80gb-vitl14-bertlarge.yaml NNODES=4 NPROC=8 \
#   RDZV_HOST=node001 RDZV_PORT=29400 JOB_ID=pretrain-42 bash launch/multi_node.sh [key=value ...]
# Variables: CONFIG (required); NNODES (nodes, or MIN:MAX for elastic); NPROC (GPUs per
# node); RDZV_HOST / RDZV_PORT (any one node's address, reachable from all); JOB_ID (the
# same on every node, unique per job); MAX_RESTARTS (default 3). run.output_dir must be on
# a filesystem every node sees: rank 0 writes checkpoints, every rank reads them on resume.
set -euo pipefail
: "${CONFIG:?set CONFIG=configs/NAME.yaml}"
: "${NNODES:?set NNODES}"
: "${RDZV_HOST:?set RDZV_HOST to one node's address}"
exec torchrun --nnodes="$NNODES" --nproc_per_node="${NPROC:-8}" --max-restarts="${MAX_RESTARTS:-3}" \
    --rdzv_backend=c10d --rdzv_endpoint="$RDZV_HOST:${RDZV_PORT:-29400}" --rdzv_id="${JOB_ID:-moco_mm}" \
    -m moco_mm.train --config "$CONFIG" "$@"
