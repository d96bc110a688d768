"""PPO's model plumbing on every architecture family (tiny random Llama, Qwen2, GPT-NeoX, GPT-2; no Ray).

Left padding must not move a row's logits or values; the value head must be the model's own score head; a
tokenizer without a pad token gets eos as pad, and a reply still ends at its first eos.
"""

from __future__ import annotations

import json

import pytest
import torch

from stages.common.forwards import (
    TokenLogprobs,
    TokenValueModel,
    TokenValues,
    per_reply_token,
    reward_read_positions,
    shared_prompts,
)
from stages.common.sequences import position_ids, reply_mask_from_eos
from stages.common.tokens import special_token_ids
from stages.rl.actors import RewardActor
from stages.rl.devices import model_dtype
from tests.tiny_models import TINY_ARCHS, build_tiny_model, build_tiny_tokenizer

TEXTS = [f"User: Describe the {a} {b}.\nAssistant: The {a} {b} is here." for a in ("red", "big", "old", "shy")
         for b in ("cat", "dog", "fox", "owl", "hen")] * 4  # fmt: skip


def response_logits(lm, ids: torch.Tensor, mask: torch.Tensor, P: int) -> torch.Tensor:
    """The logits predicting each reply token [B, T, V]: the last T positions of a forward without the last column."""
    ids, mask = ids[:, :-1], mask[:, :-1]
    return TokenLogprobs(lm, 1.0).forward(ids, mask, position_ids(mask), None, ids.shape[1] + 1 - P)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(TEXTS, vocab_size=300)


def left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_left_padding_does_not_move_logits_or_values(arch, tokenizer):
    lm = build_tiny_model(arch, tokenizer).eval()
    rm = build_tiny_model(arch, tokenizer, head="reward-model").eval()
    values = TokenValueModel(rm)
    prompts = [tokenizer.encode(t) for t in ("User: Describe the cat.\nAssistant:", "User: Hi\nAssistant:")]
    assert len(prompts[0]) > len(prompts[1])  # so row 1 is left-padded
    response = tokenizer.encode(" The cat")
    ids, mask = left_padded([p + response for p in prompts], tokenizer.pad_token_id)
    P = ids.shape[1] - len(response)
    with torch.no_grad():
        batch_logits = response_logits(lm, ids, mask, P)
        batch_values = values(ids, mask)
        # only the response positions are projected onto the vocabulary; they are the full pass's logits there
        full = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
        torch.testing.assert_close(batch_logits, full[:, P - 1 : -1])
        for row, p in enumerate(prompts):
            alone = torch.tensor([p + response])
            ones = torch.ones_like(alone)
            torch.testing.assert_close(batch_logits[row], response_logits(lm, alone, ones, len(p))[0])
            torch.testing.assert_close(batch_values[row, -len(alone[0]) :], values(alone, ones)[0])
            # the value model reads the model's own score head: at the last token it is HF's sequence score
            torch.testing.assert_close(values(alone, ones)[0, -1], rm(input_ids=alone).logits[0, 0])
    assert batch_logits.dtype == torch.float32


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bf16_weights_give_fp32_log_prob_inputs(arch, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    build_tiny_model(arch, tokenizer).save_pretrained(tmp_path)
    lm = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=model_dtype("bf16"))
    assert next(lm.parameters()).dtype == torch.bfloat16
    ids = torch.tensor([tokenizer.encode("User: Hi\nAssistant: The cat")])
    with torch.no_grad():
        assert response_logits(lm, ids, torch.ones_like(ids), 4).dtype == torch.float32


def test_reply_mask_ends_at_the_first_eos_even_when_pad_is_eos():
    eos = torch.tensor([2])
    # pad == eos == 2: HF generate writes 2 after a finished reply; row 2 never ended; only 5 tokens were generated
    responses = torch.tensor([[7, 8, 2, 2, 2, 2], [2, 2, 2, 2, 2, 2], [7, 7, 7, 7, 7, 2]])
    expected = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    assert torch.equal(reply_mask_from_eos(responses, eos, generated=5), expected)
    # several stop ids: the first of any of them ends the reply
    assert torch.equal(reply_mask_from_eos(torch.tensor([[5, 9, 2, 4]]), torch.tensor([2, 9]), 4),
                       torch.tensor([[1, 1, 0, 0]]))  # fmt: skip


