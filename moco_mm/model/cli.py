"""`moco-mm init-clip`: write a randomly initialised OpenCLIP model directory.

    moco-mm init-clip --out DIR [--model-cfg CFG.json | --name MODEL_NAME] [--seed 0]

The directory is what OpenCLIP's own `save_for_hf` writes (open_clip_config.json +
open_clip_model.safetensors): `open_clip.create_model_and_transforms("local-dir:DIR")` and
`model.init_from: DIR` both load it. Used to pretrain a CLIP of one's own architecture
with this trainer (the CLIP mode), and by the fine-tuning demo (launch/finetune_demo.sh),
whose default architecture is DEMO_CLIP: a small ViT and causal text transformer sized
like the demo's towers, with CLIP's real BPE vocabulary."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEMO_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
}


class _NoTokenizerFiles:
    """OpenCLIP's BPE tokenizer is bundled with open_clip: save_for_hf has nothing to write."""

    def save_pretrained(self, directory) -> None:
        pass


def write_open_clip_dir(model_cfg: dict, out: Path, seed: int = 0) -> Path:
    """A random-init OpenCLIP CLIP of `model_cfg` saved with OpenCLIP's own writer."""
    import torch
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from open_clip.model import CLIP
    from open_clip.push_to_hf_hub import save_for_hf

    torch.manual_seed(seed)
    model = CLIP(**model_cfg)
    # What create_model attaches and save_for_hf writes as preprocess_cfg: CLIP's mean/std.
    model.visual.image_mean, model.visual.image_std = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    save_for_hf(model, _NoTokenizerFiles(), model_cfg, out, safe_serialization=True)
    return out


def init_clip_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moco-mm init-clip", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory to write (must not hold a model already)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model-cfg", help="a JSON file with an OpenCLIP model_cfg (default: the demo's small CLIP)")
    src.add_argument("--name", help="an OpenCLIP architecture name (open_clip.list_models())")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        import open_clip
    except ImportError:
        print("init-clip: error: needs open-clip-torch (pip install 'moco-mm[bench]')", file=sys.stderr)
        return 2
    if args.name:
        model_cfg = open_clip.get_model_config(args.name)
        if model_cfg is None:
            print(f"init-clip: error: --name {args.name!r} is not an OpenCLIP architecture", file=sys.stderr)
            return 2
    elif args.model_cfg:
        try:
            model_cfg = json.loads(Path(args.model_cfg).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            print(f"init-clip: error: --model-cfg {args.model_cfg}: {e}", file=sys.stderr)
            return 2
    else:
        model_cfg = DEMO_CLIP
    out = Path(args.out)
    if (out / "open_clip_config.json").exists():
        print(f"init-clip: error: {out} already holds a model", file=sys.stderr)
        return 2
    write_open_clip_dir(model_cfg, out, args.seed)
    print(f"wrote a random-init OpenCLIP model to {out} (model.init_from: {out})")
    return 0
