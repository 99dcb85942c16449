"""Structured output: grammar-constrained decoding (JSON object, JSON schema, regex, choice, Lark/GBNF)
with llguidance, as a per-request matcher that fills one row of a [B, ceil(V/32)] int32 token bitmask.

llguidance 1.9.1, chosen over xgrammar 0.2.9 by measurement (2-core CPU, 128k-token byte-level BPE):
  schema compile 1.6 ms vs 110 ms (200 optional properties: 20 ms vs 27 s; 2000: 0.4-0.8 s vs > 150 s);
  mask fill p50 35-40 us vs 5 us, mean 130-180 us vs 61 us; `(a*)*b` 6 ms, `(a{1000}){1000}` cut off in 0.25 s

Semantics:
- json_object: any JSON object (llguidance's `{"type": "object"}`).
- json_schema: JSON Schema draft 2020-12 as llguidance implements it: type, enum, const, anyOf, allOf
  (most), oneOf (only where provably the same as anyOf), $ref/$defs (local only), properties, required,
  additionalProperties, patternProperties (disjoint), min/maxProperties (partly), items, prefixItems,
  min/maxItems, min/maxLength, pattern (no lookarounds or backreferences), format (date-time, time,
  date, duration, email, hostname, ipv4, ipv6, uuid, uri), minimum, maximum, exclusive*, multipleOf.
  Unsupported keywords fail to compile (GrammarError), e.g. uniqueItems, if/then/else, not,
  dependentSchemas, unknown formats; annotations (title, description, default, examples) are ignored.
  Departures: object properties come out in the order of `properties`; an absent
  additionalProperties allows extra keys (JSON Schema's rule; OpenAI's strict mode requires
  `"additionalProperties": false` to be written, which is honoured; pass
  disable_additional_properties=True to the compiler to read an absent one as false, as vLLM's
  option does). Whitespace between tokens is allowed but bounded (JSON_WHITESPACE: at most 32
  characters per gap) so that a weak model cannot loop on newlines forever; a top-level "x-guidance"
  object in the schema overrides this (llguidance's options).
- regex: Rust `regex` syntax, matched against the whole output (no lookarounds, no backreferences;
  `.` does not match a newline; `\\d` = [0-9] and `\\w` = [0-9a-zA-Z_] as in JavaScript and JSON
  Schema, `\\s` and `\\p{..}` are Unicode).
- choice: exactly one of the given strings.
- grammar: a Lark grammar (llguidance's dialect) or a llama.cpp GBNF grammar.

Limits: a grammar text longer than max_chars (256 KiB) is refused; llguidance's own limits (lexer
fuel, Earley items per step, lexer states, grammar size) turn a pathological grammar into an error
instead of a stall (a lexer limit can surface during generation: accept() then returns False).
Quirk: a regex/choice/literal equal to a special token's text (e.g. `<|eot_id|>`) matches that
special token, which the detokenizer may then drop from the text.

Threads: a GrammarCompiler may be used from several threads (its cache is locked; compiling, which
releases the GIL, happens outside the lock). A Matcher belongs to one request and one thread at a time.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import llguidance
import llguidance.hf
import torch

log = logging.getLogger(__name__)

GrammarKind = Literal["json_object", "json_schema", "regex", "choice", "grammar"]
KINDS: tuple[str, ...] = get_args(GrammarKind)

MAX_GRAMMAR_CHARS = 256 * 1024  # compile time grows with the text: ~0.5 s for a 100 KB schema
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{1,32}"  # one gap between JSON tokens (llguidance's whitespace_pattern)
DEFAULT_CACHE_SIZE = 256  # compiled grammars kept per compiler (LRU)
# llguidance's LLParserLimits, where ours differ from its defaults: its initial lexer fuel (1M) lets
# `(a{1000}){1000}` take 1.6-2.5 s here before it fails; 300k fails it in ~0.25 s and still admits a
# 10,000-value enum, 10,000 choices or a 2,000-property schema.
DEFAULT_LIMITS: dict[str, Any] = {"initial_lexer_fuel": 300_000, "verbose_errors": False}


class GrammarError(ValueError):
    """A structured-output spec that cannot be compiled; the message is fit for an API client."""


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """What the output must match. Plain strings only, so it pickles and hashes (the compile cache key).

    kind "json_schema": value is the schema as JSON text; "regex": the pattern; "choice": a JSON
    list of strings as text; "grammar": Lark or GBNF text; "json_object": value is None."""

    kind: GrammarKind
    value: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GrammarError(f"the structured output kind must be one of {', '.join(KINDS)}, "
                               f"got {self.kind!r}")
        if self.kind == "json_object":
            if self.value is not None:
                raise GrammarError("a json_object grammar takes no value")
        elif not isinstance(self.value, str):
            raise GrammarError(f"a {self.kind} grammar needs its value as a string, "
                               f"got {type(self.value).__name__}")

    @classmethod
    def json_object(cls) -> GrammarSpec:
        return cls("json_object", None)

    @classmethod
    def json_schema(cls, schema: dict | bool | str) -> GrammarSpec:
        """From a schema (a dict, or its JSON text); key order is kept (it is the output's order)."""
        if isinstance(schema, str):
            return cls("json_schema", schema)
        try:
            return cls("json_schema", json.dumps(schema, ensure_ascii=False, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise GrammarError(f"the JSON schema must be JSON-serializable: {exc}") from None

    @classmethod
    def regex(cls, pattern: str) -> GrammarSpec:
        return cls("regex", pattern)

    @classmethod
    def choice(cls, choices: Iterable[str]) -> GrammarSpec:
        choices = list(choices) if not isinstance(choices, str) else choices
        _check_choices(choices)
        return cls("choice", json.dumps(choices, ensure_ascii=False))

    @classmethod
    def grammar(cls, text: str) -> GrammarSpec:
        return cls("grammar", text)


def _check_choices(choices: object) -> list[str]:
    if not isinstance(choices, list) or not choices:
        raise GrammarError("choice needs a non-empty list of strings")
    for c in choices:
        if not isinstance(c, str):
            raise GrammarError(f"every choice must be a string, got {type(c).__name__}")
    return choices


def new_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """An int32 [rows, ceil(vocab_size / 32)] bitmask, all -1 (every token allowed)."""
    return torch.full((rows, -(-vocab_size // 32)), -1, dtype=torch.int32)


def apply_token_bitmask_ref(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Pure-torch reference: `logits` [B, V] or [V] with -inf where `bitmask` ([B, W] or [W] int32,
    W >= ceil(V / 32)) has bit (t % 32) of word t // 32 clear. Returns a new tensor."""
    squeeze = logits.dim() == 1
    if squeeze:
        logits, bitmask = logits.unsqueeze(0), bitmask.unsqueeze(0)
    vocab = logits.shape[-1]
    if bitmask.dtype != torch.int32 or bitmask.shape[-1] * 32 < vocab or bitmask.shape[0] != logits.shape[0]:
        raise ValueError(f"bitmask must be int32 [{logits.shape[0]}, >= {-(-vocab // 32)}], "
                         f"got {bitmask.dtype} {tuple(bitmask.shape)}")
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).flatten(1)[:, :vocab].to(torch.bool)
    out = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
    return out[0] if squeeze else out


# --------------------------------------------------------------------------------------------
# tokenizer


class _TokenBytes:
    """llguidance's TokenizerWrapper protocol for tokenizers its Rust loader does not know (for
    example a WordLevel model with a Fuse decoder, like the bundled demo): each token's bytes from
    decoding it alone (a byte-level token that is half a character decodes lossily here)."""

    def __init__(self, tokenizer, n_vocab: int, eos: int) -> None:
        n = len(tokenizer)
        special = set(getattr(tokenizer, "all_special_ids", ()) or ())
        for tid, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
            if getattr(added, "special", False):
                special.add(int(tid))
        names = tokenizer.convert_ids_to_tokens(list(range(n)))
        tokens = []
        for i, name in enumerate(names):
            if name is None:
                tokens.append(b"")
            elif i in special:
                tokens.append(name.encode("utf-8"))
            else:
                tokens.append(tokenizer.decode([i], skip_special_tokens=False,
                                               clean_up_tokenization_spaces=False).encode("utf-8"))
        self.tokens = tokens + [b""] * (n_vocab - n)  # empty entries are never allowed
        self.eos_token_id = eos
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        self.special_token_ids = sorted(i for i in special if 0 <= i < n)
        self._tokenizer = tokenizer

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text, add_special_tokens=False)


def _ll_tokenizer(tokenizer, n_vocab: int, eos: list[int]) -> llguidance.LLTokenizer:
    try:
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=eos)
    except Exception as exc:  # noqa: BLE001 - an unknown decoder, not a fast tokenizer, ...
        log.debug("llguidance cannot load the tokenizer itself (%s); using per-token decoding", exc)
    wrapper = llguidance.TokenizerWrapper(_TokenBytes(tokenizer, n_vocab, eos[0]))
    return llguidance.LLTokenizer(wrapper, n_vocab=n_vocab, eos_token=eos)


# --------------------------------------------------------------------------------------------
# compiler and matcher

_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMAS = ("additionalProperties", "unevaluatedProperties", "propertyNames", "contains", "items",
               "prefixItems", "additionalItems", "unevaluatedItems", "allOf", "anyOf", "oneOf", "not",
               "if", "then", "else")


def _close_objects(schema: object) -> None:
    """In place: every object schema with properties but no additionalProperties gets it false."""
    if isinstance(schema, list):
        for s in schema:
            _close_objects(s)
        return
    if not isinstance(schema, dict):
        return
    for key in _SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            for s in schema[key].values():
                _close_objects(s)
    for key in _SUBSCHEMAS:
        if isinstance(schema.get(key), (dict, list)):
            _close_objects(schema[key])
    if "additionalProperties" not in schema and "unevaluatedProperties" not in schema and (
            isinstance(schema.get("properties"), dict) or isinstance(schema.get("patternProperties"), dict)):
        schema["additionalProperties"] = False


def _clean_error(msg: str, kind: str) -> str:
    """llguidance's message without its parser-state dump; for the kinds we wrap in a Lark grammar
    ourselves (regex, choice) also without the wrapper's position and source excerpt."""
    msg = msg.split("\n<state>", 1)[0].replace("<non-verbose/>", "")
    if kind in ("regex", "choice", "json_object", "json_schema"):
        lines = msg.splitlines()
        keep = []
        for line in lines:
            if re.match(r"^\s*\d+ \| ", line):  # the wrapper's source excerpt and its caret line
                break
            keep.append(line)
        msg = "\n".join(keep)
        msg = re.sub(r"^at \d+\(\d+\): ", "", msg)
        msg = msg.replace(" (in regex)", "")
    msg = msg.strip()
    return msg if len(msg) <= 2000 else msg[:2000] + " ..."


class Matcher:
    """One request's position in its grammar."""

    __slots__ = ("_m", "_n_tok", "_ll_words", "_out_words", "_vocab_size", "_tail_mask", "_scratch")

    def __init__(self, m: llguidance.LLMatcher, compiler: GrammarCompiler) -> None:
        self._m = m
        self._n_tok = compiler._n_tok
        self._ll_words = compiler._ll_words
        self._out_words = compiler._out_words
        self._vocab_size = compiler.vocab_size
        self._tail_mask = compiler._tail_mask
        self._scratch = None

    def fill_bitmask(self, out: torch.Tensor) -> None:
        """Write the allowed next tokens into `out`, an int32 CPU tensor [ceil(vocab_size / 32)]
        (a row of new_bitmask()): only EOS once the grammar is complete (or after a rejected token)."""
        if out.dtype != torch.int32 or out.device.type != "cpu" or out.dim() != 1 \
                or out.shape[0] != self._out_words or not out.is_contiguous():
            raise ValueError(f"the bitmask row must be a contiguous int32 CPU tensor [{self._out_words}], "
                             f"got {out.dtype} {tuple(out.shape)} on {out.device}")
        if self._ll_words == self._out_words:
            self._m.unsafe_compute_mask_ptr(out.data_ptr(), self._ll_words * 4)  # releases the GIL
        else:  # the model's vocabulary is narrower than the tokenizer's: compute all, keep what fits
            if self._scratch is None:
                self._scratch = torch.empty(self._ll_words, dtype=torch.int32)
            self._m.unsafe_compute_mask_ptr(self._scratch.data_ptr(), self._ll_words * 4)
            out.copy_(self._scratch[:self._out_words])
        if self._tail_mask is not None:  # tokenizer ids past the logits' width, in the last word
            out[-1] &= self._tail_mask

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled token; False if the grammar does not allow it (the matcher then
        stays in an error state, see error())."""
        token_id = int(token_id)
        if not 0 <= token_id < min(self._n_tok, self._vocab_size):
            return False
        return self._m.consume_token(token_id)  # once complete, only EOS is accepted

    def is_finished(self) -> bool:
        """The grammar is complete: EOS was accepted, or nothing but EOS can follow."""
        return self._m.is_stopped() and not self._m.is_error()

    def error(self) -> str | None:
        """Why the matcher failed (a rejected token, or a grammar limit hit), else None."""
        return _clean_error(self._m.get_error(), "grammar") if self._m.is_error() else None


class GrammarCompiler:
    """Compiles GrammarSpecs for one tokenizer (cached, LRU-bounded) and starts matchers.

    vocab_size is the model's logits width (may differ from len(tokenizer)); eos_token_ids are the
    engine's end tokens: a matcher allows them exactly where the grammar may end."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Iterable[int], *,
                 cache_size: int = DEFAULT_CACHE_SIZE, max_chars: int = MAX_GRAMMAR_CHARS,
                 json_whitespace: str | None = JSON_WHITESPACE, disable_additional_properties: bool = False,
                 limits: dict[str, Any] | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self._n_tok = len(tokenizer)
        usable = min(self._n_tok, self.vocab_size)
        eos = sorted({int(t) for t in eos_token_ids if 0 <= int(t) < usable})
        fallback = getattr(tokenizer, "eos_token_id", None)
        if not eos and fallback is not None and 0 <= fallback < usable:
            eos = [int(fallback)]
        if not eos:
            raise ValueError("structured output needs an EOS token id inside the vocabulary")
        self._eos = frozenset(eos)
        self._eos_list = eos
        self._n_vocab = max(self.vocab_size, self._n_tok)  # llguidance's width (ids past the tokenizer: b"")
        self._ll_words = -(-self._n_vocab // 32)
        self._out_words = -(-self.vocab_size // 32)
        tail = self.vocab_size % 32
        self._tail_mask = (1 << tail) - 1 if self.vocab_size < self._n_tok and tail else None
        self.cache_size = cache_size
        self.max_chars = max_chars
        self._json_options: dict[str, Any] = {"whitespace_flexible": True} if json_whitespace is None \
            else {"whitespace_pattern": json_whitespace}
        self._close_objects = disable_additional_properties
        self._limits = {**DEFAULT_LIMITS, **(limits or {})}
        self._ll: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()      # the cache
        self._ll_lock = threading.Lock()   # building the tokenizer
        self._cache: OrderedDict[GrammarSpec, llguidance.LLMatcher | GrammarError] = OrderedDict()
        self.compiles = 0  # how many specs were compiled (cache misses), for tests and metrics

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the tokenizer (built on first use: ~1 s for a 128k vocabulary)."""
        if self._ll is None:
            with self._ll_lock:
                if self._ll is None:
                    self._ll = _ll_tokenizer(self.tokenizer, self._n_vocab, self._eos_list)
        return self._ll

    def check(self, spec: GrammarSpec) -> None:
        """Raise GrammarError if `spec` cannot compile (the result is cached, errors too)."""
        self._template(spec)

    def matcher(self, spec: GrammarSpec) -> Matcher:
        """A new matcher at the start of `spec`'s grammar (compiled on first use, then copied)."""
        template = self._template(spec)
        with self._lock:  # a copy takes microseconds
            return Matcher(template.deep_copy(), self)

    # -- internals

    def _template(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        if not isinstance(spec, GrammarSpec):
            raise GrammarError(f"expected a GrammarSpec, got {type(spec).__name__}")
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
        if hit is None:
            try:
                hit = self._compile(spec)
            except GrammarError as exc:
                hit = exc
            except BaseException as exc:  # a bug in the library (a Rust panic is a BaseException)
                if isinstance(exc, Exception) or type(exc).__name__ == "PanicException":
                    log.exception("structured output: the grammar library failed on a %s", spec.kind)
                    hit = GrammarError(f"the {spec.kind.replace('_', ' ')} could not be compiled")
                else:
                    raise
            with self._lock:
                self.compiles += 1
                self._cache[spec] = hit
                self._cache.move_to_end(spec)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        if isinstance(hit, GrammarError):
            raise GrammarError(str(hit))
        return hit

    def _grammar_text(self, spec: GrammarSpec) -> str:
        kind, value = spec.kind, spec.value
        if value is not None and len(value) > self.max_chars:
            raise GrammarError(f"the {kind.replace('_', ' ')} is too long: {len(value)} characters, "
                               f"at most {self.max_chars}")
        LL = llguidance.LLMatcher
        if kind == "json_object":
            return LL.grammar_from_json_schema({"type": "object"}, defaults=self._json_options)
        if kind == "json_schema":
            try:
                schema = json.loads(value)
            except ValueError as exc:
                raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from None
            if not isinstance(schema, (dict, bool)):
                raise GrammarError(f"a JSON schema must be an object or a boolean, "
                                   f"got {type(schema).__name__}")
            if self._close_objects:
                _close_objects(schema)
            try:
                return LL.grammar_from_json_schema(schema, defaults=self._json_options)
            except (ValueError, TypeError) as exc:
                raise GrammarError(f"invalid JSON schema: {_clean_error(str(exc), kind)}") from None
        if kind == "regex":  # \d and \w as ASCII classes (JavaScript's and JSON Schema's reading)
            return LL.grammar_from_lark(f"start: /{llguidance.regex_to_lark(value, 'dw')}/")
        if kind == "choice":
            try:
                choices = json.loads(value)
            except ValueError:
                raise GrammarError("choice needs a JSON list of strings") from None
            _check_choices(choices)
            return llguidance.grammar_from("choice", choices)
        try:  # "grammar": Lark, or GBNF converted to Lark
            return llguidance.grammar_from("grammar", value)
        except ValueError as exc:
            raise GrammarError(f"invalid grammar: {_clean_error(str(exc), kind)}") from None

    def _compile(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        """A template matcher: the grammar compiled and its first mask computed (so the lexer's
        start-up limits are hit here, not in the first step); matchers are deep copies of it."""
        grammar = self._grammar_text(spec)
        limits = llguidance.LLParserLimits(**self._limits)
        m = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0, limits=limits)  # releases the GIL
        if not m.is_error():
            scratch = torch.empty(self._ll_words, dtype=torch.int32)
            m.unsafe_compute_mask_ptr(scratch.data_ptr(), self._ll_words * 4)
        if m.is_error():
            what = {"json_object": "JSON object", "json_schema": "JSON schema", "regex": "regex",
                    "choice": "choice list", "grammar": "grammar"}[spec.kind]
            msg = _clean_error(m.get_error(), spec.kind)
            if not msg.lower().startswith(f"invalid {what.lower()}"):
                msg = f"invalid {what}: {msg}"
            raise GrammarError(msg)
        for warning in m.get_grammar_warnings():
            log.debug("grammar warning (%s): %s", spec.kind, warning)
        return m
