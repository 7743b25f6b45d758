"""Generated benchmark conversations with a realistic length spread (median ~124, p90 ~301, max ~506
tokens under SmolLM2's template): sort a list of words. Learnable, so eval loss means something."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "maple",
    "tiger",
    "amber",
    "violet",
    "harbor",
    "falcon",
    "copper",
    "meadow",
    "lantern",
    "pepper",
    "orbit",
    "canyon",
    "willow",
    "garnet",
    "breeze",
    "saddle",
    "thunder",
    "cobalt",
    "marble",
    "lemon",
    "cedar",
    "pixel",
    "walnut",
    "comet",
    "ginger",
    "quartz",
    "velvet",
    "summit",
    "ember",
    "rocket",
    "sparrow",
    "olive",
    "prism",
    "tundra",
    "juniper",
    "crimson",
    "island",
    "beacon",
    "raven",
    "silver",
    "mango",
    "fjord",
]
MEDIAN, P90, MAX = 124, 301, 506
_TOKENS_PER_WORD = 2.1  # a word in the question and again in the answer, SmolLM2's BPE
_OVERHEAD = 40  # default system prompt and chat markup


def conversation(rng: random.Random) -> dict:
    sigma = math.log(P90 / MEDIAN) / 1.2816  # lognormal whose median and p90 match the target
    target = min(MAX, max(48, rng.lognormvariate(math.log(MEDIAN), sigma)))
    n = max(3, int((target - _OVERHEAD) / _TOKENS_PER_WORD))
    words = [rng.choice(WORDS) for _ in range(n)]
    return {
        "messages": [
            {"role": "user", "content": "Sort these words alphabetically: " + " ".join(words)},
            {"role": "assistant", "content": " ".join(sorted(words))},
        ]
    }


def write(folder: Path, n_train: int = 512, n_val: int = 32, seed: int = 0) -> tuple[Path, Path]:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n in (("train.jsonl", n_train), ("val.jsonl", n_val)):
        path = folder / name
        path.write_text("".join(json.dumps(conversation(rng)) + "\n" for _ in range(n)))
        paths.append(path)
    return paths[0], paths[1]
