"""Streaming detokenization: turn generated token ids into text as they arrive, with stop strings.

Decoding one token alone is wrong for most tokenizers: sentencepiece-style decoders drop the
leading space of the first token of a decode call, and byte-level or byte-fallback tokens
may hold only part of a UTF-8 character. So each push decodes a short window of recent
tokens twice, `window[:read]` (text already emitted) and the whole window, and emits the
difference; the window then slides to the new tokens. Cost per token is O(window), not
O(output length). While the decoded tail ends in U+FFFD (an incomplete character) nothing
is emitted and the window grows until the character is whole (up to a bound, past which
the tokens are taken as they decode: a run that long is broken bytes or invisible tokens).

The window starts on the last few prompt tokens, so the first output token decodes with the
leading space it has after the prompt (" Paris" after "The capital is"), as the
continuation text decode(prompt + output)[len(decode(prompt)):]. For tokenizers whose
decoder keeps leading spaces (byte-level BPE) this equals decode(output); for sentencepiece
decoders that strip the first space of a decode call it differs from decode(output) by that
one space, when the first output token starts a word.

Stop strings are matched in the decoded text, across token boundaries. Any tail of the text
that could still grow into a stop string is held back, and released once it cannot (or at
flush); so emitted text never has to be taken back.

Decoding uses clean_up_tokenization_spaces=False: that clean-up (" ." -> ".") changes text
already emitted once the next token arrives, so it cannot be streamed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .fast_tokenizer import decoder

PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first output token
_INCOMPLETE = "\ufffd"     # what decoders give for a partial UTF-8 character
_MAX_CHAR_TOKENS = 4       # a UTF-8 character spans at most 4 byte tokens
_MAX_UNREAD = 16           # tokens without visible text kept in the window at most


class IncrementalDetokenizer:
    """Text of one request's output, safe to stream, stopping at the first stop string.

    push(token) -> (new text, stop string hit); after a hit nothing more is emitted. When
    generation ends for another reason, flush() returns the text still held back.
    """

    __slots__ = ("_decode_ids", "_flushed", "_ids", "_include_stop", "_max_hold", "_parts", "_pending", "_read",
                 "_read_text", "_skip_special", "_stop_starts", "_stopped", "_stop_string", "_stops", "_tokenizer")

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], stop: Sequence[str] | str = (),
                 include_stop: bool = False, skip_special_tokens: bool = True) -> None:
        stops = [stop] if isinstance(stop, str) else list(stop)
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self._tokenizer = tokenizer
        self._skip_special = bool(skip_special_tokens)
        self._decode_ids = decoder(tokenizer, self._skip_special)
        self._include_stop = bool(include_stop)
        self._stops = tuple(stops)
        self._stop_starts = frozenset(s[0] for s in stops)
        self._max_hold = max((len(s) for s in stops), default=1) - 1  # a full match is never held

        # Window: ids[:read] were already turned into text (read_text, emitted or pending);
        # ids[read:] have not produced whole characters yet.
        context, read_text = self._prompt_context(prompt_ids)
        self._ids: list[int] = context
        self._read = len(context)
        self._read_text = read_text
        self._pending = ""             # decoded, not emitted: might be the start of a stop string
        self._parts: list[str] = []    # emitted text, joined on demand
        self._stopped = False
        self._stop_string: str | None = None
        self._flushed = False

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @property
    def stopped(self) -> bool:
        """Whether a stop string was hit (by push, or by flush on the last held text)."""
        return self._stopped

    @property
    def stop_string(self) -> str | None:
        """The stop string that was hit, if one was."""
        return self._stop_string

    def push(self, token_id: int, may_stop: bool = True) -> tuple[str, bool]:
        """Add one generated token; return the text newly safe to emit and whether a stop
        string was hit (then the text ends at, or with, the stop string). With `may_stop`
        False (min_tokens not reached yet) the text is emitted whole, unmatched."""
        if self._flushed:
            raise RuntimeError("push() after flush(): the output has already ended")
        if self._stopped:
            return "", True
        self._ids.append(token_id)
        return self._emit(self._advance(final=False), final=False, may_stop=may_stop)

    def flush(self) -> str:
        """End of output for a reason other than a stop string: return what was held back
        (an incomplete character decodes as U+FFFD, as in a full decode)."""
        if self._flushed or self._stopped:
            self._flushed = True
            return ""
        self._flushed = True
        text, _ = self._emit(self._advance(final=True), final=True)
        return text

    # ------------------------------------------------------------------------------------

    def _prompt_context(self, prompt_ids: Sequence[int]) -> tuple[list[int], str]:
        """The last few prompt tokens and their text, starting and ending on whole characters.

        A window cut inside a character decodes to U+FFFD at its start (and with byte-fallback
        decoders the whole byte run turns to U+FFFD), so reach back a few more tokens to the
        character's start. A prompt that ends inside a character gets no context: output
        tokens might complete it, and the context's text would change under us.
        """
        n = len(prompt_ids)
        for k in range(min(n, PROMPT_CONTEXT_TOKENS), min(n, PROMPT_CONTEXT_TOKENS + _MAX_CHAR_TOKENS) + 1):
            ids = [int(t) for t in prompt_ids[n - k:]]
            text = self._decode(ids)
            if not text.startswith(_INCOMPLETE) and not text.endswith(_INCOMPLETE):
                return ids, text
        return [], ""

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._decode_ids(ids)

    def _advance(self, final: bool) -> str:
        """Text the unread tokens add, if it is complete (or `final`); slides the window."""
        unread = len(self._ids) - self._read
        if unread == 0:
            return ""
        text = self._decode(self._ids)
        # Bound the window when tokens keep adding nothing (skipped EOS under ignore_eos) or
        # only broken bytes; without this each push would decode an ever longer window.
        stuck = unread > _MAX_UNREAD
        if len(text) <= len(self._read_text):
            if stuck:
                del self._ids[self._read:]  # they add no text: forget them
            return ""
        if text.endswith(_INCOMPLETE) and not (final or stuck):
            return ""  # a partial character: wait for its other bytes
        new = text[len(self._read_text):]
        # The new tokens become the window; the old ones are no longer needed.
        del self._ids[:self._read]
        self._read = len(self._ids)
        self._read_text = self._decode(self._ids)
        return new

    def _emit(self, new: str, final: bool, may_stop: bool = True) -> tuple[str, bool]:
        text = self._pending + new
        if not self._stops or not may_stop:
            self._pending = ""
            return self._record(text), False

        # The stop string that completes first as text streams in: earliest end, then the
        # longer one (earliest start). Matches can only start in `text`: emitted text never
        # contains the beginning of a possible match.
        best: tuple[int, int] | None = None
        for s in self._stops:
            start = text.find(s)
            if start >= 0 and (best is None or (start + len(s), start) < best):
                best = (start + len(s), start)
        if best is not None:
            end, start = best
            self._pending = ""
            self._stopped = True
            self._stop_string = text[start:end]
            return self._record(text[:end] if self._include_stop else text[:start]), True

        hold = 0 if final else self._held_length(text)
        self._pending = text[len(text) - hold:]
        return self._record(text[:len(text) - hold]), False

    def _held_length(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        for n in range(min(len(text), self._max_hold), 0, -1):
            tail = text[-n:]
            if tail[0] in self._stop_starts and any(s.startswith(tail) for s in self._stops):
                return n
        return 0

    def _record(self, text: str) -> str:
        if text:
            self._parts.append(text)
        return text
