"""Export a run's towers for search: safetensors + JSON (+ verified ONNX), no training code needed.

    python tools/export.py --run RUN_DIR --out EXPORT_DIR [--towers query|key] [--onnx]
    python tools/export.py --checkpoint RUN_DIR/checkpoints/step_NNNNNNNN --out EXPORT_DIR

--run takes the run's newest complete checkpoint. --onnx adds image_encoder.onnx and
text_encoder.onnx, each checked against PyTorch with onnxruntime (max abs difference
<= --atol, float32); a mismatch fails the export and leaves nothing behind. The layout
is documented in `moco_mm.export`. Exit status 0 on success, 2 on an error.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    from moco_mm import export
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from moco_mm import export


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (config.yaml + checkpoints/)")
    src.add_argument("--checkpoint", help="a checkpoint step directory inside a run directory")
    ap.add_argument("--out", required=True, help="export directory to write")
    ap.add_argument("--towers", choices=export.TOWERS, default="query",
                    help="query: the trained towers (default); key: their momentum copies")
    ap.add_argument("--onnx", action="store_true", help="also write verified ONNX graphs")
    ap.add_argument("--atol", type=float, default=export.ONNX_ATOL, help="ONNX vs PyTorch tolerance")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        res = export.export_encoders(args.out, run_dir=args.run, checkpoint=args.checkpoint, towers=args.towers,
                                     onnx=args.onnx, overwrite=args.overwrite, atol=args.atol,
                                     log=lambda s: print(s, file=sys.stderr))
    except (export.ExportError, ValueError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {res.towers} towers of step {res.step} to {res.out} in {time.perf_counter() - t0:.1f}s")
    for name, check in res.onnx.items():
        print(f"  {name}: max |onnx - torch| = {check.max_abs_diff:.3g} (allowed {check.atol:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
