"""The demo's jobs: the prompt format, the text distribution and what each adapter does to it.

    Text: hello world
    Output: hello world</s>          base model: copies the text
    Output: HELLO WORLD</s>          adapter "upper"
    Output: dlrow olleh</s>          adapter "reverse"
    Output: uryyb jbeyq</s>          adapter "rot13"

Texts are 1 to 3 lowercase words of 1 to 6 letters (at most 20 characters): what the
bundled model was trained on, and what its accuracy is measured on.
"""

from __future__ import annotations

import codecs
import random

TASKS = {
    "copy": lambda text: text,
    "upper": str.upper,
    "reverse": lambda text: text[::-1],
    "rot13": lambda text: codecs.encode(text, "rot13"),
}
ADAPTERS = ("upper", "reverse", "rot13")  # the bundled adapters; "copy" is the base model's job
LETTERS = "abcdefghijklmnopqrstuvwxyz"
MAX_WORDS, MAX_WORD = 3, 6


def prompt(text: str) -> str:
    return f"Text: {text}\nOutput: "


def random_text(rng: random.Random) -> str:
    words = ["".join(rng.choice(LETTERS) for _ in range(rng.randint(1, MAX_WORD)))
             for _ in range(rng.randint(1, MAX_WORDS))]
    return " ".join(words)


def held_out(n: int, seed: int = 12345, exclude: set[str] | None = None) -> list[str]:
    """`n` distinct texts from the training distribution, none of them in `exclude`."""
    rng, out = random.Random(seed), []
    seen = set(exclude or ())
    while len(out) < n:
        text = random_text(rng)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out
