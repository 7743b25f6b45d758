"""The built-in demo task, generated deterministically from a seed: order sentences -> one JSON line.

The base model cannot do it (it does not know the key order, the ISO date rule or that
"a dozen" is 12); a few minutes of LoRA on a CPU teach it. Some conversations carry a system
prompt, some are two-turn (a second sentence after the first answer).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lorasmith import atomic
from lorasmith.paths import build_lock, cache_dir

VERSION = 1
FIRST = [
    "Maria",
    "John",
    "Aiko",
    "Lars",
    "Fatima",
    "Carlos",
    "Mei",
    "Olu",
    "Priya",
    "Tom",
    "Elena",
    "Yusuf",
    "Sofia",
    "Ivan",
    "Grace",
    "Omar",
    "Lena",
    "Raj",
    "Chloe",
    "Diego",
    "Hana",
    "Noah",
    "Zara",
    "Kofi",
]
LAST = [
    "Lopez",
    "Smith",
    "Tanaka",
    "Berg",
    "Khan",
    "Silva",
    "Chen",
    "Adeyemi",
    "Patel",
    "Brown",
    "Rossi",
    "Demir",
    "Novak",
    "Ivanova",
    "Kim",
    "Haddad",
    "Fischer",
    "Gupta",
    "Martin",
    "Garcia",
    "Sato",
    "Dubois",
]
CITIES = [
    "Lisbon",
    "Osaka",
    "Nairobi",
    "Toronto",
    "Oslo",
    "Lima",
    "Hanoi",
    "Cairo",
    "Dublin",
    "Austin",
    "Krakow",
    "Porto",
    "Denver",
    "Seoul",
    "Accra",
    "Quito",
    "Perth",
    "Munich",
    "Leeds",
    "Tunis",
]
ITEMS = [
    "desk lamp",
    "bicycle",
    "coffee grinder",
    "backpack",
    "kettle",
    "monitor",
    "yoga mat",
    "office chair",
    "tent",
    "blender",
    "keyboard",
    "umbrella",
    "water bottle",
    "headphones",
    "toaster",
    "bookshelf",
]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
NUMBER_WORDS = {
    1: "one",
    2: "two",
    3: "three",
    4: "four",
    5: "five",
    6: "six",
    7: "seven",
    8: "eight",
    9: "nine",
    10: "ten",
    12: "a dozen",
}
SENTENCES = [
    "{name} from {city} ordered {qty} {item} on {date}.",
    "On {date}, {name} ({city}) bought {qty} {item}.",
    "{qty} {item} were shipped to {name} in {city} on {date}.",
    "Order placed {date}: {name}, {city}, {qty} x {item}.",
    "{name} in {city} purchased {qty} {item}; the order date was {date}.",
    "Please note that {name} from {city} asked for {qty} {item} on {date}.",
]
INSTRUCTIONS = [
    "Extract the order as JSON with keys name, city, item, quantity, date.",
    "Turn this order into a JSON line (name, city, item, quantity, date).",
    "Give me the order details as JSON.",
]
FOLLOW_UPS = ["And this one?", "Now this order:", "Same for this one, please."]
SYSTEM_PROMPTS = [
    "You convert order descriptions into compact JSON.",
    "You are an order-processing assistant. Answer with JSON only.",
]


def _order(rng: random.Random) -> tuple[str, str]:
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    city, item = rng.choice(CITIES), rng.choice(ITEMS)
    qty = rng.choice(list(NUMBER_WORDS))
    year, month, day = rng.randint(2021, 2025), rng.randint(1, 12), rng.randint(1, 28)
    iso = f"{year:04d}-{month:02d}-{day:02d}"
    date = rng.choice([iso, f"{MONTHS[month - 1]} {day}, {year}", f"{day} {MONTHS[month - 1]} {year}"])
    qty_text = str(qty) if rng.random() < 0.5 else NUMBER_WORDS[qty]
    sentence = rng.choice(SENTENCES).format(name=name, city=city, qty=qty_text, item=item, date=date)
    answer = json.dumps({"name": name, "city": city, "item": item, "quantity": qty, "date": iso})
    return sentence, answer


def conversation(rng: random.Random) -> dict:
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    instruction = rng.choice(INSTRUCTIONS)
    sentence, answer = _order(rng)
    messages += [{"role": "user", "content": f"{instruction}\n\n{sentence}"}, {"role": "assistant", "content": answer}]
    if rng.random() < 0.2:
        sentence, answer = _order(rng)
        messages += [
            {"role": "user", "content": f"{rng.choice(FOLLOW_UPS)}\n\n{sentence}"},
            {"role": "assistant", "content": answer},
        ]
    return {"messages": messages}


def generate(n_train: int = 600, n_val: int = 100, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint train and validation conversations (no validation prompt appears in train)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    train: list[dict] = []
    val: list[dict] = []
    while len(train) < n_train or len(val) < n_val:
        conv = conversation(rng)
        key = json.dumps(conv["messages"])
        if key in seen:
            continue
        seen.add(key)
        (train if len(train) < n_train else val).append(conv)
    return train, val


def demo_files(seed: int = 0) -> tuple[Path, Path]:
    """Paths of the demo's train.jsonl and val.jsonl, written once into the cache."""
    return generated_files(f"demo-v{VERSION}-seed{seed}", lambda: generate(seed=seed))


def generated_files(name: str, make) -> tuple[Path, Path]:
    """(train.jsonl, val.jsonl) of a generated data set, written once into the cache folder ``name``
    (``make()`` returns the train and validation records)."""
    folder = cache_dir() / "data" / name
    if (folder / "val.jsonl").is_file():
        return folder / "train.jsonl", folder / "val.jsonl"
    with build_lock(f"data-{name}"):
        if not (folder / "val.jsonl").is_file():
            train, val = make()
            with atomic.folder(folder) as tmp:
                for file, rows in (("train.jsonl", train), ("val.jsonl", val)):
                    (tmp / file).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder / "train.jsonl", folder / "val.jsonl"
