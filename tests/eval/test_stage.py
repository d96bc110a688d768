"""The eval stage: its math by hand (KL, win rates with ties, the summary table), one real run on tiny random models
with Ray, input refusals before Ray starts, and `rlhf eval` on a wrong-kind ref."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from stages import eval as eval_stage
from stages.common.context import Scaling, StageContext
from stages.common.errors import StageInputError
from stages.common.sequences import reply_mask_from_eos
from stages.common.store import ArtifactStore
from stages.eval import metrics, report
from stages.eval.generation import left_pad
from tests.tiny_models import publish_rows, publish_tiny_base_model


# ---------------------------------------------------------------------------------------------- pure math
def test_sequence_kl_sums_reply_tokens_only():
    model = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -1.0, 9.9]])
    sft = torch.tensor([[-1.5, -1.0, -4.0], [-0.7, -2.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # row 0: (-1 + 1.5) + (-2 + 1) = -0.5; row 1: (-0.2 + 0.7) + (-1 + 2) = 1.5; the masked column is ignored
    assert metrics.sequence_kl(model, sft, mask).tolist() == pytest.approx([-0.5, 1.5])
    assert metrics.mean_sequence_kl(model, sft, mask) == pytest.approx(0.5)


def test_win_rate_counts_ties_half():
    # wins: 1, tie 0.5, loss 0, tie 0.5 -> 2 / 4
    assert metrics.win_rate([1.0, 0.0, 0.5, -1.0], [0.0, 0.0, 1.0, -1.0]) == 0.5
    assert metrics.win_rate([0.2, 0.2, 0.9], [0.1, 0.2, 0.3]) == pytest.approx(2.5 / 3)
    with pytest.raises(ValueError, match="equally long"):
        metrics.win_rate([1.0], [1.0, 2.0])


def test_win_rate_matrix_by_hand():
    scores = {"sft": [0.0, 0.0, 1.0, -1.0], "ppo": [1.0, 0.0, 1.0, 0.5], "dpo": [-1.0, 0.5, 1.0, -1.0]}
    m = metrics.win_rate_matrix(scores)
    # ppo vs sft: win, tie, tie, win = 3 / 4; dpo vs sft: loss, win, tie, tie = 2 / 4; ppo vs dpo: win, loss, tie, win
    assert m["ppo"]["sft"] == 0.75 and m["sft"]["ppo"] == 0.25
    assert m["dpo"]["sft"] == 0.5
    assert m["ppo"]["dpo"] == 2.5 / 4 and m["dpo"]["ppo"] == 1.5 / 4
    assert all(m[a][a] == 0.5 for a in scores)


def test_model_summary_and_table_by_hand():
    rows = {"rm_score": [1.0, -0.5], "kl": [0.25, 0.75], "length": [3, 6], "ended": [True, False]}
    s = report.model_summary(rows, gold=[1.0, -1.0 / 3], formats=[True, False])
    assert s == {"gold_score": pytest.approx(1 / 3), "format_rate": 0.5, "rm_score": 0.25, "kl": 0.5,
                 "reply_length": 4.5, "eos_rate": 0.5, "replies": 2}  # fmt: skip
    no_gold = report.model_summary(rows, gold=None, formats=None)
    table = report.summary_table({"sft": {**s, "win_rate_vs_sft": 0.5}, "ppo": {**no_gold, "win_rate_vs_sft": 0.875}})
    assert table.splitlines() == [
        "| model | gold | win rate vs SFT | RM score | KL to SFT (nats) | length (tokens) |",
        "|---|---|---|---|---|---|",
        "| sft | +0.333 | 0.500 | +0.250 | 0.500 | 4.5 |",
        "| ppo | n/a | 0.875 | +0.250 | 0.500 | 4.5 |",
    ]
    assert report.headline({"ppo": {**no_gold, "win_rate_vs_sft": 0.875}}) == "ppo rm +0.250 win 0.875 kl 0.500"
    assert report.flat_metrics({"ppo": {"gold_score": None, "win_rate_vs_sft": 0.875}}) == {
        "ppo.gold_score": None, "ppo.win_rate_vs_sft": 0.875,
    }  # fmt: skip


def test_reply_mask_stops_after_first_eos_and_generated_columns():
    replies = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 2, 2, 2]])
    mask = reply_mask_from_eos(replies, torch.tensor([2]), generated=3)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]


def test_policy_names_are_refused_with_a_trailing_newline():
    from stages.eval.inputs import check_policy_names

    check_policy_names({"ppo": None, "policy-dpo_2": None})
    for bad in ("ppo\n", "policy.v1", "sft", ""):  # `$` matched before a final newline and let "ppo\n" through
        with pytest.raises(StageInputError, match="model name"):
            check_policy_names({bad: None})


def test_left_pad():
    ids, mask = left_pad([[4, 5, 6], [7]], pad_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


# ---------------------------------------------------------------------------------------------- real run
def _publish_reward_model(store, model_dir: str, *, num_labels: int = 1):
    """The tiny GPT-2 read as a sequence classifier (random score head): mechanics only."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(d)
        return store.publish(d, name="reward-model", kind="reward-model", stage="tests")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from stages.data import demo

    root = tmp_path_factory.mktemp("eval-store")
    store = ArtifactStore(root)
    data = demo.generate(demo.DemoConfig(size="tiny"))
    texts = [r["text"] for r in data["corpus"]["train"][:1500]]
    sft = publish_tiny_base_model(store, texts, name="sft-model")
    other = publish_tiny_base_model(store, texts, name="policy", seed=1)  # same tokenizer, other random weights
    rm = _publish_reward_model(store, sft.path)
    prompts = publish_rows(store, "prompt-data", data["prompts"]["train"], data["prompts"]["test"], fmt="prompts",
                           task="demo")  # fmt: skip
    return {"root": root, "store": store, "sft": sft, "other": other, "rm": rm, "prompts": prompts, "texts": texts}


