"""The built-in demo task: a tiny world, a deterministic generator for all four data sets, and the gold scorer.

Each stage's effect is measurable on it with tiny models on CPU:
- pretrain: the corpus is grammar-generated text with consistent facts, so perplexity can fall far below unigram;
- sft: completions follow one strict format (`follows_format`), with sentiment drawn uniformly (mean gold ~0);
- reward: preference pairs are labelled by `gold_score` with `label_noise` flips, plus off-format rejections;
- ppo: a policy pushed toward positive adjectives can raise mean gold from ~0 to near +1.

Prompt: "User: {question}\\nAssistant:"; response: " The {noun} is {adj}[, {adj}] and {adj}." (one to three adjectives).
Rows per set and size (train/test): see SIZES.
Only the standard library here (plus the config base), so scorers can run anywhere cheaply.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from stages.common.config import Section
from stages.common.hf import EOS_TOKEN
from stages.data.demo_world import (
    BY_CATEGORY,
    CATEGORY,
    COLORS,
    FACTS,
    MAX_ADJECTIVES,
    NEGATIVE,
    NEUTRAL,
    NOUNS,
    PLURAL,
    POSITIVE,
    PREFIXES,
    SENTIMENT,
    SIZE,
    TEMPLATES,
)


@dataclass(frozen=True)
class SizeSpec:
    """Rows per set (train, test); the corpus train split is sized in UTF-8 bytes."""

    corpus_train_bytes: int
    corpus_test_rows: int
    sft: tuple[int, int]
    preferences: tuple[int, int]
    prompts: tuple[int, int]


SIZES = {
    "tiny": SizeSpec(300_000, 150, sft=(800, 100), preferences=(800, 100), prompts=(256, 64)),
    "demo": SizeSpec(3_000_000, 1_000, sft=(4000, 200), preferences=(4000, 300), prompts=(2048, 128)),
}


class DemoConfig(Section):
    """The demo data: which size, which seed, how noisy the preference labels are."""

    seed: int = 0  # same seed -> byte-identical data sets
    size: Literal["tiny", "demo"] = "demo"  # rows per set: see SIZES
    label_noise: float = Field(0.1, ge=0.0, lt=0.5)  # chance a preference pair's labels are swapped
    off_format_fraction: float = Field(0.2, ge=0.0, le=0.5)  # preference pairs whose rejected reply breaks the format


# --- prompts, responses and the gold scorer ---
def make_prompt(question: str) -> str:
    return f"User: {question}\nAssistant:"


_PROMPT_RE = re.compile(r"^User: (.+)\nAssistant:\s*$", re.DOTALL)
_RESPONSE_RE = re.compile(r"^The ([a-z]+) is ([a-z]+|[a-z]+(?:, [a-z]+)* and [a-z]+)\.$")


def prompt_noun(prompt: str) -> str | None:
    """The one world noun a prompt asks about, or None when there is none (or more than one)."""
    m = _PROMPT_RE.match(prompt)
    if not m:
        return None
    found = {w for w in re.findall(r"[a-z]+", m.group(1).lower()) if w in CATEGORY}
    return found.pop() if len(found) == 1 else None


def parse_response(prompt: str, response: str) -> list[str] | None:
    """The response's adjectives if it follows the format for this prompt, else None."""
    noun = prompt_noun(prompt)
    text = response.strip()
    if text.endswith(EOS_TOKEN):  # the stages usually strip eos; tolerate it either way
        text = text[: -len(EOS_TOKEN)].strip()
    m = _RESPONSE_RE.match(text)
    if noun is None or m is None or m.group(1) != noun:
        return None
    adjectives = m.group(2).replace(" and ", ", ").split(", ")
    if len(adjectives) > MAX_ADJECTIVES or len(set(adjectives)) != len(adjectives):
        return None
    if not all(a in SENTIMENT for a in adjectives):  # "and" and unknown words end up here too
        return None
    return adjectives


def follows_format(prompt: str, response: str) -> bool:
    """One sentence " The {prompt's noun} is a[, b] and c." with one to three distinct known adjectives."""
    return parse_response(prompt, response) is not None


def gold_score(prompt: str, response: str) -> float:
    """-1 when the format is broken or the noun is wrong, else (positive - negative) / number of adjectives."""
    adjectives = parse_response(prompt, response)
    if adjectives is None:
        return -1.0
    return sum(SENTIMENT[a] for a in adjectives) / len(adjectives)


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _random_adjectives(rng: random.Random, k: int | None = None) -> list[str]:
    """k distinct adjectives, each from a uniformly chosen sentiment list (so the mean gold is ~0)."""
    k = k or rng.randint(1, MAX_ADJECTIVES)
    out: list[str] = []
    while len(out) < k:
        a = rng.choice(rng.choice((POSITIVE, NEGATIVE, NEUTRAL)))
        if a not in out:
            out.append(a)
    return out


