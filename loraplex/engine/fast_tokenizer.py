"""Encode and decode without transformers' Python layers, where that gives the same ids and text.

A transformers fast tokenizer (`TokenizersBackend`; `PreTrainedTokenizerFast` in 4.x) whose
encode and decode are not customised by its class does both in the Rust `tokenizers` object
it wraps: `encode(text)` is the backend's encode(text).ids and `decode(ids,
clean_up_tokenization_spaces=False)` the backend's decode(ids). Calling the backend directly
skips about 250 us of Python per encode and 3 us per decode (measured on the demo tokenizer;
the detokenizer decodes twice per generated token). Any other tokenizer goes through its own
methods.

The backend's `encode` holds the GIL for the whole text (about 2 s for a million characters
here), its `encode_batch` releases it: `releasing_encoder` is for long prompts, run on a
worker thread so that the event loop and the other requests go on meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _backend(tokenizer: Any, *methods: str):
    """The Rust tokenizer behind `tokenizer`, if none of `methods` is overridden; else None."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # transformers 4.x
        from transformers import PreTrainedTokenizerFast as TokenizersBackend
    cls = type(tokenizer)
    if isinstance(tokenizer, TokenizersBackend) and all(getattr(cls, m, None) is getattr(TokenizersBackend, m, None)
                                                          for m in methods):
        return tokenizer.backend_tokenizer
    return None


def decoder(tokenizer: Any, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """decode(ids) with clean_up_tokenization_spaces=False."""
    backend = _backend(tokenizer, "decode", "_decode")
    if backend is not None:
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens,
                                        clean_up_tokenization_spaces=False)


def encoder(tokenizer: Any, add_special_tokens: bool = True) -> Callable[[str], list[int]]:
    """encode(text) -> token ids, as tokenizer.encode(text, add_special_tokens=...). The
    backend is called directly only while it is `_plain`."""
    backend = _backend(tokenizer, "encode", "encode_plus", "_encode_plus")

    def slow(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    if backend is None:
        return slow

    def fast(text: str) -> list[int]:
        if _plain(tokenizer, backend):
            return backend.encode(text, add_special_tokens=add_special_tokens).ids
        return slow(text)
    return fast


def releasing_encoder(tokenizer: Any, add_special_tokens: bool = True) -> Callable[[str], list[int]]:
    """As `encoder`, through the backend's encode_batch, which releases the GIL while it works
    (the same ids: one pipeline). Falls back to `encoder` (GIL held) for other tokenizers."""
    backend = _backend(tokenizer, "encode", "encode_plus", "_encode_plus")
    holding = encoder(tokenizer, add_special_tokens)
    if backend is None:
        return holding

    def releasing(text: str) -> list[int]:
        if _plain(tokenizer, backend):
            return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return holding(text)
    return releasing


def _plain(tokenizer: Any, backend: Any) -> bool:
    """The backend has no truncation or padding of its own and splits special tokens as the
    tokenizer says: what transformers would set up per call."""
    return (backend.truncation is None and backend.padding is None
            and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False)))
