"""The demo task: determinism, the gold scorer on hand-scored replies, and the properties each stage relies on."""

from __future__ import annotations

import hashlib
import statistics
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from stages.common.hf import EOS_TOKEN
from stages.data import demo
from stages.data.demo import DemoConfig, follows_format, gold_score

PROMPT = "User: Describe the cat.\nAssistant:"


@cache
def tiny(seed: int = 0, label_noise: float = 0.1) -> dict:
    return demo.generate(DemoConfig(size="tiny", seed=seed, label_noise=label_noise))


def _digest(sets: dict) -> str:
    return hashlib.sha256(
        "".join(demo.to_jsonl(rows) for s in sets.values() for rows in s.values()).encode()
    ).hexdigest()


@pytest.mark.parametrize(
    "response, score",
    [
        (" The cat is happy and warm.", 1.0),  # all positive
        (" The cat is happy and sad.", 0.0),  # one positive, one negative
        (" The cat is soft, calm and happy.", 2 / 3),  # neutral, positive, positive
        (" The cat is cruel, dirty and small.", -2 / 3),
        (" The cat is small.", 0.0),
        (" The cat is ugly.", -1.0),  # in format, all negative
        (" The dog is happy and warm.", -1.0),  # wrong noun
        (" The cat is happy and warm", -1.0),  # no final period
        (" Cat is happy.", -1.0),  # no "The"
        (" The cat is happy. The cat is warm.", -1.0),  # two sentences
        (" The cat is happy happy.", -1.0),
        (" The cat is happy and happy.", -1.0),  # repeated adjective
        (" The cat is purple.", -1.0),  # not an adjective of the lists
        (" The cat is happy, warm, kind and calm.", -1.0),  # more than three adjectives
        (" The cat is happy, warm.", -1.0),  # a list needs "and"
        ("", -1.0),
    ],
)
def test_gold_score_hand_scored(response: str, score: float) -> None:
    assert gold_score(PROMPT, response) == pytest.approx(score)
    in_format = score != -1.0 or response == " The cat is ugly."  # the one in-format reply that scores -1
    assert follows_format(PROMPT, response) == in_format


def test_eos_and_whitespace_are_tolerated() -> None:
    for response in (
        "The cat is happy.",
        " The cat is happy.",
        f" The cat is happy.{EOS_TOKEN}",
        " The cat is happy. \n",
    ):
        assert gold_score(PROMPT, response) == 1.0


def test_prompt_noun() -> None:
    assert demo.prompt_noun("User: Hello. What do you think of the river?\nAssistant:") == "river"
    assert demo.prompt_noun("User: Describe the cat and the dog.\nAssistant:") is None
    assert demo.prompt_noun("Describe the cat.") is None  # not the prompt format
    assert gold_score("User: Describe the weather.\nAssistant:", " The weather is happy.") == -1.0


@settings(max_examples=200, deadline=None)
@given(
    noun=st.sampled_from(demo.NOUNS),
    adjectives=st.lists(st.sampled_from(sorted(demo.SENTIMENT)), min_size=1, max_size=demo.MAX_ADJECTIVES, unique=True),
    junk=st.text(max_size=40),
)
def test_gold_score_range_and_format(noun: str, adjectives: list[str], junk: str) -> None:
    prompt = demo.make_prompt(f"Tell me about the {noun}.")
    response = demo._response(noun, adjectives)
    expected = sum(demo.SENTIMENT[a] for a in adjectives) / len(adjectives)
    assert follows_format(prompt, response)
    assert gold_score(prompt, response) == pytest.approx(expected)
    for anything in (junk, response + junk, junk + response):
        assert -1.0 <= gold_score(prompt, anything) <= 1.0
        if not follows_format(prompt, anything):
            assert gold_score(prompt, anything) == -1.0


def test_word_lists_are_disjoint() -> None:
    lists = [demo.POSITIVE, demo.NEGATIVE, demo.NEUTRAL, demo.NOUNS, demo.COLORS]
    words = [w for lst in lists for w in lst]
    assert len(words) == len(set(words))
    assert len(demo.NOUNS) == 40 and all(len(x) == 20 for x in lists[:3])


def test_same_seed_same_bytes_other_seed_differs() -> None:
    assert _digest(tiny(0)) == _digest(demo.generate(DemoConfig(size="tiny", seed=0)))
    assert _digest(tiny(0)) != _digest(tiny(1))