def _response(noun: str, adjectives: list[str]) -> str:
    return f" The {noun} is {_join(adjectives)}."


def _off_format(rng: random.Random, noun: str) -> str:
    """A reply a good reward model must score low: wrong noun, broken grammar, or not an answer at all."""
    adj = _random_adjectives(rng)
    other = rng.choice([n for n in NOUNS if n != noun])
    kind = rng.randrange(8)
    if kind == 0:
        return _response(other, adj)
    if kind == 1:
        return _response(noun, adj)[:-1]  # no final period
    if kind == 2:
        return f" {noun.capitalize()} is {_join(adj)}."
    if kind == 3:
        return _response(noun, adj) + _response(noun, _random_adjectives(rng))
    if kind == 4:
        return f" The {noun} is in the {FACTS[noun]['place']} and it is {rng.choice(COLORS)}."
    if kind == 5:
        words = _response(noun, adj).split()
        rng.shuffle(words)
        return " " + " ".join(words) if words != _response(noun, adj).split() else " is the " + noun
    if kind == 6:
        return f" The {noun} is {' '.join([adj[0]] * rng.randint(3, 6))}."
    return rng.choice([" I do not know.", " Yes.", " The.", f" {noun}", " User: Describe it."])


# --- the corpus grammar ---
def _fact_sentences(rng: random.Random, noun: str) -> list[str]:
    f, cat = FACTS[noun], CATEGORY[noun]
    plural = PLURAL.get(noun)
    out = [
        f"The {noun} is {_article(cat)}.",
        f"The {noun} is {f['color']}.",
        f"The {noun} is {_join(_random_adjectives(rng))}.",
    ]
    if plural:
        out.append(f"{plural.capitalize()} are {cat}s.")
    if cat == "animal":
        out += [
            f"The {noun} lives near the {f['place']}.",
            f"The {noun} eats the {f['food']}.",
            f"The {noun} {f['action']} every day.",
        ]
        if plural:
            out += [f"The {plural} live near the {f['place']}.", f"Two {plural} {f['action'][:-1]} together."]
    elif cat == "object":
        out.append(f"The {noun} is in the {f['place']}.")
    elif cat == "food":
        eaters = [a for a in BY_CATEGORY["animal"] if FACTS[a]["food"] == noun]
        out.append(f"The {rng.choice(eaters)} eats the {noun}." if eaters else f"Nobody eats the {noun}.")
    else:
        here = [a for a in BY_CATEGORY["animal"] if FACTS[a]["place"] == noun]
        if here:
            out.append(f"The {noun} is home to {_join([_article(a) for a in here])}.")
    other = rng.choice([n for n in NOUNS if SIZE[n] != SIZE[noun]])
    out.append(f"The {noun} is {'bigger' if SIZE[noun] > SIZE[other] else 'smaller'} than the {other}.")
    return out


def _about(rng: random.Random, noun: str) -> str:
    sentences = _fact_sentences(rng, noun)
    return " ".join(rng.sample(sentences, rng.randint(2, min(5, len(sentences)))))


def _story(rng: random.Random) -> str:
    animal, thing = rng.choice(BY_CATEGORY["animal"]), rng.choice(BY_CATEGORY["object"])
    f = FACTS[animal]
    mood = _random_adjectives(rng, 1)[0]
    feeling = {
        1: f"The {animal} was glad.",
        -1: f"The {animal} was upset.",
        0: f"The {animal} looked at it for a long time.",
    }[SENTIMENT[mood]]
    home = FACTS[animal]["place"]
    ending = rng.choice(["The end.", f"Then the {animal} went back to the {home}."])
    return (
        f"Once upon a time, {_article(rng.choice(POSITIVE + NEGATIVE + NEUTRAL))} {animal} lived near the "
        f"{f['place']}. Every morning the {animal} ate the {f['food']}. One day the {animal} found "
        f"{_article(thing)} in the {FACTS[thing]['place']}. The {thing} was {mood}. {feeling} "
        f"{ending}"
    )


def _dialogue(rng: random.Random, pool: list[str]) -> str:
    turns = []
    for _ in range(rng.randint(1, 3)):
        prompt = rng.choice(pool)
        turns.append(prompt + _response(prompt_noun(prompt) or "", _random_adjectives(rng)))
    return "\n".join(turns)


