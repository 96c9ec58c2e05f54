"""`moco-mm <command> [args]`: the one entry point for every program.

Each command is a `main(argv) -> int` in the package of its concern, imported only when
run (so `moco-mm --help` is quick). `python -m moco_mm.train` still runs `moco-mm train`.
Nothing imports this module (tests/test_layout.py checks).
"""

from __future__ import annotations

import difflib
import importlib
import sys

# name -> (module:function, one line for the command list)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("moco_mm.train.cli:main", "pretrain or fine-tune (also under torchrun); --help lists every config key"),
    "consolidate": ("moco_mm.train.cli:consolidate_main", "a sharded (run.parallel=fsdp) checkpoint -> one "
                                                          "model.safetensors checkpoint"),
    "plot": ("moco_mm.train.plot:main", "PNGs of runs' metrics.jsonl overlaid: loss, temperature, R@1, samples/s, "
                                        "data wait"),
    "demo-data": ("moco_mm.data.cli:demo_data_main", "build the procedural demo shards and tokenizer"),
    "make-shards": ("moco_mm.data.cli:make_shards_main", "CSV/TSV/JSONL/folder/Karpathy COCO, Flickr30k -> shards"),
    "make-manifest": ("moco_mm.data.cli:make_manifest_main", "manifest.json (shard URLs, sample counts) from "
                                                              "img2dataset stats or by counting; checks ids"),
    "init-clip": ("moco_mm.model.cli:init_clip_main", "write a random-init OpenCLIP model directory (model.init_from)"),
    "plan-memory": ("moco_mm.plan.cli:main", "will this config fit the GPU? peak memory per part, largest batch"),
    "export": ("moco_mm.search.cli:export_main", "a run's towers -> a self-contained export (+ verified ONNX)"),
    "embed": ("moco_mm.search.embed:main", "embed a shard set on N ranks (torchrun), resumable, one part per shard"),
    "search": ("moco_mm.search.cli:search_main", "build a FAISS index of a corpus or of embedded parts, or query one"),
    "eval-retrieval": ("moco_mm.search.cli:eval_retrieval_main", "R@1/5/10, medr, rsum both ways; COCO 5k+1k, F30k 1k"),
    "eval-zeroshot": ("moco_mm.search.zeroshot:main", "zero-shot top-1/top-5/per-class accuracy of an export "
                                                      "(CLIP's prompt ensemble)"),
    "serve": ("moco_mm.search.serve:main", "web search page + JSON API (clip-retrieval's /knn-service) over an index"),
    "bench": ("moco_mm.bench.step:main", "our step against OpenCLIP and the MoCo/ALBEF style (ratios)"),
    "bench-loader": ("moco_mm.bench.loader:main", "loader samples/s by worker count"),
    "bench-serve": ("moco_mm.bench.serve_load:main", "p50/p99 latency and queries/s of a running `moco-mm serve`"),
    "compare-objectives": ("moco_mm.bench.compare:main", "every objective, queue/distillation/dedup on and off, CLIP"),
    "gpu-check": ("moco_mm.bench.gpu_check:main", "first run on a GPU: memory vs planner, speed vs OpenCLIP, resume"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: moco-mm <command> [args]   (moco-mm <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from importlib.metadata import version

        print(f"moco-mm {version('moco-mm')}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=2)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        print(f"moco-mm: unknown command {name!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func = COMMANDS[name][0].split(":")
    rc = getattr(importlib.import_module(module), func)(argv[1:])
    return 0 if rc is None else int(rc)


if __name__ == "__main__":
    sys.exit(main())
