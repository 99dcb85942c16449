"""Shared fixtures: a small random Llama on the PyTorch references, and small tokenizers
trained on the spot (no download) for the detokenizer tests.

Two families, with the decoders Llama-family models use:
- byte-level BPE (GPT-2 / Llama 3 style): every byte is a symbol, multi-byte characters
  (é, 中, emoji) are often cut across tokens, leading spaces are part of the tokens ("Ġ").
- sentencepiece-style BPE with a Metaspace pre-tokenizer and byte fallback (Llama 2 style):
  trained on ASCII text only, so é, 中 and emoji become runs of <0xNN> byte tokens; the
  decoder strips the leading space of the first token of each decode call.
"""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from loraplex.kernels import runtime
from loraplex.model.loader import load_model
from tests.factory import make_model


@pytest.fixture
def reference_kernels():
    """The PyTorch references instead of the Triton kernels (modules opt in with
    `pytestmark = pytest.mark.usefixtures("reference_kernels")`)."""
    with runtime.reference_kernels():
        yield


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """A small random Llama, fp32, loaded on the references (a module may define its own)."""
    root = tmp_path_factory.mktemp("llama")
    make_model(root, "llama")
    with runtime.reference_kernels():
        return load_model(root, dtype=torch.float32, progress=False)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello there, how are you today?",
    "Stop here. END of the story; the end.",
    "Numbers 12345 and symbols #$%&*() go here.",
    "café naïve résumé — 中文字符 and emoji 🙂🚀 too",
    "Line one\nLine two\n\ttabbed   spaces",
]


@pytest.fixture(scope="session")
def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    trained = ByteLevelBPETokenizer()
    trained.train_from_iterator(CORPUS * 3, vocab_size=400, min_frequency=1,
                                special_tokens=["<|endoftext|>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=trained._tokenizer, eos_token="<|endoftext|>",
                                   clean_up_tokenization_spaces=False)


@pytest.fixture(scope="session")
def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    # Train merges on ASCII text, then rebuild the model with the 256 <0xNN> byte tokens
    # added as ordinary vocabulary (not special tokens, which skip_special_tokens drops).
    trainer = trainers.BpeTrainer(vocab_size=300, min_frequency=1, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>"])
    draft = Tokenizer(models.BPE(unk_token="<unk>"))
    draft.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    draft.train_from_iterator([s for s in CORPUS if s.isascii()] * 3, trainer)
    spec = json.loads(draft.to_str())["model"]
    vocab = dict(spec["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)
