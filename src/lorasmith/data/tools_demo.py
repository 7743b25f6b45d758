"""The built-in tool-calling task (``lorasmith train --recipe tools``), generated from a seed.

Three tools (weather, currency conversion, table booking), declared in every record as OpenAI's
fine-tuning format does (a top-level ``tools`` list, calls with ``function.arguments`` as a JSON
string, ``tool`` results with a ``tool_call_id``). A request asks in free words and the call must
hold the arguments in the schema's form: ``"four people"`` -> ``4``, ``"14 April 2025"`` ->
``"2025-04-14"``, ``"euros"`` -> ``"EUR"``, ``"in Fahrenheit"`` -> ``"fahrenheit"``. Some requests
need two calls at once, some conversations go on for a second round, and some messages need no
call at all (the model must answer without one). After a tool's result the assistant answers from
it. The validation conversations stop at the turn to predict, and their cities, restaurants and
amounts never occur in training: the arguments have to be read from the request, not remembered.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lorasmith.data.demo import MONTHS, NUMBER_WORDS, generated_files

VERSION = 2

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "convert_currency",
            "description": "Convert an amount between currencies (ISO codes).",
            "parameters": {
                "type": "object",
                "properties": {"amount": {"type": "number"}, "from": {"type": "string"}, "to": {"type": "string"}},
                "required": ["amount", "from", "to"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "book_table",
            "description": "Book a restaurant table.",
            "parameters": {
                "type": "object",
                "properties": {
                    "restaurant": {"type": "string"},
                    "people": {"type": "integer"},
                    "date": {"type": "string", "description": "YYYY-MM-DD"},
                },
                "required": ["restaurant", "people", "date"],
            },
        },
    },
]

# Disjoint pools: the validation split draws its cities, restaurant names, amounts and small talk from
# values training never shows, so a call is right only if its arguments are read from the request.
CITIES = """Oslo Lima Cairo Hanoi Quito Perth Turin Bergen Dakar Kyoto Porto Split Malmo Cusco Tunis Leeds Graz Nice
Izmir Osaka Accra Riga Basel Cork Austin Denver Boston Seattle Dallas Miami Phoenix Atlanta Detroit Portland Chicago Toronto
Ottawa Calgary Montreal Havana Bogota Caracas Santiago Rosario Recife Manaus Salvador Lisbon Madrid Seville Valencia Bilbao
Lyon Marseille Bordeaux Lille Brussels Antwerp Utrecht Leiden Hamburg Munich Cologne Dresden Leipzig Vienna Salzburg Zurich
Geneva Milan Naples Florence Venice Bologna Palermo Athens Sofia Bucharest Belgrade Zagreb Ljubljana Prague Brno Krakow Gdansk
Warsaw Vilnius Tallinn Helsinki Tampere Uppsala Aarhus Odense Dublin Galway Glasgow Cardiff Bristol York Nairobi Kampala Lagos
Abuja Luanda Harare Maputo Durban Windhoek Casablanca Rabat Algiers Amman Beirut Doha Muscat Tehran Kabul Lahore Karachi Delhi
Mumbai Pune Chennai Kolkata Dhaka Kathmandu Colombo Yangon Bangkok Phuket Jakarta Manila Cebu Seoul Busan Taipei Sapporo
Nagoya Auckland Wellington Hobart Darwin Adelaide Brisbane""".split()  # noqa: SIM905 (a list of 150 names reads better so)
CITIES_VAL = """Kigali Asmara Tbilisi Yerevan Baku Almaty Bishkek Ulaanbaatar Vientiane Bandung Davao Kaohsiung Fukuoka Sendai
Dunedin Cairns Fresno Tulsa Omaha Halifax Winnipeg Oaxaca Merida Arequipa Cuenca Salta Tromso Aalborg Szeged Plovdiv
Varna Bergamo Trieste Coimbra Granada Nantes Ghent Bremen Freiburg Innsbruck Lucerne Iasi Cluj Lviv Kaunas Tartu""".split()  # noqa: SIM905
FIRST_WORDS = ["Blue", "Golden", "Old", "Little", "Green", "Silver", "Red", "Happy", "Royal", "Wild", "Lucky", "Quiet",
               "Sunny", "Copper", "Crystal", "Velvet", "Iron", "Rustic", "Urban", "Hidden"]  # fmt: skip
SECOND_WORDS = ["Fig", "Anchor", "Lantern", "Wok", "Garden", "Spoon", "Olive", "Table", "Oven", "Harbour", "Kettle", "Pepper",
                "Basil", "Barrel", "Fork", "Lemon", "Plate", "Cellar", "Orchard", "Bakery"]  # fmt: skip
FIRST_WORDS_VAL = ["Amber", "Scarlet", "Misty", "Northern", "Tiny", "Bright"]
SECOND_WORDS_VAL = ["Saffron", "Walnut", "Ember", "Thistle", "Heron", "Juniper"]
CURRENCIES = {
    "USD": ["dollars", "US dollars", "USD"],
    "EUR": ["euros", "EUR"],
    "GBP": ["pounds", "British pounds", "GBP"],
    "JPY": ["yen", "Japanese yen", "JPY"],
    "CHF": ["Swiss francs", "CHF"],
    "NOK": ["Norwegian kroner", "NOK"],
}
CONDITIONS = ["sunny", "cloudy", "light rain", "snow", "windy", "clear"]
SYSTEM_PROMPTS = ["You are a helpful assistant with tools.", "You help users by calling tools when needed."]
SMALL_TALK = ["Thanks, that's all!", "What can you do?", "Hello!", "Can you tell me a joke?", "Who are you?",
              "Good morning!", "Thank you so much.", "Are you a human?", "Hi there, how are you?", "Can you help me?",
              "What's your name?", "Nice to meet you.", "Goodbye!", "Do you like music?"]  # fmt: skip
SMALL_TALK_VAL = ["Hey, what's up?", "Tell me about yourself.", "Thanks a lot!", "Good evening!", "Bye for now."]
NO_TOOL_REPLY = "I can check the weather, convert currencies and book restaurant tables. What would you like to do?"


def _amount(rng: random.Random, val: bool) -> int:
    """Amounts of 1-4 digits; training's are even, validation's odd (never seen in training)."""
    n = rng.choice([rng.randint(1, 49), rng.randint(50, 999), rng.randint(1000, 9999)])
    return n | 1 if val else n & ~1 or 2


def _city(rng: random.Random, val: bool) -> str:
    return rng.choice(CITIES_VAL if val else CITIES)


def _restaurant(rng: random.Random, val: bool) -> str:
    first, second = (FIRST_WORDS_VAL, SECOND_WORDS_VAL) if val else (FIRST_WORDS, SECOND_WORDS)
    return f"{rng.choice(['The ', ''])}{rng.choice(first)} {rng.choice(second)}"


def _date(rng: random.Random) -> tuple[str, str]:
    year, month, day = rng.randint(2025, 2026), rng.randint(1, 12), rng.randint(1, 28)
    iso = f"{year:04d}-{month:02d}-{day:02d}"
    said = rng.choice([iso, f"{day} {MONTHS[month - 1]} {year}", f"{MONTHS[month - 1]} {day}, {year}"])
    return said, iso


def _weather(rng: random.Random, val: bool, city: str | None = None) -> tuple[str, dict]:
    city = city or _city(rng, val)
    unit = rng.choice(["celsius", "fahrenheit"])
    said_unit = {"celsius": rng.choice(["in Celsius", "in °C", "in degrees Celsius"]),
                 "fahrenheit": rng.choice(["in Fahrenheit", "in °F", "in degrees Fahrenheit"])}[unit]  # fmt: skip
    ask = rng.choice(["What's the weather in {c} {u}?", "How warm is it in {c} right now, {u}?", "Weather for {c} {u}, please."])
    return ask.format(c=city, u=said_unit), {"city": city, "unit": unit}


def _currency(rng: random.Random, val: bool) -> tuple[str, dict]:
    amount = _amount(rng, val)
    src, dst = rng.sample(sorted(CURRENCIES), 2)
    ask = rng.choice(["How much is {a} {s} in {d}?", "Convert {a} {s} to {d}.", "What are {a} {s} worth in {d}?"])
    said = ask.format(a=amount, s=rng.choice(CURRENCIES[src]), d=rng.choice(CURRENCIES[dst]))
    return said, {"amount": amount, "from": src, "to": dst}


def _booking(rng: random.Random, val: bool) -> tuple[str, dict]:
    place = _restaurant(rng, val)
    people = rng.randint(1, 10)
    said_people = str(people) if rng.random() < 0.5 else NUMBER_WORDS.get(people, str(people))
    said_date, iso = _date(rng)
    ask = rng.choice(["Book a table at {r} for {p} on {d}.", "Can you reserve {r} for {p} people on {d}?",
                      "I need a table for {p} at {r}, {d}."])  # fmt: skip
    return ask.format(r=place, p=said_people, d=said_date), {"restaurant": place, "people": people, "date": iso}


def _result(name: str, args: dict, rng: random.Random) -> tuple[dict, str]:
    """A tool's result, and the answer the assistant gives from it."""
    if name == "get_weather":
        t = rng.randint(-5, 30) if args["unit"] == "celsius" else rng.randint(25, 90)
        sky = rng.choice(CONDITIONS)
        sign = "°C" if args["unit"] == "celsius" else "°F"
        return {"temperature": t, "conditions": sky}, f"It is {t}{sign} and {sky} in {args['city']}."
    if name == "convert_currency":
        value = round(args["amount"] * rng.uniform(0.2, 3.0), 2)
        return {"result": value}, f"{args['amount']} {args['from']} is {value} {args['to']}."
    ref = f"R{rng.randint(1000, 9999)}"
    return {"confirmation": ref}, f"Booked {args['restaurant']} for {args['people']} on {args['date']} (confirmation {ref})."


