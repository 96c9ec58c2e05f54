"""Shared fixtures: a tokenizer built locally (no download); the tests' demo dataset."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The words the test captions are made of (tests/test_data.py spells sample ids with them).
CAPTION_WORDS = ("photo", "picture", "zero", "one", "two", "three", "four", "five", "six", "seven",
                 "eight", "nine")


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A WordPiece BERT tokenizer trained on CAPTION_WORDS, loaded with AutoTokenizer."""
    from transformers import AutoTokenizer

    from moco_mm.data.demo import train_tokenizer

    w = CAPTION_WORDS
    captions = [f"{w[i % 2]} {w[2 + i % 10]} {w[2 + (i // 10) % 10]}" for i in range(200)]
    path = train_tokenizer(captions, tmp_path_factory.mktemp("tokenizer"), vocab_size=128)
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """`tests.trainrun.build_demo`'s dataset (512 train / 64 held-out 32 px pairs and its
    tokenizer), built once per session: the tests only read it."""
    from tests.trainrun import build_demo

    return build_demo(tmp_path_factory.mktemp("demo"))
