"""Retrieval metrics with several captions per image (the Flickr30k / COCO protocol).

    sim [N_img, N_txt]: similarity of image i and caption j
    txt_to_img [N_txt]: index of caption j's own image

image->text: an image query hits at k when ANY of its captions ranks in its top k; its
rank is that of its best-ranked caption. text->image: each caption has exactly one image.
Ranks are 1-based; ties are broken against the query (a tie counts as ranked below);
the median rank of an even count is the lower middle value (torch.median).
"""

from __future__ import annotations

import torch

KS = (1, 5, 10)


def retrieval_metrics(sim: torch.Tensor, txt_to_img: torch.Tensor, ks=KS) -> dict[str, float]:
    """-> {"i2t_R@1", ..., "i2t_medr", "t2i_R@1", ..., "t2i_medr"} (recalls in percent)."""
    sim = sim.float()
    n_img, n_txt = sim.shape
    txt_to_img = txt_to_img.long()
    if txt_to_img.shape != (n_txt,):
        raise ValueError(f"txt_to_img must be [{n_txt}], got {tuple(txt_to_img.shape)}")
    own = torch.zeros(n_img, n_txt, dtype=torch.bool)
    own[txt_to_img, torch.arange(n_txt)] = True

    # image -> text: rank of the best own caption = 1 + #captions scoring strictly above
    # it, + #other captions tied with it (ties count against the query).
    best_own = sim.masked_fill(~own, float("-inf")).max(dim=1).values  # [n_img]
    higher = (sim > best_own[:, None]) | ((sim == best_own[:, None]) & ~own)
    i2t_rank = 1 + higher.sum(dim=1)

    # text -> image: 1 + #images scoring above (or tied with) the caption's own image.
    sim_t = sim.t()  # [n_txt, n_img]
    own_score = sim_t[torch.arange(n_txt), txt_to_img]
    others = torch.ones_like(sim_t, dtype=torch.bool)
    others[torch.arange(n_txt), txt_to_img] = False
    t2i_rank = 1 + ((sim_t > own_score[:, None]) | ((sim_t == own_score[:, None]) & others)).sum(dim=1)

    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        for k in ks:
            out[f"{name}_R@{k}"] = 100.0 * (ranks <= k).float().mean().item()
        out[f"{name}_medr"] = float(ranks.float().median().item())
    return out


def format_table(m: dict[str, float], ks=KS) -> str:
    """A small plain-text table of `retrieval_metrics` output."""
    head = "direction    " + "  ".join(f"R@{k:<5}" for k in ks) + "  medr"
    rows = [head]
    for name, label in (("i2t", "image->text"), ("t2i", "text->image")):
        vals = "  ".join(f"{m[f'{name}_R@{k}']:6.2f}" for k in ks)
        rows.append(f"{label:<12} {vals}  {m[f'{name}_medr']:.0f}")
    return "\n".join(rows)