def test_the_rollout_layout_of_generates_output_by_hand():
    from stages.common.sequences import rollout_layout

    # pad == eos == 2; prompts left-padded to P = 2; generate stopped after 3 of T = 4 columns
    prompt_ids, prompt_mask = torch.tensor([[2, 5], [6, 7]]), torch.tensor([[0, 1], [1, 1]])
    out = torch.tensor([[2, 5, 8, 2, 2], [6, 7, 9, 9, 9]])  # row 0 ended at its eos, row 1 was cut off
    layout = rollout_layout(prompt_ids, prompt_mask, out, max_new_tokens=4, pad_id=2, eos_ids=[2])
    assert layout["tokens"].tolist() == [[2, 5, 8, 2, 2, 2], [6, 7, 9, 9, 9, 2]]
    assert layout["reply_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]
    assert layout["attention_mask"].tolist() == [[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]]
    assert layout["ended"].tolist() == [True, False]
    # a second stop id ends a reply too; what follows it becomes pad
    other = rollout_layout(prompt_ids, prompt_mask, out, max_new_tokens=4, pad_id=0, eos_ids=[2, 9])
    assert other["tokens"][:, 2:].tolist() == [[8, 2, 0, 0], [9, 0, 0, 0]] and other["ended"].tolist() == [True, True]


def test_a_tokenizer_without_pad_gets_eos_and_the_models_stop_ids(tokenizer, tmp_path):
    tok = build_tiny_tokenizer(TEXTS, vocab_size=300)
    tok.pad_token = None
    ids = special_token_ids(tok, str(tmp_path))  # no generation_config.json there
    assert tok.pad_token == tok.eos_token
    assert ids == {"pad_token_id": tok.eos_token_id, "eos_token_ids": [tok.eos_token_id]}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, tok.eos_token_id]}))
    assert special_token_ids(tokenizer, str(tmp_path)) == {
        "pad_token_id": tokenizer.pad_token_id, "eos_token_ids": [tokenizer.eos_token_id, 7],
    }  # fmt: skip