def _paragraph(rng: random.Random, pool: list[str]) -> str:
    r = rng.random()
    if r < 0.5:
        return _about(rng, rng.choice(NOUNS))
    return _story(rng) if r < 0.75 else _dialogue(rng, pool)


# --- the four data sets ---
def _prompt_pools(rng: random.Random) -> tuple[list[str], list[str]]:
    """All (prefix, template, noun) prompts, split ~90/10 so test prompts are never seen in training."""
    prompts = [make_prompt(p + t.format(n=n)) for n in NOUNS for t in TEMPLATES for p in PREFIXES]
    rng.shuffle(prompts)
    cut = len(prompts) // 10
    return prompts[cut:], prompts[:cut]


def _sample(rng: random.Random, pool: list[str], k: int) -> list[str]:
    """k prompts from the pool, without repeats until the pool is used up."""
    out: list[str] = []
    while len(out) < k:
        out += rng.sample(pool, min(len(pool), k - len(out)))
    return out


def _corpus(rng: random.Random, spec: SizeSpec, pool: list[str]) -> dict[str, list[dict]]:
    test = [_paragraph(rng, pool) for _ in range(spec.corpus_test_rows)]
    held_out, train, size = set(test), [], 0
    while size < spec.corpus_train_bytes:
        text = _paragraph(rng, pool)
        if text not in held_out:  # splits share no row
            train.append(text)
            size += len(text.encode()) + 1
    return {"train": [{"text": t} for t in train], "test": [{"text": t} for t in test]}


def _sft_rows(rng: random.Random, pool: list[str], k: int) -> list[dict]:
    prompts = _sample(rng, pool, k)
    return [{"prompt": p, "completion": _response(prompt_noun(p) or "", _random_adjectives(rng))} for p in prompts]


def _preference_rows(rng: random.Random, pool: list[str], k: int, cfg: DemoConfig) -> list[dict]:
    rows = []
    for prompt in _sample(rng, pool, k):
        noun = prompt_noun(prompt) or ""
        while True:  # two in-format replies with different gold, or one in-format (gold > -1) vs off-format
            good = _response(noun, _random_adjectives(rng))
            if rng.random() < cfg.off_format_fraction:
                bad = _off_format(rng, noun)
            else:
                bad = _response(noun, _random_adjectives(rng))
            if gold_score(prompt, good) != gold_score(prompt, bad):
                break
        if gold_score(prompt, good) < gold_score(prompt, bad):
            good, bad = bad, good
        if rng.random() < cfg.label_noise:
            good, bad = bad, good
        rows.append({"prompt": prompt, "chosen": good, "rejected": bad})
    return rows


def generate(cfg: DemoConfig) -> dict[str, dict[str, list[dict]]]:
    """All four demo data sets with train/test splits; a pure function of `cfg`."""
    spec = SIZES[cfg.size]
    train_pool, test_pool = _prompt_pools(random.Random(f"{cfg.seed}/prompts"))
    rngs = {name: random.Random(f"{cfg.seed}/{name}") for name in ("corpus", "sft", "preferences", "prompts")}
    r = rngs["sft"]
    sft = {"train": _sft_rows(r, train_pool, spec.sft[0]), "test": _sft_rows(r, test_pool, spec.sft[1])}
    r = rngs["preferences"]
    prefs = {
        "train": _preference_rows(r, train_pool, spec.preferences[0], cfg),
        "test": _preference_rows(r, test_pool, spec.preferences[1], cfg),
    }
    r = rngs["prompts"]
    prompts = {
        "train": [{"prompt": p} for p in _sample(r, train_pool, spec.prompts[0])],
        "test": [{"prompt": p} for p in _sample(r, test_pool, spec.prompts[1])],
    }
    return {"corpus": _corpus(rngs["corpus"], spec, train_pool), "sft": sft, "preferences": prefs, "prompts": prompts}


def to_jsonl(rows: list[dict]) -> str:
    """One JSON object per line, keys in insertion order: the same rows always give the same bytes."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_jsonl_dir(sets: dict[str, dict[str, list[dict]]], out_dir: str | Path) -> Path:
    """Write `out_dir/<set>/{train,test}.jsonl` for every set in `sets`."""
    out = Path(out_dir)
    for name, splits in sets.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():
            (out / name / f"{split}.jsonl").write_text(to_jsonl(rows), encoding="utf-8")
    return out