@pytest.mark.parametrize("size, low, high", [("tiny", 250_000, 350_000), ("demo", 2_500_000, 3_500_000)])
def test_row_counts_and_corpus_size(size: str, low: int, high: int) -> None:
    sets = tiny() if size == "tiny" else demo.generate(DemoConfig(size=size))  # demo: ~0.5 s
    spec = demo.SIZES[size]
    for name in ("sft", "preferences", "prompts"):
        assert (len(sets[name]["train"]), len(sets[name]["test"])) == getattr(spec, name)
    corpus_bytes = sum(len(r["text"].encode()) + 1 for r in sets["corpus"]["train"])
    assert spec.corpus_train_bytes <= corpus_bytes < spec.corpus_train_bytes * 1.01
    assert low <= corpus_bytes <= high
    assert len(sets["corpus"]["test"]) == spec.corpus_test_rows


def test_splits_are_disjoint() -> None:
    for name, splits in tiny().items():
        key = (lambda r: r["prompt"]) if name != "corpus" else (lambda r: r["text"])
        assert not {key(r) for r in splits["train"]} & {key(r) for r in splits["test"]}, name


def test_sft_completions_follow_format_and_are_sentiment_neutral() -> None:
    rows = tiny()["sft"]["train"] + tiny()["sft"]["test"]
    assert all(follows_format(r["prompt"], r["completion"]) for r in rows)
    assert all(r["completion"].startswith(" The ") for r in rows)
    golds = [gold_score(r["prompt"], r["completion"]) for r in rows]
    assert abs(statistics.mean(golds)) < 0.1  # SFT teaches the format, not positivity
    assert max(golds) == 1.0 and min(golds) == -1.0


@pytest.mark.parametrize("label_noise", [0.0, 0.1, 0.3])
def test_preference_labels_agree_with_gold(label_noise: float) -> None:
    rows = tiny(label_noise=label_noise)["preferences"]["train"]
    gaps = [gold_score(r["prompt"], r["chosen"]) - gold_score(r["prompt"], r["rejected"]) for r in rows]
    assert all(g != 0 for g in gaps)  # ties are skipped
    agree = statistics.mean(g > 0 for g in gaps)
    # 800 rows: the binomial standard deviation is at most ~0.017
    assert abs(agree - (1 - label_noise)) < 0.05
    assert all(r["chosen"] != r["rejected"] for r in rows)


def test_some_rejected_replies_break_the_format() -> None:
    rows = tiny()["preferences"]["train"]
    off = [r for r in rows if not follows_format(r["prompt"], r["rejected"])]
    assert 0.1 < len(off) / len(rows) < 0.3
    # without label noise the chosen reply is always in format (off-format pairs never tie at -1)
    assert all(follows_format(r["prompt"], r["chosen"]) for r in tiny(label_noise=0.0)["preferences"]["train"])


def test_corpus_shows_the_dialogue_format_and_facts() -> None:
    texts = [r["text"] for r in tiny()["corpus"]["train"]]
    assert sum("\nAssistant: The " in t for t in texts) > 100
    assert any("The cat is an animal." in t for t in texts)
    home = demo.FACTS["cat"]["place"]
    lives = [t for t in texts if "The cat lives near the " in t]
    assert lives and all(f"The cat lives near the {home}." in t for t in lives)  # facts are consistent


def test_prompts_are_prompts_only() -> None:
    for split in ("train", "test"):
        rows = tiny()["prompts"][split]
        assert all(set(r) == {"prompt"} and demo.prompt_noun(r["prompt"]) for r in rows)
        assert len({r["prompt"] for r in rows}) == len(rows)


def test_write_jsonl_dir(tmp_path) -> None:
    sets = tiny()
    demo.write_jsonl_dir(sets, tmp_path)
    for name in sets:
        for split in ("train", "test"):
            text = (tmp_path / name / f"{split}.jsonl").read_text(encoding="utf-8")
            assert text == demo.to_jsonl(sets[name][split])
            assert text.count("\n") == len(sets[name][split])


def test_config_validates_ranges() -> None:
    with pytest.raises(ValidationError):
        DemoConfig(label_noise=0.5)
    with pytest.raises(ValidationError):
        DemoConfig(size="huge")
    assert DemoConfig().size == "demo"
