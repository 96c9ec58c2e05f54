#!/usr/bin/env bash
# Start from a CLIP, hand back a CLIP: the fine-tuning demo on the CPU.
#   1. demo shards; a random-init small OpenCLIP model (moco-mm init-clip)
#   2. pretrain it in the CLIP mode on the demo shards, hand it back in OpenCLIP's format
#   3. fine-tune that CLIP at batch 16 with the queue, without it (momentum keys, in-batch
#      negatives) and as OpenCLIP would (the CLIP mode); held-out R@k of each, and of the start
#
#   bash launch/finetune_demo.sh            # from the repository root
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_venv.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false

moco-mm demo-data --out data/demo
[ -f data/demo-clip/random/open_clip_config.json ] || moco-mm init-clip --out data/demo-clip/random
moco-mm train --config configs/demo-clip-pretrain.yaml logging.progress=false "$@"
moco-mm export --run runs/demo-clip-pretrain --out data/demo-clip/pretrained --format open_clip --overwrite
moco-mm compare-objectives --config configs/finetune-demo-clip.yaml --steps 300 --batch-size 16 \
    --variants infonce,queue-off,clip --out runs/finetune-demo-compare --json runs/finetune-demo-compare.json
