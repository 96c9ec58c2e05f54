"""Small CLIPs built offline with random weights and saved the way their libraries save
them: an OpenCLIP directory (open_clip's own save_for_hf) and a Hugging Face CLIPModel
directory (save_pretrained, with its tokenizer and image processor). Both use CLIP's BPE
vocabulary (49,408 tokens, OpenCLIP's bundled file), so the tokenizers are the real ones.
"""

from __future__ import annotations

from pathlib import Path

import torch

EMBED = 32
IMAGE = 32

OPEN_CLIP_CFG = {
    "embed_dim": EMBED,
    "vision_cfg": {"image_size": IMAGE, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


class _Tokenizer:
    """What save_for_hf needs of a tokenizer (OpenCLIP's SimpleTokenizer saves no files)."""

    def save_pretrained(self, directory) -> None:
        pass


def make_open_clip_dir(root: Path, seed: int = 0, logit_scale: float = 3.0, quick_gelu: bool = False) -> Path:
    """-> a directory `open_clip.create_model_and_transforms("local-dir:DIR")` loads."""
    from open_clip.model import CLIP
    from open_clip.push_to_hf_hub import save_for_hf

    cfg = dict(OPEN_CLIP_CFG, quick_gelu=quick_gelu)
    torch.manual_seed(seed)
    model = CLIP(**cfg)
    with torch.no_grad():
        model.logit_scale.fill_(logit_scale)
        # Random-init OpenCLIP leaves some tensors at exactly zero or one (biases, norms):
        # perturb everything so a mapping that drops a tensor cannot go unnoticed.
        for p in model.parameters():
            if p is not model.logit_scale:
                p.add_(torch.randn_like(p) * 0.02)
    out = Path(root) / "open_clip_src"
    # What create_model attaches and save_for_hf writes as preprocess_cfg: CLIP's mean/std.
    model.visual.image_mean = (0.48145466, 0.4578275, 0.40821073)
    model.visual.image_std = (0.26862954, 0.26130258, 0.27577711)
    save_for_hf(model, _Tokenizer(), cfg, out, safe_serialization=True)
    return out


def hf_clip_config():
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE, patch_size=8),
        projection_dim=EMBED, logit_scale_init_value=3.0)


def make_hf_clip_dir(root: Path, seed: int = 0) -> Path:
    """-> a directory `CLIPModel.from_pretrained` / `CLIPProcessor.from_pretrained` load."""
    from transformers import CLIPImageProcessor, CLIPModel

    from moco_mm.model import open_clip_tokenizer

    torch.manual_seed(seed)
    model = CLIPModel(hf_clip_config())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n != "logit_scale":
                p.add_(torch.randn_like(p) * 0.02)
    out = Path(root) / "hf_clip_src"
    model.save_pretrained(out)
    open_clip_tokenizer().save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}).save_pretrained(out)
    return out
