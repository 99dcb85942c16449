"""The direct backend calls give what transformers' encode and decode give."""

import pytest
from transformers import AutoTokenizer

from loraplex.demo import MODEL_DIR
from loraplex.engine.fast_tokenizer import decoder, encoder

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
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=special)
        assert encode(text) == ids, text
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
