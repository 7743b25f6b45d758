# ruff: noqa: E501  (tables of generated text read better one entry per line)
"""The built-in preference task (``lorasmith train --recipe prefs``): prefer the short correct answer.

Each pair asks a short question (a sum, a country's capital, a word in capitals, a colour mix). The
chosen completion answers in a few words and is right; the rejected one pads the right answer with
filler (60%, and every colour question) or is short but wrong (40%). Held-out pairs use other numbers, countries, words and
filler, so reward accuracy on them measures the learned preference, not memorised pairs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lorasmith.data.demo import generated_files

VERSION = 3

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "Egypt": "Cairo",
    "Peru": "Lima", "Norway": "Oslo", "Kenya": "Nairobi", "Canada": "Ottawa", "Greece": "Athens", "Poland": "Warsaw",
    "Austria": "Vienna", "Ireland": "Dublin", "Portugal": "Lisbon", "Russia": "Moscow", "China": "Beijing",
    "Cuba": "Havana", "Chile": "Santiago", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Hungary": "Budapest", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Iran": "Tehran", "Iraq": "Baghdad",
    "Turkey": "Ankara", "Argentina": "Buenos Aires", "Colombia": "Bogota", "Belgium": "Brussels",
}  # fmt: skip
CAPITALS_VAL = {
    "Mexico": "Mexico City", "England": "London", "India": "New Delhi", "Australia": "Canberra",
    "Switzerland": "Bern", "Netherlands": "Amsterdam", "Ukraine": "Kyiv", "Morocco": "Rabat",
}  # fmt: skip
WORDS = [
    "apple",
    "river",
    "garden",
    "window",
    "silver",
    "rocket",
    "pencil",
    "forest",
    "candle",
    "butter",
    "ticket",
    "orange",
    "planet",
    "mirror",
]
WORDS_VAL = ["dragon", "lemon", "castle", "violin", "meadow"]
MIXES = [("blue", "yellow", "green"), ("red", "yellow", "orange"), ("red", "blue", "purple"), ("red", "white", "pink")]
MIXES_VAL = [("black", "white", "grey")]
FILLER = [
    ("Great question! Let me think about this carefully before I answer. ", " I hope this helps, and let me know if you have any other questions!"),
    ("Sure, I would be happy to help you with that. After careful consideration, ", " Feel free to ask me anything else you would like to know."),
    ("That is a really interesting thing to ask about. Well, as far as I can tell, ", " Please let me know if there is anything more I can do for you today."),
    ("Thanks for asking! This is something many people wonder about. In short, ", " I am always glad to help with questions like this one."),
]  # fmt: skip
FILLER_VAL = [
    ("What a lovely question, and I am glad you asked it. To answer it properly, ", " Do not hesitate to reach out if you need more help with anything."),
    ("Absolutely, let me walk you through it step by step. Putting it simply, ", " I really hope this answer was useful to you in some way."),
]  # fmt: skip


def _question(rng: random.Random, val: bool) -> tuple[str, str, str | None]:
    """(question, right answer, a wrong answer of the same form or None)."""
    kind = rng.choices(range(4), weights=(4, 3, 2, 1))[0]  # the sums have the most distinct questions
    if kind == 0:
        a, b = (rng.randint(50, 99), rng.randint(50, 99)) if val else (rng.randint(10, 49), rng.randint(10, 49))
        return f"What is {a} + {b}?", f"{a + b}.", f"{a + b + rng.choice([-10, -2, -1, 1, 2, 10])}."
    if kind == 1:
        table = CAPITALS_VAL if val else CAPITALS
        country = rng.choice(sorted(table))
        wrong = rng.choice([c for c in {**CAPITALS, **CAPITALS_VAL}.values() if c != table[country]])
        return f"What is the capital of {country}?", f"{table[country]}.", f"{wrong}."
    if kind == 2:
        word = rng.choice(WORDS_VAL if val else WORDS)
        wrong = word.capitalize() if rng.random() < 0.5 else word[::-1].upper()
        return f"Write the word '{word}' in capital letters.", word.upper(), wrong
    # No wrong colour: the held-out mix's answer is new, and the only wrong answers a short list offers are
    # the training mixes' right ones (measured: DPO then prefers those, 0 of 14 held-out pairs right).
    first, second, mix = rng.choice(MIXES_VAL if val else MIXES)
    return f"What colour do you get by mixing {first} and {second}?", f"{mix.capitalize()}.", None


def pair(rng: random.Random, val: bool = False) -> dict:
    """One record in TRL's conversational prompt/chosen/rejected shape."""
    question, right, wrong = _question(rng, val)
    if rng.random() < 0.6 or wrong is None:
        lead, tail = rng.choice(FILLER_VAL if val else FILLER)
        rejected = f"{lead}the answer is {right.rstrip('.')}.{tail}"
    else:
        rejected = wrong
    return {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": right}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def generate(n_train: int = 480, n_val: int = 100, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Distinct pairs (a pair drawn twice is drawn again)."""
    rng = random.Random(seed)

    def distinct(n: int, val: bool) -> list[dict]:
        seen, out = set(), []
        while len(out) < n:
            record = pair(rng, val)
            key = json.dumps(record, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(record)
        return out

    return distinct(n_train, False), distinct(n_val, True)


def demo_files(seed: int = 0) -> tuple[Path, Path]:
    """Paths of the task's train.jsonl and val.jsonl, written once into the cache."""
    return generated_files(f"demo-prefs-v{VERSION}-seed{seed}", lambda: generate(seed=seed))
