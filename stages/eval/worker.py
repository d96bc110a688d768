"""The evaluation itself, as one Ray task on the cluster: every model loaded one at a time, then unloaded.

Order, so each model is loaded exactly once and at most one sits in (GPU) memory:
  1. each policy: sample its replies, take its own log-probs of them;
  2. the SFT model: sample its replies (the baseline row), take its log-probs of every model's replies (the KL);
  3. the reward model: score every model's replies.
Weights are read from the artifact directory when this node sees it, else fetched from the store here. The task
returns only token ids and per-reply numbers, never weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from stages.eval import generation as G
from stages.eval.metrics import sequence_kl

SFT = "sft"  # the baseline row's name in every table


def model_dir(source: dict) -> str:
    """The artifact's local directory: the driver's path when this node sees it, else fetched from the store here."""
    if Path(source["path"]).is_dir():
        return source["path"]
    from stages.common.store import ArtifactStore

    return ArtifactStore(source["store_uri"]).get(source["ref"]).path


def _device_and_dtype(use_gpu: bool) -> tuple[torch.device, torch.dtype]:
    """cuda:0 in bf16 on a GPU task (Ray shows the task only its own GPU), the CPU in fp32 otherwise."""
    if not use_gpu:
        return torch.device("cpu"), torch.float32
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"eval: run.use_gpu is true but torch sees no CUDA device in the evaluation task "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch {torch.__version__})"
        )
    return torch.device("cuda", 0), torch.bfloat16


def _release(model) -> None:
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sample_all(model, plan: dict) -> list[dict]:
    """Every prompt's replies from `model`, batch by batch, each batch with the model's own log-probs; on the CPU.

    Batch k always holds the same prompts and samples under seed + its first prompt's index, for every model.
    """
    batches = []
    prompt_ids, bs = plan["prompt_ids"], plan["batch_size"]
    for start in range(0, len(prompt_ids), bs):
        batch = G.sample_batch(
            model, prompt_ids[start : start + bs], pad_id=plan["pad_id"], eos_ids=plan["eos_ids"],
            max_new_tokens=plan["max_new_tokens"], temperature=plan["temperature"], seed=plan["seed"] + start,
        )  # fmt: skip
        batch["logprobs"] = G.reply_logprobs(model, batch, plan["temperature"])
        batches.append({k: v.cpu() for k, v in batch.items()})
    return batches


def evaluate_models(plan: dict) -> dict[str, dict]:
    """Sample, take log-probs and score as the module docstring says; returns per model and per reply:
    {"reply_ids": [[int]], "ended": [bool], "length": [int], "kl": [float], "rm_score": [float]}."""
    from stages.common.ray_train import output_to

    with output_to(plan.get("log_file")):  # the stage run's log folder, as the other stages' workers
        return _evaluate_models(plan)


def _evaluate_models(plan: dict) -> dict[str, dict]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.set_num_threads(max(1, int(plan["cpus"])))
    device, dtype = _device_and_dtype(plan["use_gpu"])

    def load(cls, source: dict):
        return cls.from_pretrained(model_dir(source), dtype=dtype).to(device).eval()

    batches: dict[str, list[dict]] = {}
    for name, source in plan["policies"].items():
        policy = load(AutoModelForCausalLM, source)
        batches[name] = _sample_all(policy, plan)
        _release(policy)

    sft = load(AutoModelForCausalLM, plan["sft_model"])
    batches = {SFT: _sample_all(sft, plan), **batches}
    for name, model_batches in batches.items():
        for batch in model_batches:
            # the SFT row against itself: the same forward pass, so its KL is exactly 0
            batch["sft_logprobs"] = (
                batch["logprobs"] if name == SFT else G.reply_logprobs(sft, batch, plan["temperature"]).cpu()
            )
    _release(sft)

    # without a reward model (a run rewarded by functions alone) rm_score is None per reply
    reward_model = load(AutoModelForSequenceClassification, plan["reward_model"]) if plan["reward_model"] else None
    results = {}
    for name, model_batches in batches.items():
        rows: dict[str, list] = {"reply_ids": [], "ended": [], "length": [], "kl": [], "rm_score": []}
        for b in model_batches:
            n = b["tokens"].shape[0]
            scores = G.reward_scores(reward_model, b, plan["rm_pad_id"]).cpu().tolist() if reward_model else [None] * n
            kl = sequence_kl(b["logprobs"], b["sft_logprobs"], b["reply_mask"])
            T = b["reply_mask"].shape[1]
            for i in range(b["tokens"].shape[0]):
                rows["reply_ids"].append(b["tokens"][i, -T:][b["reply_mask"][i].bool()].tolist())
            rows["ended"] += b["ended"].tolist()
            rows["length"] += b["reply_mask"].sum(-1).tolist()
            rows["kl"] += kl.tolist()
            rows["rm_score"] += scores
        results[name] = rows
    if reward_model is not None:
        _release(reward_model)
    return results
