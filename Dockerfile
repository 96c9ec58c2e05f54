# CUDA image for cluster use: the package and its pinned torch, torchrun as the entry.
#   docker build -t moco_mm .
#   docker run --gpus all --ipc=host -v /data:/data -v /runs:/runs moco_mm \
#       --nproc_per_node=8 -m moco_mm.train --config configs/a100-80gb-vitb16-bertbase.yaml \
#       run.output_dir=/runs/vitb16
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /workspace/moco_mm
# Dependencies first, so code edits do not reinstall torch.
COPY pyproject.toml constraints.txt README.md ./
COPY moco_mm/__init__.py moco_mm/__init__.py
RUN pip install --upgrade pip && pip install -c constraints.txt -e ".[export,search]"
COPY . .
ENTRYPOINT ["torchrun"]
CMD ["--help"]
