# CUDA image for cluster use: exactly the versions in requirements.lock, torchrun as the entry.
#   docker build -t moco_mm .
#   docker run --gpus all --ipc=host -v /data:/data -v /runs:/runs moco_mm \
#       --nproc_per_node=8 -m moco_mm.train --config configs/a100-80gb-vitb16-bertbase.yaml \
#       run.output_dir=/runs/vitb16
# The lock's torch is PyPI's CUDA build: it brings the CUDA runtime, cuDNN and NCCL as
# nvidia-* wheels, so the base image needs only Python 3.11 (the lock's Python) and the
# host only the NVIDIA driver and container toolkit.
FROM python:3.11-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
RUN apt-get update && apt-get install -y --no-install-recommends git curl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /workspace/moco_mm
# Dependencies first, so code edits do not reinstall torch.
COPY requirements.lock ./
RUN pip install --upgrade pip && pip install -r requirements.lock
COPY . .
RUN pip install --no-deps -e . && pip check
ENTRYPOINT ["torchrun"]
CMD ["--help"]
