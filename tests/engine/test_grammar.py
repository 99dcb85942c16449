"""Structured output (loraplex.engine.grammar): specs, bitmask layout, matcher semantics, errors and
limits, and generation under each kind of grammar by a small random Llama stepping token by token
with the mask applied to its logits (CPU only, seconds)."""

from __future__ import annotations

import json
import pickle
import re
import time
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoTokenizer

import loraplex
from loraplex.engine.grammar import (
    GrammarCompiler,
    GrammarError,
    GrammarSpec,
    apply_token_bitmask_ref,
    new_bitmask,
)

DEMO = Path(loraplex.__file__).parent / "demo" / "model"
EOS = 2
VOCAB = 110  # the model's logits width: > len(tokenizer) == 100, not a multiple of 32

SCHEMA = {  # short keys: the demo tokenizer spends one token per character
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "pet": {"enum": ["cat", "dog"]},
        "ok": {"type": "boolean"},
        "xs": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
        "nm": {"type": "string", "maxLength": 4},
    },
    "required": ["id", "pet", "xs"],
    "additionalProperties": False,
}
REGEX = r"\d{3}-[a-z]{2}"
CHOICES = ["red", "green", "blue", "light blue"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model steps one token at a time: intra-op threads only add wake-up latency (up to
    40x on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(DEMO)


@pytest.fixture(scope="module")
def compiler(tok):
    return GrammarCompiler(tok, VOCAB, {EOS})


@pytest.fixture(scope="module")
def model(tok):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def allowed(row: torch.Tensor, n: int = VOCAB) -> set[int]:
    return {t for t in range(n) if (int(row[t // 32]) >> (t % 32)) & 1}


def ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


# ---------------------------------------------------------------------------------------------
# generation by a random model under the mask


def generate(model, tok, compiler, spec, seed, max_tokens=64, nudge_after=16):
    """Seeded sampling, one token at a time, through the matcher's mask. From `nudge_after` on, the
    tokens that close things get a bonus, in this order: EOS, '"' (ends a string; an empty key or
    string elsewhere), '}', ']', ','; so that random weights end within the cap. The mask still
    decides what is allowed."""
    matcher = compiler.matcher(spec)
    g = torch.Generator().manual_seed(seed)
    nudge = torch.zeros(VOCAB)
    closers = [EOS] + [tok.convert_tokens_to_ids(c) for c in '"}],']
    for bonus, t in zip((50.0, 40.0, 30.0, 20.0, 10.0), closers):
        nudge[t] = bonus
    prompt = [tok.bos_token_id] + ids(tok, "Q: answer. A: ")
    bitmask = new_bitmask(1, VOCAB)
    out: list[int] = []
    for step in range(max_tokens):
        with torch.no_grad():  # the whole sequence each step (no cache: a few ms at this size)
            logits = model(torch.tensor([prompt + out]), use_cache=False).logits[0, -1]
        matcher.fill_bitmask(bitmask[0])
        mask = allowed(bitmask[0])
        assert mask and all(t < len(tok) for t in mask), mask
        logits = apply_token_bitmask_ref(logits, bitmask[0])
        if step >= nudge_after:
            logits = logits + nudge
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
        assert token in mask
        assert matcher.accept(token), matcher.error()
        if token == EOS:
            break
        out.append(token)
        if matcher.is_finished():  # nothing but EOS may follow (the engine ends the request here)
            matcher.fill_bitmask(bitmask[0])
            assert allowed(bitmask[0]) == {EOS}
            break
    assert matcher.is_finished(), f"not finished within {max_tokens} tokens: {tok.decode(out)!r}"
    return tok.decode(out)


def check_schema(value, schema) -> None:
    """The subset of JSON Schema that SCHEMA uses, by hand."""
    if "enum" in schema:
        assert value in schema["enum"], value
        return
    kind = schema["type"]
    if kind == "object":
        assert isinstance(value, dict), value
        assert set(schema.get("required", ())) <= set(value), value
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(schema["properties"]), value
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                check_schema(value[key], sub)
    elif kind == "array":
        assert isinstance(value, list), value
        assert schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)), value
        for item in value:
            check_schema(item, schema["items"])
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), value
        assert schema.get("minimum", value) <= value <= schema.get("maximum", value), value
    elif kind == "string":
        assert isinstance(value, str) and len(value) <= schema.get("maxLength", len(value)), value
    elif kind == "boolean":
        assert isinstance(value, bool), value
    else:
        raise AssertionError(f"unhandled type {kind}")


SEEDS = [0, 1, 2, 3]


@pytest.mark.parametrize("seed", SEEDS)
def test_generate_json_object(model, tok, compiler, seed):
    text = generate(model, tok, compiler, GrammarSpec.json_object(), seed)
    assert isinstance(json.loads(text), dict), text


@pytest.mark.parametrize("seed", SEEDS)
def test_generate_json_schema(model, tok, compiler, seed):
    text = generate(model, tok, compiler, GrammarSpec.json_schema(SCHEMA), seed)
    value = json.loads(text)
    check_schema(value, SCHEMA)
    try:  # a second opinion where the Rust validator is installed (schemathesis brings it)
        import jsonschema_rs
    except ImportError:
        return
    jsonschema_rs.validate(SCHEMA, value)


@pytest.mark.parametrize("seed", SEEDS)
def test_generate_regex(model, tok, compiler, seed):
    text = generate(model, tok, compiler, GrammarSpec.regex(REGEX), seed)
    assert re.fullmatch(REGEX, text), text


@pytest.mark.parametrize("seed", SEEDS)
def test_generate_choice(model, tok, compiler, seed):
    text = generate(model, tok, compiler, GrammarSpec.choice(CHOICES), seed)
    assert text in CHOICES


def test_generate_lark_grammar(model, tok, compiler):
    spec = GrammarSpec.grammar('start: "x=" num ("," num)*\nnum: /[0-9]{1,3}/')
    for seed in SEEDS:
        text = generate(model, tok, compiler, spec, seed)
        assert re.fullmatch(r"x=[0-9]{1,3}(,[0-9]{1,3})*", text), text


@pytest.mark.parametrize("fixture", ["byte_level_tokenizer", "metaspace_tokenizer"])
def test_bpe_tokenizers(request, fixture):
    """llguidance's own loader (byte-level BPE; sentencepiece-style with byte fallback): every token
    of a matching text, characters cut across tokens included, is allowed step by step."""
    tok = request.getfixturevalue(fixture)
    vocab = len(tok) + 7
    compiler = GrammarCompiler(tok, vocab, {tok.eos_token_id})
    value = {"id": 42, "pet": "dog", "xs": [1, 2], "nm": "é中🙂"}
    text = json.dumps(value, ensure_ascii=False)
    token_ids = compiler.ll_tokenizer.tokenize_str(text)
    assert tok.decode(token_ids) == text and len(token_ids) < len(text.encode())
    m = compiler.matcher(GrammarSpec.json_schema({**SCHEMA, "properties": {
        **SCHEMA["properties"], "nm": {"type": "string", "maxLength": 3}}}))
    bm = new_bitmask(1, vocab)
    for t in token_ids + [tok.eos_token_id]:
        m.fill_bitmask(bm[0])
        mask = allowed(bm[0], vocab)
        assert t in mask and max(mask) < len(tok)
        assert m.accept(t), m.error()
    assert m.is_finished()
    m = compiler.matcher(GrammarSpec.regex(r"\d+"))
    m.fill_bitmask(bm[0])
    mask = allowed(bm[0], vocab)
    assert mask and all(tok.decode([t]).isdigit() and tok.decode([t]).isascii() for t in mask)


def test_regex_classes_are_ascii(tok, compiler):
    bm = new_bitmask(1, VOCAB)
    compiler.matcher(GrammarSpec.regex(r"\d")).fill_bitmask(bm[0])
    assert {tok.decode([t]) for t in allowed(bm[0])} == set("0123456789")
    compiler.matcher(GrammarSpec.regex(r"\w")).fill_bitmask(bm[0])
    assert {tok.decode([t]) for t in allowed(bm[0])} == set("0123456789_abcdefghijklmnopqrstuvwxyz"
                                                             "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


# ---------------------------------------------------------------------------------------------
# specs


def test_spec_helpers_and_pickle():
    schema = {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "integer"}}}
    spec = GrammarSpec.json_schema(schema)
    assert spec.kind == "json_schema" and json.loads(spec.value) == schema
    assert list(json.loads(spec.value)["properties"]) == ["b", "a"]  # key order is the output's order
    assert GrammarSpec.json_schema(json.dumps(schema)).value == json.dumps(schema)
    assert GrammarSpec.json_object() == GrammarSpec("json_object", None)
    assert json.loads(GrammarSpec.choice(("a", "é")).value) == ["a", "é"]
    assert GrammarSpec.regex("a+") == GrammarSpec("regex", "a+")
    for s in (spec, GrammarSpec.json_object(), GrammarSpec.choice(CHOICES), GrammarSpec.grammar('start: "a"'),
              GrammarSpec.regex(REGEX)):
        clone = pickle.loads(pickle.dumps(s))
        assert clone == s and hash(clone) == hash(s)
    with pytest.raises(GrammarError, match="kind"):
        GrammarSpec("yaml", "x")
    with pytest.raises(GrammarError):
        GrammarSpec("regex", None)
    with pytest.raises(GrammarError):
        GrammarSpec("json_object", "{}")
    with pytest.raises(GrammarError, match="non-empty list"):
        GrammarSpec.choice([])
    with pytest.raises(GrammarError, match="string"):
        GrammarSpec.choice(["a", 1])
    with pytest.raises(GrammarError, match="non-empty list"):
        GrammarSpec.choice("abc")
    with pytest.raises(GrammarError, match="serializable"):
        GrammarSpec.json_schema({"type": object()})


# ---------------------------------------------------------------------------------------------
# bitmask layout and the reference masking


def test_new_bitmask_and_reference():
    bm = new_bitmask(3, VOCAB)
    assert bm.shape == (3, 4) and bm.dtype == torch.int32 and bool((bm == -1).all())
    assert new_bitmask(1, 64).shape == (1, 2) and new_bitmask(1, 65).shape == (1, 3)
    logits = torch.randn(3, VOCAB)
    assert torch.equal(apply_token_bitmask_ref(logits, bm), logits)  # all allowed
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(3, VOCAB, generator=g) < 0.3
    bm = torch.zeros(3, 4, dtype=torch.int32)
    for b, t in keep.nonzero().tolist():
        bm[b, t // 32] |= torch.tensor(1 << (t % 32)).to(torch.int32)  # bit 31 -> the int32 sign bit
    out = apply_token_bitmask_ref(logits, bm)
    assert torch.equal(out[keep], logits[keep]) and bool(torch.isneginf(out[~keep]).all())
    assert torch.equal(apply_token_bitmask_ref(logits[1], bm[1]), out[1])  # a single row
    with pytest.raises(ValueError):
        apply_token_bitmask_ref(logits, torch.zeros(3, 3, dtype=torch.int32))  # too narrow


def test_rows_past_the_tokenizer(tok, compiler):
    """vocab_size 110 > len(tokenizer) 100, not a multiple of 32: ids 100..127 are never allowed."""
    assert len(tok) == 100
    bm = new_bitmask(3, VOCAB)
    matchers = [compiler.matcher(GrammarSpec.regex(r"[\s\S]*")), compiler.matcher(GrammarSpec.json_object())]
    for row, m in zip((0, 2), matchers):
        m.fill_bitmask(bm[row])
    every = allowed(bm[0], 128)
    assert every and max(every) < 100
    assert every == set(range(4, 100)) | {EOS}  # any text, or the end; no pad/bos/unk
    assert allowed(bm[2], 128) == {tok.convert_tokens_to_ids("{")}
    assert bool((bm[1] == -1).all())  # an unconstrained row is left alone
    with pytest.raises(ValueError, match="bitmask row"):
        matchers[0].fill_bitmask(torch.zeros(3, dtype=torch.int32))  # the wrong width
    with pytest.raises(ValueError, match="bitmask row"):
        matchers[0].fill_bitmask(torch.zeros(4, dtype=torch.int64))


def test_vocab_narrower_than_tokenizer(tok):
    """A model whose logits are narrower than the tokenizer (90 < 100): no bit at or past 90."""
    compiler = GrammarCompiler(tok, 90, {EOS})
    m = compiler.matcher(GrammarSpec.regex(r"[\s\S]*"))
    bm = new_bitmask(1, 90)
    assert bm.shape == (1, 3)
    m.fill_bitmask(bm[0])
    assert allowed(bm[0], 96) == set(range(4, 90)) | {EOS}
    assert not m.accept(95)  # a token the model cannot produce


# ---------------------------------------------------------------------------------------------
# matcher semantics


def test_eos_exactly_where_the_grammar_may_end(tok, compiler):
    bm = new_bitmask(1, VOCAB)
    a, b = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")

    m = compiler.matcher(GrammarSpec.regex("ab"))
    m.fill_bitmask(bm[0])
    assert allowed(bm[0]) == {a} and not m.is_finished()
    assert m.accept(a) and not m.is_finished()
    m.fill_bitmask(bm[0])
    assert allowed(bm[0]) == {b}
    assert m.accept(b) and m.is_finished()  # nothing more can follow
    m.fill_bitmask(bm[0])
    assert allowed(bm[0]) == {EOS}
    assert m.accept(EOS) and m.is_finished() and m.error() is None

    m = compiler.matcher(GrammarSpec.regex("a+"))
    assert m.accept(a) and not m.is_finished()
    m.fill_bitmask(bm[0])
    assert allowed(bm[0]) == {a, EOS}  # more, or the end
    assert m.accept(EOS) and m.is_finished()

    m = compiler.matcher(GrammarSpec.regex("a+"))
    m.fill_bitmask(bm[0])
    assert EOS not in allowed(bm[0])  # the empty output does not match
    assert not m.accept(EOS)


def test_rejected_token(tok, compiler):
    m = compiler.matcher(GrammarSpec.json_object())
    assert not m.accept(tok.convert_tokens_to_ids("x"))
    assert not m.is_finished() and m.error()
    bm = new_bitmask(1, VOCAB)
    m.fill_bitmask(bm[0])
    assert allowed(bm[0]) == {EOS}  # a broken matcher still leaves the sampler a token
    done = compiler.matcher(GrammarSpec.regex("a"))
    assert done.accept(tok.convert_tokens_to_ids("a")) and done.is_finished()
    assert not done.accept(tok.convert_tokens_to_ids("a"))  # after the end, only EOS
    assert not compiler.matcher(GrammarSpec.regex("a")).accept(-1)
    assert not compiler.matcher(GrammarSpec.regex("a")).accept(VOCAB + 5)


def test_engine_eos_ids(tok):
    """The engine's EOS ids (several, not only the tokenizer's) end the grammar; ids outside the
    vocabulary are dropped."""
    compiler = GrammarCompiler(tok, VOCAB, {EOS, 3, 10_000})
    m = compiler.matcher(GrammarSpec.choice(["hi"]))
    for c in "hi":
        assert m.accept(tok.convert_tokens_to_ids(c))
    bm = new_bitmask(1, VOCAB)
    m.fill_bitmask(bm[0])
    assert allowed(bm[0]) == {EOS, 3}
    assert m.accept(3) and m.is_finished()
    with pytest.raises(ValueError, match="EOS"):
        GrammarCompiler(_NoEos(tok), VOCAB, set())


class _NoEos:
    def __init__(self, tok):
        self._tok = tok
        self.eos_token_id = None

    def __len__(self):
        return len(self._tok)


def test_independent_matchers_and_cache(tok):
    compiler = GrammarCompiler(tok, VOCAB, {EOS}, cache_size=2)
    spec = GrammarSpec.json_schema(SCHEMA)
    m1, m2 = compiler.matcher(spec), compiler.matcher(spec)
    compiler.check(spec)
    assert compiler.compiles == 1
    for c in '{"id":1':
        assert m1.accept(tok.convert_tokens_to_ids(c))
    bm = new_bitmask(2, VOCAB)
    m1.fill_bitmask(bm[0])
    m2.fill_bitmask(bm[1])
    assert allowed(bm[1]) == {tok.convert_tokens_to_ids("{")}  # m2 did not move with m1
    assert tok.convert_tokens_to_ids(",") in allowed(bm[0])
    compiler.check(GrammarSpec.regex("a"))
    compiler.check(GrammarSpec.regex("b"))  # evicts the schema (LRU of 2)
    compiler.matcher(spec)
    assert compiler.compiles == 4
    bad = GrammarSpec.regex("(")
    for _ in range(2):
        with pytest.raises(GrammarError):
            compiler.check(bad)
    assert compiler.compiles == 5  # errors are cached too


def test_additional_properties(tok, compiler):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    text = '{"a":1,"b":2}'
    m = compiler.matcher(GrammarSpec.json_schema(schema))
    assert all(m.accept(t) for t in ids(tok, text))  # JSON Schema: extra keys allowed when not closed
    closed = GrammarCompiler(tok, VOCAB, {EOS}, disable_additional_properties=True)
    m = closed.matcher(GrammarSpec.json_schema(schema))
    assert all(m.accept(t) for t in ids(tok, '{"a":1'))
    assert not m.accept(tok.convert_tokens_to_ids(","))
    m = compiler.matcher(GrammarSpec.json_schema({**schema, "additionalProperties": False}))
    assert all(m.accept(t) for t in ids(tok, '{"a":1'))
    assert not m.accept(tok.convert_tokens_to_ids(","))


def test_whitespace_is_bounded(tok, compiler):
    m = compiler.matcher(GrammarSpec.json_object())
    assert m.accept(tok.convert_tokens_to_ids("{"))
    space = tok.convert_tokens_to_ids(" ")
    assert all(m.accept(space) for _ in range(32))
    assert not m.accept(space)


# ---------------------------------------------------------------------------------------------
# errors and limits


@pytest.mark.parametrize("spec, match", [
    (GrammarSpec("json_schema", "{not json"), "not valid JSON"),
    (GrammarSpec("json_schema", "[1, 2]"), "object or a boolean"),
    (GrammarSpec.json_schema({"type": "objekt"}), "objekt"),
    (GrammarSpec.json_schema({"$ref": "#/$defs/missing"}), "missing"),
    (GrammarSpec.json_schema({"type": "array", "uniqueItems": True}), "uniqueItems"),
    (GrammarSpec.json_schema({"type": "string", "format": "no-such-format"}), "format"),
    (GrammarSpec.json_schema({"type": "string", "pattern": "(abc"}), "unclosed group"),
    (GrammarSpec.regex("(abc"), "unclosed group"),
    (GrammarSpec.regex("[z-a]"), "invalid"),
    (GrammarSpec.regex(r"(a)\1"), "backreferences"),
    (GrammarSpec.regex("(?=a)a"), "look-around"),
    (GrammarSpec("choice", "not json"), "list of strings"),
    (GrammarSpec("choice", "[]"), "non-empty list"),
    (GrammarSpec("choice", '["a", 2]'), "string"),
    (GrammarSpec.grammar('start: "a" undefined_rule'), "undefined_rule"),
])
def test_invalid_specs(compiler, spec, match):
    start = time.perf_counter()
    with pytest.raises(GrammarError, match=match) as info:
        compiler.check(spec)
    assert time.perf_counter() - start < 0.5
    message = str(info.value)
    assert message.startswith(("invalid", "the ", "a JSON", "choice", "every")), message
    assert "/" + "work" not in message and "site-packages" not in message and "<state>" not in message
    with pytest.raises(GrammarError):
        compiler.matcher(spec)


def test_too_long(tok):
    compiler = GrammarCompiler(tok, VOCAB, {EOS}, max_chars=1000)
    start = time.perf_counter()
    with pytest.raises(GrammarError, match="too long"):
        compiler.check(GrammarSpec.regex("a" * 1001))
    assert time.perf_counter() - start < 0.1
    compiler.check(GrammarSpec.regex("a" * 1000))


@pytest.mark.parametrize("pattern", [r"(a*)*b", r"(a|aa)*b", r"(x+x+)+y", r"^(a|a?)+$",
                                     r"(a|b|c)*a(a|b|c){20}", r"(a{1000}){1000}"])
def test_pathological_regex_is_bounded(tok, compiler, pattern):
    """Compiles (or fails) and steps in bounded time: no backtracking, and lexer limits."""
    a = tok.convert_tokens_to_ids("a")
    start = time.perf_counter()
    try:
        m = compiler.matcher(GrammarSpec.regex(pattern))
    except GrammarError:
        m = None
    if m is not None:
        bm = new_bitmask(1, VOCAB)
        for _ in range(5):
            m.fill_bitmask(bm[0])
            if a not in allowed(bm[0]) or not m.accept(a):
                break
    assert time.perf_counter() - start < 2.0


def test_big_schemas_are_bounded(compiler):
    many = {"type": "object", "additionalProperties": False,
            "properties": {f"field_{i}": {"type": ["string", "integer", "null"]} for i in range(500)}}
    deep: dict = {"type": "integer"}
    for _ in range(200):
        deep = {"type": "object", "properties": {"x": deep}, "required": ["x"]}
    start = time.perf_counter()
    compiler.check(GrammarSpec.json_schema(many))
    compiler.check(GrammarSpec.json_schema({"enum": [f"value-{i}" for i in range(3000)]}))
    compiler.check(GrammarSpec.choice([f"option {i}" for i in range(3000)]))
    with pytest.raises(GrammarError, match="recursion"):
        compiler.check(GrammarSpec.json_schema(deep))
    assert time.perf_counter() - start < 3.0