def _ctx(tmp_path) -> StageContext:
    return StageContext(work_dir=str(tmp_path), cache_key="test", seed=0, scaling=Scaling(num_workers=1))


TINY = dict(eval_prompts=8, max_new_tokens=8, batch_size=3, samples_shown=2)


def test_eval_run_on_tiny_models(setup, tmp_path, local_ray):
    store = setup["store"]
    # "same" is the SFT model itself: same prompts and the same sampling seed must give it the very same replies
    policies = {"ppo": setup["other"], "same": setup["sft"]}
    out = eval_stage.run(eval_stage.Config(**TINY, samples_per_prompt=2), store=store, ctx=_ctx(tmp_path),
                         sft_model=setup["sft"], reward_model=setup["rm"], prompts=setup["prompts"],
                         policies=policies)  # fmt: skip
    art = out["eval-report"]
    assert art.kind == "eval-report"
    files = {p.name: p for p in Path(art.path).iterdir()}
    assert set(files) == {"report.json", "report.md", "win_rates.png"}
    assert files["win_rates.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(files["report.json"].read_text())
    assert list(doc["summaries"]) == ["sft", "ppo", "same"]
    assert doc["prompts"] == 8 and all(s["replies"] == 16 for s in doc["summaries"].values())
    assert doc["win_rates"]["by"] == "gold"
    assert set(doc["win_rates"]["matrix"]) == {"sft", "ppo", "same"}
    assert [r["reply"] for r in doc["replies"]["same"]] == [r["reply"] for r in doc["replies"]["sft"]]
    assert doc["summaries"]["same"]["win_rate_vs_sft"] == 0.5
    assert doc["summaries"]["sft"]["kl"] == 0.0 and abs(doc["summaries"]["same"]["kl"]) < 1e-5
    for s in doc["summaries"].values():
        assert -1.0 <= s["gold_score"] <= 1.0 and 0.0 <= s["format_rate"] <= 1.0
        assert 1.0 <= s["reply_length"] <= 8.0
    assert len(doc["samples"]) == 2 and set(doc["samples"][0]["replies"]) == {"sft", "ppo", "same"}
    md = files["report.md"].read_text()
    assert "| ppo |" in md and "| same |" in md and "## Win rates" in md
    lineage = store.lineage(art.ref)["inputs"]
    assert set(lineage) == {"sft_model", "reward_model", "prompts", "policy.ppo", "policy.same"}
    assert lineage["policy.ppo"]["ref"] == setup["other"].ref
    assert art.metrics["ppo.win_rate_vs_sft"] == doc["summaries"]["ppo"]["win_rate_vs_sft"]
    assert art.metrics["same.kl"] == doc["summaries"]["same"]["kl"]


def test_chat_prompts_off_the_demo_task_are_judged_by_the_reward_model(setup, tmp_path, local_ray):
    store = setup["store"]
    chats = [[{"role": "user", "content": f"Say something about the number {i}."}] for i in range(3)]
    prompts = publish_rows(store, "chat-prompts", [{"prompt": c} for c in chats], [{"prompt": c} for c in chats],
                           fmt="prompts")  # fmt: skip
    config = eval_stage.Config(eval_prompts=3, max_new_tokens=4, samples_shown=1)
    art = eval_stage.run(config, store=store, ctx=_ctx(tmp_path), sft_model=setup["sft"], reward_model=setup["rm"],
                         prompts=prompts, policies={"ppo": setup["other"]})["eval-report"]  # fmt: skip
    doc = json.loads((Path(art.path) / "report.json").read_text())
    assert doc["win_rates"]["by"] == "reward_model"
    # rendered through the tokenizer's chat template (the project's plain format)
    assert doc["samples"][0]["prompt"] == "User: Say something about the number 0.\nAssistant:"
    assert doc["summaries"]["ppo"]["gold_score"] is None and doc["summaries"]["ppo"]["format_rate"] is None
    rm = {m: [r["rm_score"] for r in rows] for m, rows in doc["replies"].items()}
    assert doc["win_rates"]["matrix"]["ppo"]["sft"] == metrics.win_rate(rm["ppo"], rm["sft"])
    assert art.metrics["ppo.win_rate_vs_sft"] == metrics.win_rate(rm["ppo"], rm["sft"])
    table = (Path(art.path) / "report.md").read_text()
    assert "| ppo | 0." in table and "| gold |" not in table  # no gold off a built-in task: no gold column


def _padded_batch(setup, prompts: list[str], replies: list[str]):
    """Prompt + reply + eos token batches in the evaluation's layout (left-padded prompts, right-padded replies)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(setup["sft"].path)
    prompt_ids = [tok(p)["input_ids"] for p in prompts]
    reply_ids = [tok(r)["input_ids"] + [tok.eos_token_id] for r in replies]
    ids, mask = left_pad(prompt_ids, tok.pad_token_id, torch.device("cpu"))
    T = max(len(r) for r in reply_ids)
    replies_t = torch.full((len(replies), T), tok.pad_token_id)
    reply_mask = torch.zeros((len(replies), T), dtype=torch.long)
    for i, r in enumerate(reply_ids):
        replies_t[i, : len(r)], reply_mask[i, : len(r)] = torch.tensor(r), 1
    batch = {"tokens": torch.cat([ids, replies_t], 1), "attention_mask": torch.cat([mask, reply_mask], 1),
             "reply_mask": reply_mask}  # fmt: skip
    return tok, batch, [p + r for p, r in zip(prompt_ids, reply_ids, strict=True)]


def test_padded_scores_and_logprobs_match_unpadded_forward_passes(setup):
    """Left padding must not move what the models read: the reward stage's classifier on each sequence alone, and
    each reply's log-probs from one unpadded forward pass."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from stages.eval.generation import reply_logprobs, reward_scores

    prompts = ["User: Describe the cat.\nAssistant:", "User: Hi. Tell me about the old red fox please.\nAssistant:"]
    tok, batch, sequences = _padded_batch(setup, prompts, [" The cat is calm.", " The fox is sad and young."])
    rm = AutoModelForSequenceClassification.from_pretrained(setup["rm"].path).eval()
    with torch.no_grad():
        alone = [float(rm(input_ids=torch.tensor([seq])).logits[0, 0]) for seq in sequences]
    assert reward_scores(rm, batch, tok.pad_token_id).tolist() == pytest.approx(alone, abs=1e-5)

    lm = AutoModelForCausalLM.from_pretrained(setup["sft"].path).eval()
    padded = reply_logprobs(lm, batch, temperature=0.7)
    for i, seq in enumerate(sequences):
        n = int(batch["reply_mask"][i].sum())
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([seq])).logits[0, -n - 1 : -1].float() / 0.7
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(seq[-n:]).unsqueeze(-1)).squeeze(-1)
        assert padded[i, :n].tolist() == pytest.approx(expected.tolist(), abs=1e-4)
        assert padded[i, n:].abs().sum() == 0


