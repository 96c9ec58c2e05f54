"""Retrieval metrics on hand-built similarity matrices, values computed by hand."""

import pytest
import torch

from moco_mm.metrics import retrieval_metrics


def test_one_caption_per_image():
    # 3 images x 3 captions; caption j belongs to image j.
    sim = torch.tensor([[0.9, 0.1, 0.2],    # image 0: own caption 0 ranked 1st
                        [0.8, 0.5, 0.1],    # image 1: own caption 1 ranked 2nd
                        [0.7, 0.6, 0.0]])   # image 2: own caption 2 ranked 3rd
    m = retrieval_metrics(sim, torch.tensor([0, 1, 2]), ks=(1, 2))
    assert m["i2t_R@1"] == pytest.approx(100 / 3)
    assert m["i2t_R@2"] == pytest.approx(200 / 3)
    assert m["i2t_medr"] == 2
    # caption 0: column [0.9, 0.8, 0.7] own image 0 -> rank 1
    # caption 1: column [0.1, 0.5, 0.6] own image 1 -> rank 2
    # caption 2: column [0.2, 0.1, 0.0] own image 2 -> rank 3
    assert m["t2i_R@1"] == pytest.approx(100 / 3)
    assert m["t2i_R@2"] == pytest.approx(200 / 3)
    assert m["t2i_medr"] == 2


def test_several_captions_per_image_any_caption_hits():
    # 2 images, 4 captions: captions 0,1 -> image 0; captions 2,3 -> image 1.
    sim = torch.tensor([[0.1, 0.8, 0.9, 0.2],   # image 0: best own caption (1) ranked 2nd
                        [0.3, 0.2, 0.1, 0.7]])  # image 1: best own caption (3) ranked 1st
    m = retrieval_metrics(sim, torch.tensor([0, 0, 1, 1]), ks=(1, 2))
    assert m["i2t_R@1"] == 50.0 and m["i2t_R@2"] == 100.0
    # captions: 0 -> own img0 0.1 < 0.3 rank 2; 1 -> 0.8 > 0.2 rank 1;
    #           2 -> own img1 0.1 < 0.9 rank 2; 3 -> 0.7 > 0.2 rank 1.
    assert m["t2i_R@1"] == 50.0 and m["t2i_R@2"] == 100.0
    assert m["t2i_medr"] == 1.0  # ranks [2, 1, 2, 1]: the lower middle value


def test_ties_count_against_the_query():
    sim = torch.ones(2, 2)
    m = retrieval_metrics(sim, torch.tensor([0, 1]), ks=(1,))
    assert m["i2t_R@1"] == 0.0 and m["t2i_R@1"] == 0.0