@pytest.mark.parametrize("pad_is_eos", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reward_is_read_where_the_classifier_reads_it(arch, pad_is_eos):
    tok = build_tiny_tokenizer(TEXTS, vocab_size=300)
    if pad_is_eos:
        tok.pad_token = tok.eos_token  # as the reward stage does for a tokenizer without a pad token
    pad, eos = tok.pad_token_id, tok.eos_token_id
    rm = build_tiny_model(arch, tok, head="reward-model").eval()
    assert rm.config.pad_token_id == pad
    prompt = tok.encode("User: Hi\nAssistant:")
    # rollout layout: prompt (left-padded) + reply up to its first eos + padding to T = 4
    replies = [[11, 12, eos, pad], [11, 12, 13, 14], [eos, pad, pad, pad]]  # ended, cut off, empty
    ids = torch.tensor([[pad] + prompt + r for r in replies])
    mask = torch.tensor([[0] + [1] * len(prompt) + [1, 1, 1, 0], [0] + [1] * len(prompt) + [1, 1, 1, 1],
                         [0] + [1] * len(prompt) + [1, 0, 0, 0]])  # fmt: skip
    positions = reward_read_positions(ids, mask, pad)
    end = 1 + len(prompt)  # index of the first reply token
    # pad != eos: the eos (or the last token of a cut reply); pad == eos: the token before the trailing eos
    expected = [end + 1, end + 3, end - 1] if pad_is_eos else [end + 2, end + 3, end]
    assert positions.tolist() == expected
    with torch.no_grad():
        ours = TokenValueModel(rm)(ids, mask)[torch.arange(3), positions]
        theirs = rm(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, 0]
    torch.testing.assert_close(ours, theirs)


def test_a_missing_pad_token_matches_a_reward_model_padded_with_eos():
    from stages.common.errors import StageInputError
    from stages.common.tokens import check_same_tokenizer

    def _check_same_tokenizer(policy, rm, where):
        check_same_tokenizer(policy, rm, where, reference_name="the SFT policy's", hint="train the reward model ...")

    policy, rm = build_tiny_tokenizer(TEXTS, vocab_size=300), build_tiny_tokenizer(TEXTS, vocab_size=300)
    policy.pad_token = None
    rm.pad_token = rm.eos_token  # the reward stage filled in eos
    _check_same_tokenizer(policy, rm, "reward_model rm@v1")
    rm.pad_token = "<|pad|>"
    with pytest.raises(StageInputError, match=r"reward_model rm@v1: tokenizer pad_token is '<\|pad\|>', expected"):
        _check_same_tokenizer(policy, rm, "reward_model rm@v1")


def _sample(lm, tokenizer, ids, mask, seed, T=8, temperature=0.7):
    from stages.common.sampling import decoding_config
    from stages.common.sequences import seeded

    config = decoding_config(temperature=temperature, top_p=1.0, max_new_tokens=T, eos_ids=[tokenizer.eos_token_id],
                             pad_id=tokenizer.pad_token_id)  # fmt: skip
    with torch.no_grad(), seeded(seed):
        return lm.generate(input_ids=ids, attention_mask=mask, generation_config=config)


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_log_probs_read_from_sampling_match_a_full_sequence_forward(arch, tokenizer):
    from stages.common.sampling import SampledLogprobs

    lm = build_tiny_model(arch, tokenizer).eval()
    prompts = [tokenizer.encode(t) for t in ("User: Describe the red cat.\nAssistant:", "User: Hi\nAssistant:")]
    ids, mask = left_padded(prompts, tokenizer.pad_token_id)
    P, temperature = ids.shape[1], 0.7
    with SampledLogprobs(lm, temperature) as recorder:
        out = _sample(lm, tokenizer, ids, mask, seed=3, temperature=temperature)
    sampled = recorder.result(out)
    assert sampled.shape == (2, out.shape[1] - P) and sampled.dtype == torch.float32
    full_mask = torch.cat([mask, torch.ones_like(out[:, P:])], dim=1)
    with torch.no_grad():
        logits = response_logits(lm, out, full_mask, P) / temperature
    expected = torch.log_softmax(logits, -1).gather(-1, out[:, P:, None]).squeeze(-1)
    # each column is the log-prob of the token sampled there (an off-by-one would compare unrelated numbers)
    torch.testing.assert_close(sampled, expected, atol=1e-4, rtol=1e-4)
    assert not lm._forward_hooks  # the recorder took its hook off again


def test_sampling_ignores_the_checkpoints_generation_defaults(tokenizer):
    lm = build_tiny_model("llama", tokenizer).eval()
    ids, mask = left_padded([tokenizer.encode("User: Describe the red cat.\nAssistant:")] * 3, tokenizer.pad_token_id)
    plain = _sample(lm, tokenizer, ids, mask, seed=5, T=12)
    # what a hub generation_config.json may carry; unpinned, no_repeat_ngram_size or typical_p alone changes the draws
    lm.generation_config.update(repetition_penalty=5.0, no_repeat_ngram_size=1, typical_p=0.2, top_k=3)
    assert torch.equal(_sample(lm, tokenizer, ids, mask, seed=5, T=12), plain)


@pytest.mark.parametrize("temperature", [None, 1.0], ids=["greedy", "sampled"])
def test_the_sft_and_dpo_held_out_replies_ignore_the_checkpoints_generation_defaults(temperature, tokenizer):
    from stages.common.sequences import seeded
    from stages.trl.demo_eval import generate_replies

    lm = build_tiny_model("llama", tokenizer).eval()
    prompts = ["User: Describe the red cat.\nAssistant:", "User: Hi\nAssistant:"] * 2

    def replies():
        with seeded(11):
            return generate_replies(lm, tokenizer, prompts, max_new_tokens=12, batch_size=2, temperature=temperature)

    plain = replies()
    lm.generation_config.update(repetition_penalty=5.0, no_repeat_ngram_size=1, typical_p=0.2, top_k=3)
    assert replies() == plain


def test_gpt2s_python_gelu_is_swapped_for_the_one_kernel_gelu_without_changing_the_model(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.activations import GELUTanh, NewGELUActivation

    from stages.common.hf import fuse_gelu_tanh

    build_tiny_model("gpt2", tokenizer).save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    fused = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert fuse_gelu_tanh(fused) == plain.config.n_layer  # one per MLP
    assert not any(isinstance(m, NewGELUActivation) for m in fused.modules())
    assert sum(isinstance(m, GELUTanh) for m in fused.modules()) == plain.config.n_layer
    ids = torch.tensor([tokenizer.encode("User: Describe the red cat.\nAssistant: The red cat")])
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    fused.save_pretrained(tmp_path / "saved")  # what a stage publishes: the architecture's own config, same weights
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["activation_function"] == "gelu_new"
    assert fuse_gelu_tanh(build_tiny_model("llama", tokenizer)) == 0  # SiLU models have nothing to swap


def _ragged_rollout(tokenizer, replies: list[list[int]], T: int, group: int = 1):
    """Rollout layout: prompts of different lengths (each repeated for `group` consecutive rows), left-padded to P,
    and the replies right-padded to T. Returns tokens, mask, P."""
    texts = [f"User: Describe {'the red ' * (i % 3)}thing {i}.\nAssistant:" for i in range(len(replies) // group)]
    prompts = [tokenizer.encode(texts[i // group]) for i in range(len(replies))]
    ids, mask = left_padded(prompts, tokenizer.pad_token_id)
    pad = tokenizer.pad_token_id
    tail = torch.tensor([r + [pad] * (T - len(r)) for r in replies])
    tail_mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in replies])
    return torch.cat([ids, tail], 1), torch.cat([mask, tail_mask], 1), ids.shape[1]


@pytest.mark.parametrize("group", [1, 3], ids=["distinct-prompts", "shared-prompts"])
@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_bucketed_or_prompt_shared_forwards_match_one_forward_over_the_padded_batch(arch, group, tokenizer):
    from stages.common.sequences import length_buckets

    torch.manual_seed(0)
    lm = build_tiny_model(arch, tokenizer).eval()
    values = TokenValueModel(build_tiny_model(arch, tokenizer, head="reward-model")).eval()
    # reply tokens per row; no row reaches T, so every window drops columns
    lengths = [1, 7, 3, 7, 2, 5, 6, 1, 4, 8, 2, 3, 6, 1, 7, 2, 5, 8]
    replies = [torch.randint(5, 200, (n,)).tolist() for n in lengths]
    ids, mask, P = _ragged_rollout(tokenizer, replies, T=9, group=group)
    # distinct prompts go by length bucket, groups of replies to one prompt run it once
    if group == 1:
        assert shared_prompts(ids, mask, P) is None and len(length_buckets(mask, 4)) > 1
    else:
        first, inverse = shared_prompts(ids, mask, P)
        assert len(first) == len(lengths) // group  # one row per distinct prompt, gathered back to every row
        assert torch.equal(ids[first][inverse][:, :P], ids[:, :P])
        assert torch.equal(inverse[::group], inverse[group - 1 :: group])  # rows of a group share an entry
    reply_mask = mask[:, P:].float()
    # the padded reference: one forward over every column
    full = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, P - 1 : -1].float()
    expected_lp = torch.log_softmax(full, -1).gather(-1, ids[:, P:, None]).squeeze(-1)
    lp, entropy = per_reply_token(TokenLogprobs(lm, 1.0, with_entropy=True), ids, mask, P)
    torch.testing.assert_close(lp * reply_mask, expected_lp * reply_mask, atol=1e-5, rtol=1e-5)
    expected_entropy = -(torch.softmax(full, -1) * torch.log_softmax(full, -1)).sum(-1)
    torch.testing.assert_close(entropy * reply_mask, expected_entropy * reply_mask, atol=1e-5, rtol=1e-5)
    (v,) = per_reply_token(TokenValues(values), ids, mask, P)
    torch.testing.assert_close(v * reply_mask, values(ids, mask)[:, P - 1 : -1] * reply_mask, atol=1e-5, rtol=1e-5)
    # the gradient of a loss over the reply tokens is the padded batch's
    grads = []
    for cut in (True, False):
        lm.zero_grad()
        if cut:
            (lp,) = per_reply_token(TokenLogprobs(lm, 1.0), ids, mask, P)
        else:
            logits = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, P - 1 : -1]
            lp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, P:, None]).squeeze(-1)
        ((lp * reply_mask).sum() / reply_mask.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in lm.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_reward_scores_by_length_bucket_match_the_classifier(pad_is_eos, tmp_path):
    from stages.common.sequences import length_buckets

    tok = build_tiny_tokenizer(TEXTS, vocab_size=300)
    if pad_is_eos:
        tok.pad_token = tok.eos_token
    build_tiny_model("llama", tok, head="reward-model").save_pretrained(tmp_path)
    eos = tok.eos_token_id
    replies = [[11, 12, eos], [11, 12, 13, 14, 15, 16], [eos], [20, 21, 22, 23, eos], [30], [31, 32, eos]] * 3
    ids, mask, P = _ragged_rollout(tok, replies, T=8)
    ids = ids.masked_fill(mask == 0, tok.pad_token_id)
    actor = RewardActor({"path": str(tmp_path), "store_uri": "", "ref": ""},
                        {"pad_token_id": tok.pad_token_id, "torch_threads": torch.get_num_threads()})  # fmt: skip
    assert len(length_buckets(mask, actor.max_buckets)) > 1  # the rows' lengths differ enough to split the batch
    with torch.no_grad():
        scores = actor.scores({"tokens": ids, "attention_mask": mask})
        from transformers import AutoModelForSequenceClassification

        # the same weights, read by HF's own classifier over the padded batch
        rm = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
        expected = rm(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, 0]
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


def test_length_buckets_by_hand():
    from stages.common.sequences import length_buckets

    mask = torch.tensor([
        [0, 0, 1, 1, 1, 0, 0, 0],  # real columns [2, 5): 3
        [1, 1, 1, 1, 1, 1, 1, 0],  # [0, 7): 7
        [0, 1, 1, 1, 0, 0, 0, 0],  # [1, 4): 3
        [0, 0, 0, 1, 1, 1, 1, 1],  # [3, 8): 5
    ])  # fmt: skip

    def windows(**kw):
        return [(rows.tolist(), start, end) for rows, start, end in length_buckets(mask, min_rows=1, **kw)]

    # one bucket: 4 x 8 columns. Two: by reply end (rows 2, 0 | 1, 3) 2 x 4 + 2 x 8 = 24, by length (0, 2 | 3, 1)
    # also 24, by prompt start (3, 0 | 2, 1) 2 x 6 + 2 x 7 = 26; the first cheapest is kept. Four: 3 + 3 + 5 + 7 = 18
    assert windows(max_buckets=1) == [([2, 0, 1, 3], 0, 8)]
    assert windows(max_buckets=2) == [([2, 0], 1, 5), ([1, 3], 0, 8)]
    assert windows(max_buckets=4) == [([2], 1, 4), ([0], 2, 5), ([1], 0, 7), ([3], 3, 8)]
    # 24 is not 30% below 32, 18 is: the split into two is skipped, the one into four taken
    assert windows(max_buckets=4, min_saving=0.3) == windows(max_buckets=4)
    assert windows(max_buckets=2, min_saving=0.3) == [([2, 0, 1, 3], 0, 8)]
    # groups smaller than min_rows are not cut: 4 rows, at least 2 a group
    assert [(r.tolist(), s, e) for r, s, e in length_buckets(mask, min_rows=2)] == windows(max_buckets=2)
    # a batch with padding on both edges is trimmed even in one bucket
    edges = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 0]])
    assert [(r.tolist(), s, e) for r, s, e in length_buckets(edges, max_buckets=1)] == [([0, 1], 1, 4)]
