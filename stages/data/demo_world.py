"""The demo task's world: nouns with categories and sizes, adjectives by sentiment, fixed facts, prompt templates.

Data only (plus the facts drawn once from a fixed seed): the world is the same for every seed and size, so data sets
generated with different seeds describe the same world. demo.py builds prompts, replies and data sets from it.
"""

from __future__ import annotations

import random

# --- the world: (singular, plural or "", category, size 1..5); sizes make comparisons consistent facts ---
WORLD: list[tuple[str, str, str, int]] = [
    *[
        (n, p, "animal", s)
        for n, p, s in [
            ("cat", "cats", 2),
            ("dog", "dogs", 2),
            ("horse", "horses", 4),
            ("rabbit", "rabbits", 1),
            ("fox", "foxes", 2),
            ("owl", "owls", 1),
            ("frog", "frogs", 1),
            ("bear", "bears", 4),
            ("duck", "ducks", 1),
            ("goat", "goats", 3),
        ]
    ],
    *[(n, "", "food", 1) for n in ["apple", "bread", "cheese", "soup", "cake", "pear", "rice", "lemon", "plum", "pie"]],
    *[
        (n, p, "object", s)
        for n, p, s in [
            ("lamp", "lamps", 2),
            ("chair", "chairs", 3),
            ("book", "books", 1),
            ("cup", "cups", 1),
            ("clock", "clocks", 2),
            ("hat", "hats", 1),
            ("box", "boxes", 2),
            ("drum", "drums", 2),
            ("key", "keys", 1),
            ("coat", "coats", 2),
        ]
    ],
    *[
        (n, "", "place", 5)
        for n in ["river", "garden", "forest", "city", "beach", "village", "hill", "market", "lake", "castle"]
    ],
]
NOUNS = [w[0] for w in WORLD]
PLURAL = {w[0]: w[1] for w in WORLD if w[1]}
CATEGORY = {w[0]: w[2] for w in WORLD}
SIZE = {w[0]: w[3] for w in WORLD}
BY_CATEGORY = {c: [w[0] for w in WORLD if w[2] == c] for c in ("animal", "food", "object", "place")}

POSITIVE = [
    "happy",
    "kind",
    "bright",
    "lovely",
    "warm",
    "gentle",
    "cheerful",
    "beautiful",
    "pleasant",
    "wonderful",
    "calm",
    "friendly",
    "charming",
    "delightful",
    "clean",
    "fresh",
    "graceful",
    "brave",
    "joyful",
    "proud",
]
NEGATIVE = [
    "sad",
    "cruel",
    "dirty",
    "ugly",
    "broken",
    "rotten",
    "gloomy",
    "nasty",
    "awful",
    "angry",
    "bitter",
    "harsh",
    "dull",
    "rude",
    "smelly",
    "grim",
    "horrible",
    "lonely",
    "noisy",
    "weak",
]
NEUTRAL = [
    "small",
    "large",
    "round",
    "old",
    "young",
    "tall",
    "short",
    "wide",
    "heavy",
    "narrow",
    "square",
    "flat",
    "long",
    "thin",
    "soft",
    "hard",
    "quiet",
    "deep",
    "plain",
    "simple",
]
SENTIMENT = {**{a: 1 for a in POSITIVE}, **{a: -1 for a in NEGATIVE}, **{a: 0 for a in NEUTRAL}}
COLORS = ["red", "blue", "green", "yellow", "brown", "white", "black", "grey", "orange", "purple"]
ACTIONS = ["runs", "sleeps", "swims", "jumps", "sings", "hides", "plays", "climbs", "digs", "waits"]
MAX_ADJECTIVES = 3

TEMPLATES = [
    "Describe the {n}.",
    "Tell me about the {n}.",
    "What do you think of the {n}?",
    "What is the {n} like?",
    "Can you describe the {n}?",
    "Say something about the {n}.",
    "How would you describe the {n}?",
    "Give me a short description of the {n}.",
    "What can you tell me about the {n}?",
    "Write one sentence about the {n}.",
]
PREFIXES = ["", "Hello. ", "Hi! ", "Quick question. ", "I am curious. ", "Good morning. "]


def _world_facts() -> dict[str, dict[str, str]]:
    """Fixed facts (home, food, action, color, location), the same for every seed: the world does not change."""
    rng = random.Random("demo-world-v1")
    facts: dict[str, dict[str, str]] = {}
    for n in NOUNS:
        f = {"color": rng.choice(COLORS), "place": rng.choice(BY_CATEGORY["place"])}
        if CATEGORY[n] == "animal":
            f |= {"food": rng.choice(BY_CATEGORY["food"]), "action": rng.choice(ACTIONS)}
        facts[n] = f
    return facts


FACTS = _world_facts()
