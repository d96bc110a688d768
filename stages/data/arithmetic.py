"""The built-in arithmetic task: addition of two integers, generated offline like the demo task, with an exact-match
gold scorer, so GRPO with a verifiable reward (the `answer` column of the prompts) has something to learn.

Operands are 0..99 (MAX_OPERAND), so sums are 0..198. Why that range:
- 5,050 distinct problems {a, b}: enough for the demo size's 4,000 SFT and 4,000 preference rows without repeating a
  problem, and for a held-out tenth (~500 problems) that no train split of any data set ever shows;
- an answer is at most three digits, a few tokens, so it fits any max_new_tokens the presets use;
- about half the problems need a carry: a tiny GPT-2 learns the format (one bare number) quickly but not every sum,
  so the replies of a GRPO group are a mix of right and wrong, and exact match gives a learning signal.

Prompt: demo.make_prompt("What is 12 + 7?") with a few phrasings and greetings; reply: " 19" (a leading space after
"Assistant:", as demo replies have). Train and test use disjoint problems, where {a, b} and {b, a} are the same problem
(so the test set measures adding, not recalling a sum seen the other way round).
Rows per set and size: demo.SIZES, the same as the demo task. Only the standard library here, like demo.py.
"""

from __future__ import annotations

import random
import re

from stages.common.hf import EOS_TOKEN
from stages.data import demo
from stages.data.demo import DemoConfig, SizeSpec, make_prompt

MAX_OPERAND = 99
TEST_FRACTION = 0.1  # share of the problems held out for every test split

TEMPLATES = [
    "What is {a} + {b}?",
    "What is {a} plus {b}?",
    "What is the sum of {a} and {b}?",
    "How much is {a} + {b}?",
    "Compute {a} + {b}.",
    "Calculate {a} + {b}.",
    "Add {a} and {b}.",
]
PREFIXES = demo.PREFIXES  # the demo's greetings: no digits in them, so parsing a prompt stays unambiguous

Problem = tuple[int, int]


# --- parsing a prompt back into its problem, and the gold scorer ---
def _template_pattern(template: str) -> str:
    """A template as a regex whose two groups are the operands."""
    parts = re.split(r"(\{a\}|\{b\})", template)
    return "".join(r"(\d+)" if p in ("{a}", "{b}") else re.escape(p) for p in parts)


_PREFIX_PATTERN = "(?:" + "|".join(re.escape(p) for p in PREFIXES) + ")"
_QUESTION_RES = [re.compile(f"^{_PREFIX_PATTERN}{_template_pattern(t)}$") for t in TEMPLATES]
_NUMBER_RE = re.compile(r"^\d+$")
_PROMPT_RE = re.compile(r"^User: (.+)\nAssistant:\s*$", re.DOTALL)  # demo.make_prompt's form


def parse_problem(prompt: str) -> Problem | None:
    """(a, b) of a prompt this task phrases, or None for any other prompt."""
    m = _PROMPT_RE.match(prompt)
    if not m:
        return None
    for pattern in _QUESTION_RES:
        q = pattern.match(m.group(1))
        if q:
            return int(q.group(1)), int(q.group(2))
    return None


def answer(prompt: str) -> str | None:
    """The right reply's text ("19"), or None when the prompt is not one of this task's."""
    problem = parse_problem(prompt)
    return None if problem is None else str(sum(problem))


def _reply_text(response: str) -> str:
    """The reply without surrounding whitespace or a final eos (the stages usually strip it; tolerate it either way)."""
    text = response.strip()
    if text.endswith(EOS_TOKEN):
        text = text[: -len(EOS_TOKEN)].strip()
    return text


def follows_format(prompt: str, response: str) -> bool:
    """The reply is one bare non-negative integer (right or wrong), for a prompt of this task."""
    return parse_problem(prompt) is not None and bool(_NUMBER_RE.match(_reply_text(response)))


def gold_score(prompt: str, response: str) -> float:
    """1.0 when the reply is exactly the sum ("19"; not "019", "19." or "It is 19"), else 0.0."""
    expected = answer(prompt)
    return 1.0 if expected is not None and _reply_text(response) == expected else 0.0


# --- problems and their phrasings ---
def _problem_pools(rng: random.Random) -> tuple[list[Problem], list[Problem]]:
    """Every ordered (a, b), split by unordered problem so a test sum is never seen in training, either way round."""
    unordered = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(a, MAX_OPERAND + 1)]
    rng.shuffle(unordered)
    cut = round(len(unordered) * TEST_FRACTION)

    def both_ways(problems: list[Problem]) -> list[Problem]:
        return sorted({p for a, b in problems for p in ((a, b), (b, a))})

    return both_ways(unordered[cut:]), both_ways(unordered[:cut])


def _prompt(rng: random.Random, problem: Problem) -> str:
    a, b = problem
    return make_prompt(rng.choice(PREFIXES) + rng.choice(TEMPLATES).format(a=a, b=b))


def _sample(rng: random.Random, pool: list[Problem], k: int) -> list[Problem]:
    """k problems from the pool, none twice until the pool is used up (never, at the sizes of demo.SIZES)."""
    out: list[Problem] = []
    while len(out) < k:
        out += rng.sample(pool, min(len(pool), k - len(out)))
    return out


