"""A deterministic generator of varied, natural English sentences (reference transcripts for ASR).

Sentences are drawn from hand-written templates whose slots are filled from word lists kept in
this module (no fetched corpora). Every sentence is plain text with normal capitalisation and
punctuation; numbers are written as words (Whisper's English normaliser maps both spellings to
digits, so "twelve" and "12" score as equal). :func:`generate_sentences` is a pure function of
``(n, seed)``: the same arguments always give the same list, and the sentences of one call are
distinct. Spelling is American (Whisper writes "neighbor", "center"; the British -> American
map of Whisper's normaliser is not available offline, see :func:`esc.tasks.asr.english_normalizer`).
"""
from __future__ import annotations

import random

NAMES = ["Anna", "David", "Maria", "James", "Sarah", "Peter", "Laura", "Daniel", "Emma", "Thomas", "Olivia",
         "Michael", "Sophie", "Robert", "Grace", "Henry", "Alice", "George", "Lucy", "Frank", "Helen", "Jack"]
PEOPLE = ["my sister", "the teacher", "our neighbor", "the doctor", "his brother", "the manager", "a young student",
          "the old farmer", "my best friend", "the driver", "her mother", "the new nurse", "the chef", "our guide"]
OBJECTS = ["the blue package", "a cup of coffee", "the old map", "some fresh bread", "the red umbrella",
           "a small wooden box", "the spare keys", "the morning newspaper", "a bottle of water", "the heavy suitcase",
           "a pair of gloves", "the yellow notebook", "the birthday cake", "a basket of apples", "the green jacket",
           "the broken radio", "a bunch of flowers", "the kitchen table", "the train tickets", "a warm blanket"]
PLACES = ["the station", "the library", "the market", "the hospital", "the park", "the office", "the beach",
          "the museum", "the airport", "the village", "the garden", "the harbor", "the school", "the bakery",
          "the city center", "the hotel", "the river", "the mountains", "the post office", "the kitchen"]
TIMES = ["this morning", "last night", "on Monday", "next week", "after lunch", "before dinner", "on Friday evening",
         "at noon", "every Sunday", "in the afternoon", "tomorrow", "yesterday", "early in the morning", "at midnight",
         "last summer", "in a few minutes", "later today", "on Tuesday"]
VERBS_PAST = ["found", "bought", "carried", "painted", "dropped", "cleaned", "fixed", "sold", "borrowed", "opened",
              "forgot", "lost", "wrapped", "moved", "checked", "returned", "ordered", "hid"]
VERBS_BASE = ["bring", "buy", "carry", "clean", "fix", "open", "check", "return", "order", "move", "find", "send"]
ADJECTIVES = ["quiet", "busy", "cold", "bright", "crowded", "peaceful", "noisy", "beautiful", "empty", "warm",
              "dark", "calm", "small", "famous", "friendly", "strange"]
WEATHER = ["rain", "snow", "strong winds", "a thunderstorm", "clear skies", "heavy fog", "warm sunshine"]
ANIMALS = ["the dog", "a black cat", "the horses", "a little bird", "the cows", "an old fox", "the ducks"]
ANIMAL_ACTS = ["ran across the field", "slept under the tree", "waited by the door", "jumped over the fence",
               "swam in the lake", "hid behind the shed", "watched the children play"]
FOODS = ["soup", "rice", "chicken", "pasta", "salad", "fish", "potatoes", "pancakes", "cheese", "oranges"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve", "fifteen", "twenty"]
UNITS = ["minutes", "hours", "days", "weeks", "miles", "people", "books", "chairs"]
FUTURE_TIMES = ["tomorrow", "next week", "this afternoon", "on Saturday", "later today", "tonight"]
WEATHER_ADJ = ["cold", "warm", "windy", "sunny", "cloudy", "wet", "mild", "stormy"]
JOBS = ["the report", "the homework", "the painting", "the new bridge", "the garden wall", "the presentation"]

TEMPLATES = [
    "{Name} {vpast} {obj} at {place} {time}.",
    "Please {vbase} {obj} to {place} {time}.",
    "{Person} said that {place} was very {adj} {time}.",
    "We expect {weather} {ftime}, so take {obj} with you.",
    "{Animal} {aact} while {name} was reading.",
    "Could you tell {person} that dinner is ready at {num} o'clock?",
    "The bus to {place} leaves every {num} minutes.",
    "{Name} and {name2} walked to {place} {time}.",
    "I think {person} {vpast} {obj} {time}.",
    "There were {num} {unit} waiting outside {place}.",
    "Why did {name} leave {obj} in {place}?",
    "After a long day, {person} cooked {food} and {food2} for everyone.",
    "{Time}, {name} finished {job} and went home.",
    "It takes about {num} {unit2} to get from {place} to {place2}.",
    "{Name} never forgets to {vbase} {obj} before leaving.",
    "The weather at {place} was {wadj} and {wadj2} {time}.",
    "If you see {person}, ask about {obj}.",
    "{Person} wants to visit {place} {time}.",
    "Do not forget to {vbase} {obj} when you get to {place}.",
    "{Name} likes {food} much more than {food2}.",
]


def _fill(template: str, rng: random.Random) -> str:
    """One sentence from ``template`` with slots filled from ``rng``."""
    two = lambda xs: rng.sample(xs, 2)  # noqa: E731 - two distinct values
    name, name2 = two(NAMES)
    place, place2 = two(PLACES)
    food, food2 = two(FOODS)
    adj, adj2 = two(ADJECTIVES)
    wadj, wadj2 = two(WEATHER_ADJ)
    values = dict(name=name, name2=name2, person=rng.choice(PEOPLE), obj=rng.choice(OBJECTS), place=place,
                  place2=place2, time=rng.choice(TIMES), vpast=rng.choice(VERBS_PAST), vbase=rng.choice(VERBS_BASE),
                  adj=adj, adj2=adj2, wadj=wadj, wadj2=wadj2, ftime=rng.choice(FUTURE_TIMES), weather=rng.choice(WEATHER), animal=rng.choice(ANIMALS),
                  aact=rng.choice(ANIMAL_ACTS), food=food, food2=food2, num=rng.choice(NUMBERS),
                  unit=rng.choice(UNITS[4:]), unit2=rng.choice(UNITS[:3]), job=rng.choice(JOBS))
    values.update({k[0].upper() + k[1:]: v[0].upper() + v[1:] for k, v in list(values.items())})
    return template.format(**values)


def generate_sentences(n: int, seed: int = 0, max_tries: int = 100) -> list[str]:
    """``n`` distinct sentences, a deterministic function of ``(n, seed)``.

    Templates are used in a seeded shuffled round robin so every template appears about equally.

    Raises:
        ValueError: ``n`` is negative, or ``n`` distinct sentences were not found in ``max_tries * n`` draws.
    """
    if n < 0:
        raise ValueError(f"generate_sentences: n must be >= 0, got {n}")
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    order: list[str] = []
    tries = 0
    while len(out) < n:
        if not order:
            order = TEMPLATES[:]
            rng.shuffle(order)
        s = _fill(order.pop(), rng)
        tries += 1
        if s not in seen:
            seen.add(s)
            out.append(s)
        elif tries > max_tries * max(n, 1):
            raise ValueError(f"could not draw {n} distinct sentences (got {len(out)}); lower n")
    return out