# ---------------------------------------------------------------------------------------------- refusals
def _refused(setup, tmp_path, match: str, **changes):
    import ray

    was_running = ray.is_initialized()
    kwargs = {"sft_model": setup["sft"], "reward_model": setup["rm"], "prompts": setup["prompts"],
              "policies": {"ppo": setup["other"]}, **changes}  # fmt: skip
    with pytest.raises(StageInputError, match=match) as info:
        eval_stage.run(eval_stage.Config(**TINY), store=setup["store"], ctx=_ctx(tmp_path), **kwargs)
    assert "\n" not in str(info.value)
    assert ray.is_initialized() == was_running  # refused before Ray started


def test_refuses_wrong_kind_bad_name_and_other_tokenizer(setup, tmp_path):
    _refused(setup, tmp_path, r"policies\['ppo'\].*is a 'reward-model', expected a 'causal-lm'",
             policies={"ppo": setup["rm"]})  # fmt: skip
    _refused(setup, tmp_path, "model name 'policy.v1'", policies={"policy.v1": setup["other"]})
    _refused(setup, tmp_path, "model name 'sft'", policies={"sft": setup["other"]})
    other_tok = publish_tiny_base_model(setup["store"], setup["texts"][:300], name="foreign", vocab_size=300)
    _refused(setup, tmp_path, "its tokenizer differs from sft_model", policies={"foreign": other_tok})


def test_cli_eval_wrong_kind_is_one_line_exit_2(setup, capsys):
    from flows.cli import main

    code = main(["eval", "policy@latest", "prompt-data@latest", "--store", str(setup["root"])])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.splitlines() == [err] and "prompt-data@latest" in err and "expected 'causal-lm'" in err


def test_cli_eval_publishes_a_report(setup, capsys, local_ray):
    from flows.cli import main

    code = main(["eval", "policy@latest", "--store", str(setup["root"])])  # --sft, --reward-model, --prompts: defaults
    out = capsys.readouterr().out
    assert code == 0
    assert "| sft |" in out and "| policy |" in out
    published = [line for line in out.splitlines() if line.startswith("published eval-report@v")]
    assert len(published) == 1
    ref = published[0].split()[1]
    lineage = setup["store"].lineage(ref)["inputs"]
    assert lineage["policy.policy"]["ref"] == setup["other"].ref
    assert lineage["sft_model"]["ref"] == setup["sft"].ref and lineage["prompts"]["ref"] == setup["prompts"].ref