def _reply(problem: Problem) -> str:
    return f" {sum(problem)}"


def _near_miss(rng: random.Random, problem: Problem) -> str:
    """A wrong sum of the kind a learner makes: off by one, two or ten, the carry forgotten, or the digits swapped."""
    a, b = problem
    s = a + b
    no_carry = int("".join(str((int(x) + int(y)) % 10) for x, y in zip(f"{a:03d}", f"{b:03d}", strict=True)))
    candidates = {s - 1, s + 1, s - 2, s + 2, s - 10, s + 10, no_carry, int(str(s)[::-1])}
    return f" {rng.choice(sorted(c for c in candidates if c >= 0 and c != s))}"


def _off_format(rng: random.Random, problem: Problem) -> str:
    """The right number in the wrong form: exact match scores it 0, so a reward model must too."""
    a, b = problem
    s = a + b
    return rng.choice([f" {s}.", f" The answer is {s}.", f" {a} + {b} = {s}", f" {s} {s}", " I do not know."])


# --- the corpus: worked sums in the surface forms the prompts and replies use ---
def _equations(rng: random.Random, pool: list[Problem]) -> str:
    return " ".join(f"{a} + {b} = {a + b}." for a, b in rng.sample(pool, rng.randint(2, 6)))


def _worded(rng: random.Random, pool: list[Problem]) -> str:
    forms = ["The sum of {a} and {b} is {s}.", "{a} plus {b} is {s}.", "Adding {a} and {b} gives {s}."]
    return " ".join(rng.choice(forms).format(a=a, b=b, s=a + b) for a, b in rng.sample(pool, rng.randint(2, 4)))


def _dialogue(rng: random.Random, pool: list[Problem]) -> str:
    return "\n".join(_prompt(rng, p) + _reply(p) for p in rng.sample(pool, rng.randint(1, 3)))


def _paragraph(rng: random.Random, pool: list[Problem]) -> str:
    r = rng.random()
    if r < 0.4:
        return _equations(rng, pool)
    return _worded(rng, pool) if r < 0.7 else _dialogue(rng, pool)


def _corpus(rng: random.Random, spec: SizeSpec, train: list[Problem], test: list[Problem]) -> dict[str, list[dict]]:
    """Train paragraphs state train problems only (pretraining must not see a test sum); test ones, test problems.
    The two splits therefore share no row without a check."""
    texts, size = [], 0
    while size < spec.corpus_train_bytes:
        texts.append(_paragraph(rng, train))
        size += len(texts[-1].encode()) + 1
    held_out = [_paragraph(rng, test) for _ in range(spec.corpus_test_rows)]
    return {"train": [{"text": t} for t in texts], "test": [{"text": t} for t in held_out]}


# --- the four data sets ---
def _sft_rows(rng: random.Random, pool: list[Problem], k: int) -> list[dict]:
    return [{"prompt": _prompt(rng, p), "completion": _reply(p)} for p in _sample(rng, pool, k)]


def _preference_rows(rng: random.Random, pool: list[Problem], k: int, cfg: DemoConfig) -> list[dict]:
    """Chosen is always the right sum: the gold is exact, so unlike the demo task there is no label noise to model
    (cfg.label_noise does not apply); cfg.off_format_fraction of the rejected replies break the format instead."""
    rows = []
    for p in _sample(rng, pool, k):
        bad = _off_format(rng, p) if rng.random() < cfg.off_format_fraction else _near_miss(rng, p)
        rows.append({"prompt": _prompt(rng, p), "chosen": _reply(p), "rejected": bad})
    return rows


def _prompt_rows(rng: random.Random, pool: list[Problem], k: int) -> list[dict]:
    """The `answer` column is what an exact-match reward function compares a reply with (a keyword column)."""
    return [{"prompt": _prompt(rng, p), "answer": str(sum(p))} for p in _sample(rng, pool, k)]


def generate(cfg: DemoConfig) -> dict[str, dict[str, list[dict]]]:
    """All four arithmetic data sets with train/test splits, sized like the demo task; a pure function of `cfg`."""
    spec = demo.SIZES[cfg.size]
    train, test = _problem_pools(random.Random(f"arithmetic/{cfg.seed}/problems"))
    rngs = {n: random.Random(f"arithmetic/{cfg.seed}/{n}") for n in ("corpus", "sft", "preferences", "prompts")}
    r = rngs["sft"]
    sft = {"train": _sft_rows(r, train, spec.sft[0]), "test": _sft_rows(r, test, spec.sft[1])}
    r = rngs["preferences"]
    prefs = {
        "train": _preference_rows(r, train, spec.preferences[0], cfg),
        "test": _preference_rows(r, test, spec.preferences[1], cfg),
    }
    r = rngs["prompts"]
    prompts = {"train": _prompt_rows(r, train, spec.prompts[0]), "test": _prompt_rows(r, test, spec.prompts[1])}
    return {"corpus": _corpus(rngs["corpus"], spec, train, test), "sft": sft, "preferences": prefs, "prompts": prompts}
