"""IncrementalDetokenizer: streamed text equals a full decode, cut at the first stop string."""

import random

import pytest

from loraplex.engine.detokenizer import IncrementalDetokenizer

from .conftest import CORPUS

FRAGMENTS = CORPUS + ["é", "中文", "🙂", " 🚀!", "ñandú", "the end", "  ", "\n", "Stop", "字"]


def first_stop(text: str, stops, include: bool) -> str:
    """Reference: `text` cut at the stop string that completes first (earliest end, then the
    earliest start), keeping it when `include`."""
    hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    if not hits:
        return text
    end, start = min(hits)
    return text[:end] if include else text[:start]


def stream(tokenizer, prompt, ids, stop=(), include=False, skip=True):
    det = IncrementalDetokenizer(tokenizer, prompt, stop=stop, include_stop=include, skip_special_tokens=skip)
    chunks, stopped = [], False
    for t in ids:
        text, hit = det.push(t)
        assert not (stopped and text), "text emitted after the stop string"
        chunks.append(text)
        stopped = stopped or hit
    chunks.append(det.flush())
    assert det.text == "".join(chunks)
    return "".join(chunks), stopped or det.stopped, chunks


def pick_stops(rng, text):
    """Some stop strings taken from `text` (so they hit, often across tokens), some absent."""
    stops = []
    for _ in range(rng.randint(0, 3)):
        if text and rng.random() < 0.7:
            i = rng.randrange(len(text))
            stops.append(text[i:i + rng.randint(1, 5)])
        else:
            stops.append(rng.choice(["zzz", "the end!", "中文字符x", "\n\n"]))
    return stops


def test_invariant_byte_level_random_ids(byte_level_tokenizer):
    """Any ids at all (broken UTF-8, special tokens, any prompt): stream == decode(ids), cut."""
    tok = byte_level_tokenizer
    rng = random.Random(0)
    for trial in range(300):
        prompt = [rng.randrange(len(tok)) for _ in range(rng.randint(0, 8))]
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(0, 40))]
        skip = trial % 2 == 0
        full = tok.decode(ids, skip_special_tokens=skip)
        stops = pick_stops(rng, full)
        include = rng.random() < 0.5
        out, stopped, _ = stream(tok, prompt, ids, stops, include, skip)
        assert out == first_stop(full, stops, include), (prompt, ids, stops, include)
        assert stopped == any(s in full for s in stops)


def test_invariant_byte_level_real_text(byte_level_tokenizer):
    tok = byte_level_tokenizer
    rng = random.Random(1)
    for _ in range(100):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 6)))
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        stops = pick_stops(rng, text)
        include = rng.random() < 0.5
        out, _, chunks = stream(tok, tok.encode("Hello"), ids, stops, include)
        assert out == first_stop(text, stops, include)
        assert not any("\ufffd" in c for c in chunks), "a partial character was emitted"


def test_invariant_metaspace_continuation(metaspace_tokenizer):
    """Sentencepiece style: the stream is the continuation of the prompt's text, which keeps
    the leading space that decode(ids) alone would strip from the first token."""
    tok = metaspace_tokenizer
    specials = tok.all_special_ids
    rng = random.Random(2)
    for trial in range(300):
        # Whole fragments (complete byte-fallback runs), with special tokens between them.
        ids = []
        for _ in range(rng.randint(0, 6)):
            ids += tok.encode(rng.choice(FRAGMENTS), add_special_tokens=False)
            if rng.random() < 0.2:
                ids.append(rng.choice(specials))
        prompt = [] if trial % 3 == 0 else tok.encode(rng.choice(FRAGMENTS), add_special_tokens=False)
        if trial % 5 == 1:
            prompt = [tok.bos_token_id] + prompt
        skip = trial % 2 == 0
        before = tok.decode(prompt, skip_special_tokens=skip)
        whole = tok.decode(prompt + ids, skip_special_tokens=skip)
        assert whole.startswith(before)
        expected = whole[len(before):]
        if not prompt:
            assert expected == tok.decode(ids, skip_special_tokens=skip)
        stops = pick_stops(rng, expected)
        include = rng.random() < 0.5
        out, _, chunks = stream(tok, prompt, ids, stops, include, skip)
        assert out == first_stop(expected, stops, include), (prompt, ids, stops, include)
        assert not any("\ufffd" in c for c in chunks)


def test_leading_space_after_prompt(metaspace_tokenizer, byte_level_tokenizer):
    tok = metaspace_tokenizer
    ids = tok.encode("Hello world", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids)[0] == "▁Hello"
    assert stream(tok, tok.encode("The end.", add_special_tokens=False), ids)[0] == " Hello world"
    assert stream(tok, [tok.bos_token_id], ids)[0] == "Hello world"  # as decode(ids)
    assert stream(tok, [], ids)[0] == "Hello world"

    bl = byte_level_tokenizer
    ids = bl.encode(" Hello world")
    assert stream(bl, [], ids)[0] == stream(bl, bl.encode("The end."), ids)[0] == " Hello world"


