"""The direct backend calls give what transformers' encode and decode give."""

import pytest
from transformers import AutoTokenizer

from loraplex.demo import MODEL_DIR
from loraplex.engine.fast_tokenizer import decoder, encoder, releasing_encoder

TEXTS = ["", "hello world", "The quick brown fox.", " leading space", "café 中文 🙂", "a\nb\tc  d",
         "<|endoftext|> inside", "Text: hello\nOutput: "]


@pytest.fixture(params=["byte_level", "metaspace", "demo"])
def tokenizer(request):
    if request.param == "demo":
        return AutoTokenizer.from_pretrained(MODEL_DIR)
    return request.getfixturevalue(f"{request.param}_tokenizer")


@pytest.mark.parametrize("special", [True, False])
def test_encode_and_decode_equal_transformers(tokenizer, special):
    encode = encoder(tokenizer, add_special_tokens=special)
    releasing = releasing_encoder(tokenizer, add_special_tokens=special)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=special)
        assert encode(text) == ids, text
        assert releasing(text) == ids, text
        for skip in (True, False):
            assert decoder(tokenizer, skip)(ids) == tokenizer.decode(ids, skip_special_tokens=skip,
                                                                    clean_up_tokenization_spaces=False)


def test_backend_settings_transformers_would_change_fall_back(byte_level_tokenizer):
    tok = byte_level_tokenizer
    text = "The quick brown fox jumps over the lazy dog."
    expected = tok.encode(text)
    tok.backend_tokenizer.enable_truncation(max_length=3)  # the backend truncates, transformers' encode not
    try:
        assert encoder(tok)(text) == expected and len(expected) > 3
    finally:
        tok.backend_tokenizer.no_truncation()


class Custom:
    def encode(self, text, add_special_tokens=True):
        return [len(text), int(add_special_tokens)]

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "-".join(map(str, ids))


def test_other_tokenizers_use_their_own_methods():
    assert encoder(Custom(), add_special_tokens=False)("abc") == [3, 0]
    assert decoder(Custom(), True)([1, 2]) == "1-2"


def test_the_releasing_encoder_lets_other_threads_run():
    """A long prompt tokenized on a worker thread must not stop the event loop's thread."""
    import threading
    import time

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    text = "hello world, this is a test. " * 20000  # 580,000 characters: about a second here
    ticks, done = [0], threading.Event()

    def tick():
        while not done.is_set():
            ticks[0] += 1
            time.sleep(0.001)
    ticker = threading.Thread(target=tick)
    ticker.start()
    started = time.perf_counter()
    try:
        ids = releasing_encoder(tok)(text)
    finally:
        elapsed = time.perf_counter() - started
        done.set()
        ticker.join(5)
    assert ids == encoder(tok)(text)
    assert ticks[0] > 0.3 * elapsed * 1000, (ticks[0], elapsed)  # held GIL: a handful of ticks in all