def _call(name: str, args: dict, n: int) -> dict:
    return {"id": f"call{n:05d}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def _request(rng: random.Random, val: bool) -> tuple[str, list[tuple[str, dict]]]:
    kind = rng.random()
    if kind < 0.12:  # two calls at once
        a, b = rng.sample(CITIES_VAL if val else CITIES, 2)
        said_a, args_a = _weather(rng, val, a)
        args_b = {"city": b, "unit": args_a["unit"]}
        return f"{said_a[:-1]} And in {b}?", [("get_weather", args_a), ("get_weather", args_b)]
    maker, name = rng.choice([(_weather, "get_weather"), (_currency, "convert_currency"), (_booking, "book_table")])
    said, args = maker(rng, val)
    return said, [(name, args)]


def conversation(rng: random.Random, val: bool = False) -> dict:
    """One record; a validation record ends on the assistant turn that is scored."""
    messages: list[dict] = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    n = 0
    for round_ in range(2 if rng.random() < 0.2 else 1):
        if rng.random() < 0.15:  # no tool fits: answer directly
            said = rng.choice(SMALL_TALK_VAL if val else SMALL_TALK)
            messages += [{"role": "user", "content": said}, {"role": "assistant", "content": NO_TOOL_REPLY}]
            continue
        said, calls = _request(rng, val)
        made = []
        for name, args in calls:
            n += 1
            made.append(_call(name, args, n))
        messages += [{"role": "user", "content": said}, {"role": "assistant", "content": None, "tool_calls": made}]
        if val and round_ == 0 and rng.random() < 0.7:
            break  # scored on the call
        answers = []
        for call, (name, args) in zip(made, calls):
            result, answer = _result(name, args, rng)
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": json.dumps(result)})
            answers.append(answer)
        messages.append({"role": "assistant", "content": " ".join(answers)})
    return {"tools": TOOLS, "messages": messages}


def generate(n_train: int = 320, n_val: int = 100, seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    train = [conversation(rng) for _ in range(n_train)]
    val = [conversation(rng, val=True) for _ in range(n_val)]
    return train, val


def demo_files(seed: int = 0) -> tuple[Path, Path]:
    """Paths of the task's train.jsonl and val.jsonl, written once into the cache."""
    return generated_files(f"demo-tools-v{VERSION}-seed{seed}", lambda: generate(seed=seed))