def test_multibyte_characters_held_until_complete(byte_level_tokenizer, metaspace_tokenizer):
    for tok in (byte_level_tokenizer, metaspace_tokenizer):
        ids = tok.encode(" 中文 🙂", add_special_tokens=False)
        det = IncrementalDetokenizer(tok, [])
        chunks = [det.push(t)[0] for t in ids]
        assert len(ids) > 4 and chunks.count("") >= 2  # some tokens were partial characters
        assert "".join(chunks) + det.flush() == tok.decode(ids)
        assert not any("\ufffd" in c for c in chunks)


def test_incomplete_character_at_end_flushes_as_replacement(byte_level_tokenizer):
    tok = byte_level_tokenizer
    ids = tok.encode(" 🙂", add_special_tokens=False)[:-1]  # cut inside the emoji
    det = IncrementalDetokenizer(tok, [])
    pushed = "".join(det.push(t)[0] for t in ids)
    tail = det.flush()
    assert "\ufffd" not in pushed and "\ufffd" in tail
    assert pushed + tail == tok.decode(ids)


def test_prompt_ending_inside_a_character(byte_level_tokenizer):
    tok = byte_level_tokenizer
    ids = tok.encode("中文字符", add_special_tokens=False)
    for cut in range(1, len(ids)):
        out, _, _ = stream(tok, ids[:cut], ids[cut:])
        assert out == tok.decode(ids[cut:])


def test_stop_string_spanning_tokens(byte_level_tokenizer):
    tok = byte_level_tokenizer
    ids = tok.encode("Hello world! Hello there", add_special_tokens=False)
    assert "Hello" in tok.convert_ids_to_tokens(ids) and "Ġwor" in tok.convert_ids_to_tokens(ids)
    for include, expected in ((False, "Hell"), (True, "Hello wor")):
        det = IncrementalDetokenizer(tok, [], stop=["o wor"], include_stop=include)
        results = [det.push(t) for t in ids]
        hit_at = next(i for i, (_, hit) in enumerate(results) if hit)
        assert tok.convert_ids_to_tokens(ids[hit_at]) == "Ġwor"
        assert "".join(text for text, _ in results) == expected == det.text
        assert all(r == ("", True) for r in results[hit_at + 1:])  # nothing after the stop
        assert det.push(ids[0]) == ("", True)
        assert det.flush() == "" and det.text == expected


def test_stop_string_inside_multibyte_run(metaspace_tokenizer):
    tok = metaspace_tokenizer
    ids = tok.encode("café 中文字符 end", add_special_tokens=False)
    assert stream(tok, [], ids, stop=["文字"])[:2] == ("café 中", True)
    assert stream(tok, [], ids, stop=["文字"], include=True)[:2] == ("café 中文字", True)


def test_partial_stop_held_back_and_released(byte_level_tokenizer):
    tok = byte_level_tokenizer
    det = IncrementalDetokenizer(tok, [], stop=["there!"])
    emitted = "".join(det.push(t)[0] for t in tok.encode("Hello world! Hello the", add_special_tokens=False))
    assert emitted == "Hello world! Hello "  # "the" could still become "there!"
    assert det.flush() == "the"
    assert det.text == "Hello world! Hello the" and not det.stopped

    # Released by push as soon as the tail can no longer start a stop string.
    det = IncrementalDetokenizer(tok, [], stop=["there!"])
    chunks = [det.push(t)[0] for t in tok.encode("Hello there, how", add_special_tokens=False)]
    assert "".join(chunks) == "Hello there, how" and det.flush() == ""
    assert not any(c.endswith("there") for c in chunks)


def test_first_completed_stop_wins(byte_level_tokenizer):
    tok = byte_level_tokenizer
    ids = tok.encode("Hello world! Hello there", add_special_tokens=False)
    assert stream(tok, [], ids, stop=["world!!", "ld!", "Hello there"])[:2] == ("Hello wor", True)
    assert stream(tok, [], ids, stop=["lo th", "Hello"], include=True)[:2] == ("Hello", True)


def test_window_stays_small(byte_level_tokenizer):
    """Each push decodes a few tokens, not the whole output."""
    seen = []

    class Counting:
        def decode(self, ids, **kwargs):
            seen.append(len(ids))
            return byte_level_tokenizer.decode(ids, **kwargs)

    ids = byte_level_tokenizer.encode(" ".join(CORPUS) * 5, add_special_tokens=False)
    assert len(ids) > 300
    out, _, _ = stream(Counting(), list(range(50)), ids, stop=["never!"])
    assert out == byte_level_tokenizer.decode(ids)
    assert max(seen) <= 8

    # Tokens that add no text (EOS under ignore_eos, skipped) do not grow the window either.
    eos = byte_level_tokenizer.eos_token_id
    ids = ids[:20] + [eos] * 100 + ids[20:40] + [eos] * 50
    seen.clear()
    out, _, _ = stream(Counting(), [], ids)
    assert out == byte_level_tokenizer.decode(ids, skip_special_tokens=True)
    assert max(seen) <= 20


def test_rejects_bad_stop_and_push_after_flush(byte_level_tokenizer):
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        IncrementalDetokenizer(byte_level_tokenizer, [], stop=[""])
    det = IncrementalDetokenizer(byte_level_tokenizer, [], stop="x")
    det.flush()
    with pytest.raises(RuntimeError):
        det.push(1)
