"""Chat templates, conversational rows, tokenizers without a pad token and other architectures in SFT and reward.

Fast: the plain chat template against its Python twin, render_prompt, pad = eos, SFT masking of conversational rows,
where a reward model reads its score when pad == eos, the reward model from each tiny architecture.
Slow: one SFT run and one reward run through the real stages on Ray Train (1 worker, a few steps) from a tiny Llama
with no pad token and a chat template, on messages rows and conversational preference pairs with a column map.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stages.common.context import Scaling, StageContext
from stages.common.errors import StageInputError
from stages.common.hf import PLAIN_CHAT_TEMPLATE, plain_chat, plain_chat_pair, render_prompt, use_eos_as_pad
from stages.common.store import ArtifactStore
from stages.data.demo import DemoConfig, generate
from stages.data.ingest import ingest
from tests.tiny_models import TINY_ARCHS, publish_rows, save_tiny_model_dir

DEMO = DemoConfig(size="tiny", label_noise=0.0)
CHAT = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Describe the cat."},
    {"role": "assistant", "content": "The cat is calm."},
    {"role": "user", "content": "And the owl?"},
    {"role": "assistant", "content": "The owl is wise."},
]


@pytest.fixture(scope="module")
def texts():
    return [r["text"] for r in generate(DEMO)["corpus"]["train"][:1500]]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, texts):
    """A tiny random Llama whose tokenizer has no pad token (as Llama's) but the project's chat template."""
    return save_tiny_model_dir("llama", texts, tmp_path_factory.mktemp("llama"), pad_token=False)


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _as_messages(row: dict) -> list[dict]:
    """A demo prompt/completion row ("User: q\\nAssistant:", " a") as a two-turn chat."""
    question = row["prompt"].removeprefix("User: ").removesuffix("\nAssistant:")
    return [{"role": "user", "content": question}, {"role": "assistant", "content": row["completion"].strip()}]


# ------------------------------------------------------------------------------------- fast: rendering, pad


def test_plain_chat_template_renders_the_plain_format(llama_dir):
    tok = _tokenizer(llama_dir)
    assert tok.chat_template == PLAIN_CHAT_TEMPLATE  # saved with the tokenizer and loaded back
    two = CHAT[1:3]
    assert tok.apply_chat_template(two, tokenize=False) == "User: Describe the cat.\nAssistant: The cat is calm.<|endoftext|>"
    assert tok.apply_chat_template(CHAT, tokenize=False) == plain_chat(CHAT, add_generation_prompt=False) + tok.eos_token
    assert plain_chat(CHAT, add_generation_prompt=False) == (
        "System: Be kind.\nUser: Describe the cat.\nAssistant: The cat is calm.\nUser: And the owl?\n"
        "Assistant: The owl is wise."
    )
    for prompt in (CHAT[1:2], CHAT[:4]):
        rendered = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        assert rendered == plain_chat(prompt, add_generation_prompt=True) and rendered.endswith("\nAssistant:")
    assert plain_chat_pair(CHAT[1:2], CHAT[2:3]) == ("User: Describe the cat.\nAssistant:", " The cat is calm.")
    with pytest.raises(Exception, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_render_prompt_uses_the_template_or_the_plain_format(llama_dir):
    tok = _tokenizer(llama_dir)
    assert render_prompt(tok, "User: Hi.\nAssistant:") == "User: Hi.\nAssistant:"  # a string is already the prompt
    assert render_prompt(tok, CHAT[:2]) == "System: Be kind.\nUser: Describe the cat.\nAssistant:"
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}" \
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    assert render_prompt(tok, CHAT[1:2]) == "<user>Describe the cat.<assistant>"
    tok.chat_template = None
    assert render_prompt(tok, CHAT[1:2]) == "User: Describe the cat.\nAssistant:"


def test_eos_becomes_pad_only_when_there_is_no_pad(llama_dir, texts):
    from stages.common.hf import train_bpe_tokenizer

    tok = _tokenizer(llama_dir)
    assert tok.pad_token is None
    note = use_eos_as_pad(tok)
    assert tok.pad_token == tok.eos_token and tok.pad_token_id == tok.eos_token_id and tok.padding_side == "right"
    assert "no pad token" in note and repr(tok.eos_token) in note
    assert use_eos_as_pad(tok) is None  # already has one now
    own = train_bpe_tokenizer(texts[:100], 300)
    assert use_eos_as_pad(own) is None and own.pad_token == "<|pad|>"


# ---------------------------------------------------------------------------------- fast: SFT rows and masking


def test_sft_rows_go_to_trl_as_chats_with_a_template_and_as_plain_text_without():
    from stages.sft.inputs import to_prompt_completion

    rows = [{"messages": CHAT}]
    assert to_prompt_completion(rows, "w", chat_template=True) == [{"prompt": CHAT[:4], "completion": CHAT[4:]}]
    plain = to_prompt_completion(rows, "w", chat_template=False)[0]
    assert plain["prompt"].endswith("User: And the owl?\nAssistant:") and plain["completion"] == " The owl is wise."
    conversational = [{"prompt": CHAT[1:2], "completion": CHAT[2:3]}]
    assert to_prompt_completion(conversational, "w", chat_template=True) == conversational
    assert to_prompt_completion(conversational, "w") == [
        {"prompt": "User: Describe the cat.\nAssistant:", "completion": " The cat is calm."}
    ]
    with pytest.raises(StageInputError, match=r"w: row 0: column 'completion': expected assistant turns only"):
        to_prompt_completion([{"prompt": CHAT[1:2], "completion": CHAT[1:2]}], "w", chat_template=True)
    with pytest.raises(StageInputError, match="prompt ends with an assistant turn"):
        to_prompt_completion([{"prompt": CHAT[1:3], "completion": CHAT[2:3]}], "w", chat_template=True)


def test_conversational_sft_masks_the_prompt_and_learns_eos_when_pad_is_eos(tmp_path, llama_dir):
    """TRL's native conversational prompt/completion: the loss covers the reply and its eos, even though the
    tokenizer pads with eos (a collator that masked pad ids would never teach the model to stop)."""
    import stages.sft as sft
    from stages.sft.train import build_trainer

    store = ArtifactStore(tmp_path / "store")
    base = store.publish(llama_dir, name="llama", kind="causal-lm", stage="tests")
    rows = [{"messages": CHAT[1:3]}, {"messages": CHAT}]
    data = publish_rows(store, "chats", rows, rows, fmt="sft")
    cfg = sft.stage.prepare(sft.Config(max_steps=1, batch_size=2), base, data, scaling=Scaling(num_workers=1))
    assert cfg.tokenizer.pad_is_eos and cfg.tokenizer.chat_template
    trainer = build_trainer(cfg, str(tmp_path / "out"))
    tok = trainer.processing_class
    assert tok.pad_token_id == tok.eos_token_id == trainer.model.config.pad_token_id
    assert trainer.model.config._attn_implementation == "sdpa" and trainer.model.dtype == torch.float32
    examples = [trainer.train_dataset[i] for i in range(2)]
    for example in examples:
        ids, labels = example["input_ids"], example["labels"]
        chat = next(r["messages"] for r in rows if tok.apply_chat_template(r["messages"])["input_ids"] == ids)
        n_prompt = len(tok.apply_chat_template(chat[:-1], add_generation_prompt=True)["input_ids"])
        assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids[n_prompt:-1]) == " " + chat[-1]["content"]
    batch = trainer.data_collator(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    short = lengths.index(min(lengths))
    assert batch["labels"][short, min(lengths) - 1] == tok.eos_token_id  # the real eos is learnt
    assert (batch["labels"][short, min(lengths) :] == -100).all()  # the padding eos tokens are not
    assert batch["attention_mask"][short].sum() == min(lengths)


# ------------------------------------------------------------------------------ fast: reward-model mechanics


def test_with_pad_eos_the_score_is_read_at_the_last_reply_token(llama_dir):
    """transformers reads a classifier's score at the rightmost token that is not pad: with pad == eos that is the
    reply's last text token, whatever the padding, and an eos inside the prompt does not move it."""
    from stages.reward.evaluate import score_sequences
    from stages.reward.train import load_reward_model

    model, tok = load_reward_model(str(llama_dir))
    assert model.config.pad_token_id == tok.eos_token_id and model.config.num_labels == 1
    eos = tok.eos_token_id
    reply = tok("User: Describe the cat.\nAssistant: The cat is calm.")["input_ids"]
    other = tok("User: Hi" + tok.eos_token + " Describe the owl.\nAssistant: The owl is wise and old.")["input_ids"]
    assert eos in other[:-1]
    alone = score_sequences(model, eos, [reply], batch_size=1)[0]
    with_eos = score_sequences(model, eos, [reply + [eos]], batch_size=1)[0]
    batched = score_sequences(model, eos, [reply + [eos], other + [eos]], batch_size=2)
    assert with_eos == pytest.approx(alone, abs=1e-5)  # read before the trailing eos, i.e. at the reply's end
    assert batched[0] == pytest.approx(alone, abs=1e-5)
    assert batched[1] == pytest.approx(score_sequences(model, eos, [other], batch_size=1)[0], abs=1e-5)


def test_score_position_by_hand_and_as_transformers_reads_it(llama_dir):
    from stages.common.hf import score_position
    from stages.reward.train import load_reward_model

    ids = torch.tensor([[5, 6, 1, 1], [5, 1, 7, 1], [5, 6, 7, 8]])
    assert score_position(ids, 1).tolist() == [1, 2, 3]
    assert score_position(ids, None).tolist() == [3, 3, 3]
    model, tok = load_reward_model(str(llama_dir))  # pad == eos
    eos = tok.eos_token_id
    rows = [tok("User: Hi" + tok.eos_token + " there.")["input_ids"] + [eos], tok("User: Describe the owl.")["input_ids"]]
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [eos] * (width - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        pooled = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
        per_token = model.score(model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state)
    at = score_position(input_ids, model.config.pad_token_id)
    assert at.tolist() == [len(rows[0]) - 2, len(rows[1]) - 1]  # before the trailing eos; the prompt's eos is kept
    assert torch.allclose(per_token[torch.arange(2), at, 0], pooled)


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_reward_model_from_each_architecture_loads_back_in_plain_transformers(arch, texts, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from stages.reward.train import load_reward_model

    causal = save_tiny_model_dir(arch, texts, tmp_path / "causal", pad_token=arch != "llama")
    model, tok = load_reward_model(str(causal))
    assert model.config._attn_implementation == "sdpa" and model.score.out_features == 1
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert type(again).__name__.endswith("ForSequenceClassification")
    assert again.config.pad_token_id == tok.pad_token_id is not None
    assert torch.equal(again.score.weight, model.score.weight)
    ids = torch.tensor([tok("User: Describe the cat.")["input_ids"]])
    assert again(input_ids=ids).logits.shape == (1, 1)


def test_conversational_pairs_are_checked_and_rendered():
    from stages.reward.inputs import check_pairs

    pair = {"prompt": CHAT[1:2], "chosen": CHAT[2:3], "rejected": [{"role": "assistant", "content": "No."}]}
    assert check_pairs([pair], "w", chat_template=True) == [pair]
    assert check_pairs([pair], "w") == [
        {"prompt": "User: Describe the cat.\nAssistant:", "chosen": " The cat is calm.", "rejected": " No."}
    ]
    with pytest.raises(StageInputError, match="w: row 0: chosen and rejected are the same reply"):
        check_pairs([{**pair, "rejected": pair["chosen"]}], "w", chat_template=True)
    with pytest.raises(StageInputError, match="w: row 0: column 'chosen': expected assistant turns only"):
        check_pairs([{**pair, "chosen": CHAT[1:2]}], "w", chat_template=True)


# ------------------------------------------------------------------------- slow: the real stages on Ray Train


@pytest.fixture(scope="module")
def chat_runs(tmp_path_factory, llama_dir, local_ray):
    """SFT of the no-pad Llama on messages rows, then a reward model from that SFT model on conversational pairs
    stored as prompt/better/worse (read through a column map): both through the real stages on one Ray worker."""
    import stages.reward as reward
    import stages.sft as sft

    root = tmp_path_factory.mktemp("chat-runs")
    store = ArtifactStore(root / "store")
    base = store.publish(llama_dir, name="base-model", kind="causal-lm", stage="tests")
    demo_sets = generate(DEMO)
    sft_file = root / "chats.jsonl"
    sft_file.write_text("".join(json.dumps({"messages": _as_messages(r)}) + "\n" for r in demo_sets["sft"]["train"][:64]))
    pairs = []
    for r in demo_sets["preferences"]["train"][:64]:
        prompt = _as_messages({"prompt": r["prompt"], "completion": ""})[:1]
        pairs.append({
            "prompt": prompt,
            "better": [{"role": "assistant", "content": r["chosen"].strip()}],
            "worse": [{"role": "assistant", "content": r["rejected"].strip()}],
        })
    pref_file = root / "pairs.jsonl"
    pref_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    sft_data = ingest(str(sft_file), "sft", store, demo_cfg=DEMO)
    prefs = ingest(str(pref_file), "preferences", store, demo_cfg=DEMO, columns={"chosen": "better", "rejected": "worse"})

    scaling = Scaling(num_workers=1)
    lines: list[str] = []
    ctx = StageContext(work_dir=str(root / "work-sft"), cache_key="chat-sft", scaling=scaling, log=lines.append)
    sft_config = sft.Config(max_steps=4, batch_size=8, save_steps=4, logging_steps=2, learning_rate=3e-3)
    sft_model = sft.run(sft_config, base_model=base, data=sft_data, store=store, ctx=ctx)["sft-model"]
    ctx = StageContext(work_dir=str(root / "work-reward"), cache_key="chat-reward", scaling=scaling, log=lines.append)
    reward_config = reward.Config(max_steps=4, batch_size=8, save_steps=4, logging_steps=2, score_batch_size=32)
    reward_model = reward.run(reward_config, sft_model=sft_model, preferences=prefs, store=store, ctx=ctx)
    return {"base": base, "prefs": prefs, "sft": sft_model, "reward": reward_model["reward-model"], "lines": lines}


@pytest.mark.slow
def test_sft_from_a_no_pad_llama_on_chats_publishes_a_plain_hf_model(chat_runs):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = chat_runs["sft"]
    assert any("no pad token: pad = eos" in line for line in chat_runs["lines"])
    assert model.manifest["extra"]["tokenizer"]["pad_is_eos"] is True
    lm = AutoModelForCausalLM.from_pretrained(model.path)
    tok = AutoTokenizer.from_pretrained(model.path)
    assert type(lm).__name__ == "LlamaForCausalLM"
    assert tok.pad_token == tok.eos_token and lm.config.pad_token_id == tok.eos_token_id
    assert tok.chat_template == PLAIN_CHAT_TEMPLATE  # the published model carries the format it was trained on
    before = load_file(str(Path(chat_runs["base"].path) / "model.safetensors"))
    after = load_file(str(Path(model.path) / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    prompt = tok(render_prompt(tok, [{"role": "user", "content": "Describe the cat."}]), return_tensors="pt")
    out = lm.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


@pytest.mark.slow
def test_reward_from_the_sft_llama_on_conversational_pairs_has_pad_in_its_config(chat_runs):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = chat_runs["reward"]
    assert chat_runs["prefs"].manifest["config"]["columns"] == {"chosen": "better", "rejected": "worse"}
    first = json.loads((Path(chat_runs["prefs"].path) / "train.jsonl").read_text().splitlines()[0])
    assert sorted(first) == ["chosen", "prompt", "rejected"] and isinstance(first["chosen"], list)
    assert model.kind == "reward-model" and {"eval_accuracy", "eval_margin", "eval_loss"} <= set(model.metrics)
    rm = AutoModelForSequenceClassification.from_pretrained(model.path)
    tok = AutoTokenizer.from_pretrained(model.path)
    assert type(rm).__name__ == "LlamaForSequenceClassification" and rm.config.num_labels == 1
    config = json.loads((Path(model.path) / "config.json").read_text())
    assert config["pad_token_id"] == tok.pad_token_id == tok.eos_token_id
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Describe the cat."}, {"role": "assistant", "content": "The cat is calm."}],
        return_tensors="pt",
        return_dict=True,
    )
    assert rm(**ids).logits.shape == (1, 1)
