"""Tower profiles of the shipped A100 configs, traced by the planner and kept in
`tests/data/tower_profiles.json` so the planner tests need not trace 8 large towers each.

Regenerate (after a change to the tracer, a tower config, or a library that changes what
its modules save for backward — tests/test_plan_memory.py says when):

    python -m tests.tower_profiles

The file's keys are `memory.tower_profile_key`: what a profile depends on in our code and
config, not library versions. A newer timm/transformers/torch that saves the same tensors
keeps the file valid; one that saves different tensors fails
`test_cached_tower_profiles_are_current`, which re-traces every tower and compares numbers.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATH = ROOT / "tests" / "data" / "tower_profiles.json"


def shipped_configs() -> list[Path]:
    return sorted((ROOT / "configs").glob("a100-*gb-*.yaml"))


def trace_shipped() -> dict[str, dict]:
    """{key: {"used_by": ["CONFIG:kind", ...], "profile": TowerProfile.to_dict()}} for every
    distinct tower of the shipped configs, traced now (about 30 s on 2 cores)."""
    from moco_mm import plan as memory
    from moco_mm.config import load_config
    from moco_mm.plan import profiles

    out: dict[str, dict] = {}
    for path in shipped_configs():
        cfg = load_config(path)
        vocab, _ = memory.default_vocab_size(cfg)
        dtype = memory.autocast_dtype_for(cfg)
        for kind in ("image", "text"):
            key = memory.tower_profile_key(kind, cfg.model, dtype, vocab)
            if key not in out:
                profiles._TOWERS.pop(key, None)  # trace, do not reuse a registered profile
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    profile = memory.tower_profile(kind, cfg.model, dtype, vocab)
                out[key] = {"used_by": [], "profile": profile.to_dict()}
            out[key]["used_by"].append(f"{path.name}:{kind}")
    return out


def library_versions() -> dict[str, str]:
    import timm
    import torch
    import transformers

    return {"torch": torch.__version__, "timm": timm.__version__, "transformers": transformers.__version__}


def load() -> dict:
    return json.loads(PATH.read_text())


def main() -> None:
    data = {"traced_with": library_versions(), "towers": trace_shipped()}
    PATH.parent.mkdir(parents=True, exist_ok=True)
    PATH.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {PATH.relative_to(ROOT)}: {len(data['towers'])} tower profiles, traced with {data['traced_with']}")


if __name__ == "__main__":
    main()
