"""The four RL roles as plain classes that `actor_pool.py` turns into Ray actors (GRPO and RLOO use all but the critic).

Each actor loads its own weights from an artifact directory (never through the driver) and exchanges only token
tensors, log-probs, values, scores and metrics with the driver. A rollout batch is laid out as
    tokens [B, P + T]: prompt left-padded to P, response right-padded to T = max_new_tokens;
    attention_mask [B, P + T]; response_mask [B, T] (1 up to and including eos).
The trainable roles (policy, critic) are DeepSpeed engines; several actors of a role form one torch.distributed group.
Full-sequence forwards compute only what the RL math reads (`per_reply_token`; the reward model's `scores`): rows of
similar length on their own column window (`length_buckets`: the batch's edge padding skipped), a prompt that
several rows share (GRPO/RLOO's groups) run once, no column past the last reply token.
All four roles hold their weights in the run's precision (`devices.py`); log-probs are always taken in fp32.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from stages.common.hf import fuse_gelu_tanh
from stages.common.sampling import SampledLogprobs, decoding_config
from stages.common.sequences import length_buckets, position_ids, seeded
from stages.common.sequences import reply_mask_from_eos as response_mask_from_eos
from stages.rl import algorithm as A
from stages.rl.devices import dist_backend, model_dtype


# ---------------------------------------------------------------------------------------------------- helpers
def resolve_model_dir(path: str, store_uri: str, ref: str) -> str:
    """The artifact's local directory: the driver's path when this node sees it, else fetched from the store here."""
    if Path(path).is_dir():
        return path
    from stages.common.store import ArtifactStore

    return ArtifactStore(store_uri).get(ref).path


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` intra-op threads, then restore the actor's own count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def disable_dropout(model: torch.nn.Module) -> None:
    """PPO's ratio must be exactly 1 before the first step, so no dropout in any forward pass."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def load_role_model(auto_class: str, model_dir: str, dtype: torch.dtype, **kwargs) -> torch.nn.Module:
    """`transformers.<auto_class>.from_pretrained` as every role runs it: no dropout, one-kernel tanh-GELU."""
    import transformers

    model = getattr(transformers, auto_class).from_pretrained(model_dir, dtype=dtype, **kwargs)
    disable_dropout(model)
    fuse_gelu_tanh(model)
    return model


class TokenLogprobs:
    """What `per_reply_token` reads from a causal LM: log p(token) at `temperature` (and the entropy there)."""

    def __init__(self, model, temperature: float, with_entropy: bool = False):
        self.model, self.temperature, self.with_entropy = model, temperature, with_entropy

    def forward(self, input_ids, attention_mask, positions, cache, keep: int) -> torch.Tensor:
        """fp32 logits at the last `keep` positions: [b, L] -> [b, keep, V].

        Upcast before any temperature or log_softmax: bf16 keeps 8 bits of mantissa, so the policy's and the
        reference's log-probs (and the KL between them) would otherwise carry rounding of the order of 0.01 nats.
        """
        # logits_to_keep: the vocabulary projection only where a reply token is predicted (not over the prompt),
        # which on a 128k-vocabulary model with long prompts is most of the logits' memory; no KV cache is kept
        # unless `cache` is given (prompt sharing), as keeping one costs memory on every role
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, past_key_values=cache,
            use_cache=cache is not None, logits_to_keep=keep,
        )  # fmt: skip
        return out.logits.float()

    def finish(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple:
        logits = logits / self.temperature
        logprobs = A.logprobs_from_logits(logits, targets)
        return (logprobs, A.entropy_from_logits(logits)) if self.with_entropy else (logprobs,)


class TokenValues:
    """What `per_reply_token` reads from a `TokenValueModel`: the value before each reply token."""

    def __init__(self, model):
        self.model = model

    def forward(self, input_ids, attention_mask, positions, cache, keep: int) -> torch.Tensor:
        return self.model(input_ids, attention_mask, positions, cache)[:, -keep:]

    def finish(self, values: torch.Tensor, targets: torch.Tensor) -> tuple:
        return (values,)


def shared_prompts(tokens: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int):
    """(one row per distinct prompt, each row's index into them) when at most half the rows have a prompt of
    their own, as in GRPO/RLOO's groups of replies; else None."""
    P = prompt_len
    key = torch.cat([tokens[:, :P] * attention_mask[:, :P], attention_mask[:, :P]], dim=1)
    distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
    if 2 * len(distinct) > len(key):
        return None
    rows = torch.arange(len(key), device=key.device)
    first = torch.full((len(distinct),), len(key), device=key.device).scatter_reduce(0, inverse, rows, "amin")
    return first, inverse


def _prompt_shared_forward(reader, tokens, attention_mask, positions, prompt_len, start, end, shared):
    """The reader's outputs at positions P-1 .. end-2 with each distinct prompt run once: [B, end - P, ...].

    The prompt pass fills a KV cache for the distinct prompts, which is then gathered to one entry per row (an
    index_select, so gradients reach the prompt's weights through every reply), and the replies run on it.
    """
    from transformers import DynamicCache

    first, inverse = shared
    P = prompt_len
    cache = DynamicCache()
    at_prompt_end = reader.forward(
        tokens[first, start:P], attention_mask[first, start:P], positions[first, start:P], cache, 1
    )[inverse]  # fmt: skip
    if end - 1 == P:  # every reply is one token: the last prompt position predicts all there is
        return at_prompt_end
    cache.reorder_cache(inverse)
    replies = reader.forward(
        tokens[:, P : end - 1], attention_mask[:, start : end - 1], positions[:, P : end - 1], cache, end - 1 - P
    )  # fmt: skip
    return torch.cat([at_prompt_end, replies], dim=1)


def per_reply_token(
    reader, tokens: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int, *, max_buckets: int = 4,
    share_prompts: bool = True,
) -> tuple:  # fmt: skip
    """A reader's per-reply-token outputs (`TokenLogprobs`, `TokenValues`) over a rollout batch: [B, T] each.

    Rows sharing a prompt (GRPO/RLOO) run it once (`share_prompts`); otherwise each bucket of rows of similar
    length (`length_buckets`) runs on its own column window. A window ends one column before its last reply
    token, which predicts nothing read. Columns past a window come back as zeros (every row's reply mask is 0
    there). Exact up to float rounding, and differentiable.
    """
    P, T = prompt_len, tokens.shape[1] - prompt_len
    positions = position_ids(attention_mask)

    def padded(outs: tuple) -> list:  # [b, n] -> [b, T]
        return [torch.nn.functional.pad(o, (0, T - o.shape[1])) for o in outs]

    shared = shared_prompts(tokens, attention_mask, P) if share_prompts else None
    if shared is not None:
        ((_, start, end),) = length_buckets(attention_mask, max_buckets=1)
        out = _prompt_shared_forward(reader, tokens, attention_mask, positions, P, start, end, shared)
        return tuple(padded(reader.finish(out, tokens[:, P:end])))
    parts, order = [], []
    for rows, start, end in length_buckets(attention_mask, max_buckets):
        window = slice(start, end - 1)
        out = reader.forward(tokens[rows, window], attention_mask[rows, window], positions[rows, window], None,
                             end - P)  # fmt: skip
        parts.append(padded(reader.finish(out, tokens[rows, P:end])))
        order.append(rows)
    inverse = torch.argsort(torch.cat(order))
    return tuple(torch.cat(column)[inverse] for column in zip(*parts, strict=True))


def reward_read_positions(tokens: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Where the reward model reads each sequence's score: [B, L] -> [B] positions into the whole sequence.

    The same position transformers' *ForSequenceClassification takes on this sequence padded with the reward model's
    pad id (the rightmost non-pad token), so PPO scores a reply as the reward stage trained and evaluated it: the
    eos when pad != eos, the last token before the trailing eos when pad == eos.
    """
    from stages.common.hf import score_position

    return score_position(tokens.masked_fill(attention_mask == 0, pad_token_id), pad_token_id)


def first_head(model) -> torch.nn.Module:
    """The one-output head of a sequence-classification model (`score` in most, `classifier` in some)."""
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise TypeError(f"{type(model).__name__}: no `score` or `classifier` head to read values from")


def engine_config(settings: dict) -> dict:
    """The DeepSpeed config of a trainable role, from the shared builder (the optimizer is a client torch AdamW)."""
    from stages.common import deepspeed_config

    return deepspeed_config.build(
        zero_stage=settings["zero_stage"], precision=settings["precision"], use_gpu=bool(settings["use_gpu"]),
        micro_batch_size=settings["micro_batch_size"], grad_accum=1, grad_clip=settings["max_grad_norm"],
        optimizer=None,
    )  # fmt: skip


class TokenValueModel(torch.nn.Module):
    """A one-output sequence-classification model read at every position: backbone -> score head -> [B, L]."""

    def __init__(self, model):
        super().__init__()
        # the backbone under its prefix: `model` (Llama, Qwen2), `gpt_neox` (GPT-NeoX), `transformer` (GPT-2)
        self.backbone = getattr(model, model.base_model_prefix)
        self.head = first_head(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor | None = None,
                cache=None) -> torch.Tensor:  # fmt: skip
        """[B, L] -> [B, L] fp32; `cache` (a transformers Cache) is read and extended when given (prompt sharing)."""
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask,
            position_ids=position_ids(attention_mask) if positions is None else positions,
            past_key_values=cache, use_cache=cache is not None,
        ).last_hidden_state  # fmt: skip
        return self.head(hidden).squeeze(-1).float()


# ---------------------------------------------------------------------------------------------------- roles
class _Role:
    """Common set-up: torch threads, device, dtype, seed."""

    def __init__(self, settings: dict):
        if settings.get("log_file"):  # this actor's own output (DeepSpeed, HF) to the stage run's log folder
            from stages.common.ray_train import redirect_output

            redirect_output(settings["log_file"])
        threads = int(settings.get("torch_threads", 1))
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        self.settings = settings
        self.rank = int(settings.get("rank", 0))
        if settings.get("use_gpu") and not torch.cuda.is_available():
            raise RuntimeError(
                f"ppo {type(self).__name__} rank {self.rank}: run.use_gpu is true but torch sees no CUDA device "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch {torch.__version__})"
            )
        self.device = torch.device("cuda", 0) if settings.get("use_gpu") else torch.device("cpu")  # Ray shows one GPU
        self.dtype = model_dtype(settings.get("precision", "fp32"))
        torch.manual_seed(int(settings.get("seed", 0)) + 1000 * self.rank)

    def address(self) -> tuple[str, int]:
        """This node's IP and a free TCP port, for the rank-0 actor of a trainable group to host the rendezvous."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        import ray

        return ray.util.get_node_ip_address(), port

    def _to(self, batch: dict) -> dict:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # how a full-sequence forward over a rollout batch is cut (`per_reply_token`)
    max_buckets = 4
    share_prompts = True

    def _per_token(self, reader, batch: dict, rows: torch.Tensor | None = None) -> tuple:
        tokens, attention = batch["tokens"], batch["attention_mask"]
        if rows is not None:
            tokens, attention = tokens[rows], attention[rows]
        return per_reply_token(reader, tokens, attention, batch["prompt_len"], max_buckets=self.max_buckets,
                               share_prompts=self.share_prompts)  # fmt: skip


class _Trainable(_Role):
    """A DeepSpeed engine over `self.model`, data parallel over the actors of the role."""

    model: torch.nn.Module

    def init_engine(self, master_addr: str, master_port: int, world_size: int, learning_rate: float) -> None:
        """Join the role's process group (NCCL on GPU, gloo on CPU) and wrap the model in a DeepSpeed engine."""
        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
            WORLD_SIZE=str(world_size), LOCAL_RANK="0",
        )  # fmt: skip
        import deepspeed

        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        from stages.common.deepspeed_config import forbid_cpu_shm_build

        forbid_cpu_shm_build()
        deepspeed.init_distributed(dist_backend=dist_backend(self.device), verbose=False)
        ds_config = engine_config(self.settings)
        self.zero3 = self.settings["zero_stage"] == 3
        if self.zero3:  # every forward gathers the sharded weights with the other ranks: all must run as many
            self.max_buckets, self.share_prompts = 1, False
        # torch's AdamW as the client optimizer (DeepSpeed wraps it for ZeRO and keeps fp32 masters under bf16):
        # nothing to compile on any node
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
        self.engine, *_ = deepspeed.initialize(model=self.model, optimizer=optimizer, config=ds_config)

    @contextlib.contextmanager
    def full_params(self) -> Iterator[None]:
        """Under ZeRO-3 gather the sharded weights for generation/export (a collective: every rank enters)."""
        if not self.zero3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None):
            yield

    def save_checkpoint(self, directory: str, tag: str) -> None:
        """DeepSpeed checkpoint (weights, optimizer) of this rank's shard under directory/tag; every rank calls it.

        `directory` may be an fsspec URI (a cluster's shared s3:// work_dir): the shard is written locally, then
        uploaded next to the other ranks' files.
        """
        if "://" not in directory:
            self.engine.save_checkpoint(directory, tag=tag)
            return
        import fsspec

        with tempfile.TemporaryDirectory() as local:
            self.engine.save_checkpoint(local, tag=tag)
            fs, remote = fsspec.core.url_to_fs(directory)
            fs.put(str(Path(local) / tag), f"{remote}/{tag}", recursive=True)

    def load_checkpoint(self, directory: str, tag: str) -> None:
        """Restore weights and optimizer state saved by `save_checkpoint` (downloading it first from a URI)."""
        if "://" in directory:
            import fsspec

            with tempfile.TemporaryDirectory() as local:
                fs, remote = fsspec.core.url_to_fs(directory)
                fs.get(f"{remote}/{tag}", str(Path(local) / tag), recursive=True)
                self.load_checkpoint(local, tag)
            return
        path, _ = self.engine.load_checkpoint(directory, tag=tag)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} under {directory}")

    def _minibatches(self, n: int, epochs: int, seed: int) -> Iterator[torch.Tensor]:
        """Shuffled minibatch indices for each epoch; seeded so every run (and resume) sees the same order.

        Drawn on the CPU (the same order on any device), handed out on the actor's device like the batch they index.
        """
        g = torch.Generator().manual_seed(seed)
        mb = self.settings["micro_batch_size"]
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g)
            for start in range(0, n - mb + 1, mb):
                yield perm[start : start + mb].to(self.device)


class PolicyActor(_Trainable):
    """The trainable policy: samples responses (HF generate, KV cache) and takes clipped-surrogate PPO steps."""

    def __init__(self, source: dict, settings: dict):
        super().__init__(settings)
        self.model = load_role_model("AutoModelForCausalLM", resolve_model_dir(**source), self.dtype).to(self.device)
        self.pad_id = int(settings["pad_token_id"])
        self.eos_ids = [int(i) for i in settings["eos_token_ids"]]

    @torch.no_grad()
    def generate(self, prompts: dict, seed: int | None = None, record_logprobs: bool = False) -> dict:
        """Sample one response per left-padded prompt; returns the rollout layout.

        prompts: {"prompt_ids", "prompt_mask"} [B, P]; `seed` makes the samples reproducible (offset per rank).
        `record_logprobs` adds "logprobs" [B, T], read from the sampling pass's own logits (`SampledLogprobs`,
        `ppo.old_logprobs: sampling`); without it the loop asks `logprobs` for them while the reference and reward
        model score the batch.
        """
        s = self.settings
        module = self.engine.module
        module.eval()
        prompt_ids, prompt_mask = prompts["prompt_ids"].to(self.device), prompts["prompt_mask"].to(self.device)
        seed = None if seed is None else seed + 7919 * self.rank
        P, T = prompt_ids.shape[1], s["max_new_tokens"]
        gen_config = decoding_config(temperature=s["temperature"], top_p=s["top_p"], max_new_tokens=T,
                                     eos_ids=self.eos_ids, pad_id=self.pad_id)  # fmt: skip
        recorder = SampledLogprobs(module, s["temperature"]) if record_logprobs else contextlib.nullcontext()
        with seeded(seed), self.full_params(), torch_threads(s["generation_threads"]), recorder:
            out = module.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen_config)
        generated = out.shape[1] - P
        responses = torch.full((out.shape[0], T), self.pad_id, dtype=out.dtype, device=out.device)
        responses[:, :generated] = out[:, P:]
        # keep everything up to and including the first eos; what follows (and what was never generated) is padding
        eos_ids = torch.tensor(self.eos_ids, dtype=responses.dtype, device=responses.device)
        response_mask = response_mask_from_eos(responses, eos_ids, generated=generated)
        ended = (torch.isin(responses, eos_ids) & (response_mask > 0)).any(-1)
        responses = responses.masked_fill(response_mask == 0, self.pad_id)
        result = {
            "tokens": torch.cat([prompt_ids, responses], dim=1).cpu(),
            "attention_mask": torch.cat([prompt_mask.long(), response_mask], dim=1).cpu(),
            "response_mask": response_mask.float().cpu(),
            "ended": ended.cpu(),
        }
        if record_logprobs:
            logprobs = torch.zeros((out.shape[0], T), dtype=torch.float32, device=out.device)
            logprobs[:, :generated] = recorder.result(out)
            result["logprobs"] = (logprobs * response_mask).cpu()
        return result

    @torch.no_grad()
    def logprobs(self, batch: dict) -> torch.Tensor:
        """log p_policy(response token) of a rollout batch at the sampling temperature: [B, T], zero on padding.

        The same full-sequence forward the PPO ratio's numerator takes, so the ratio is 1 before the first step.
        """
        b = self._to(batch)
        self.engine.module.eval()
        with self.full_params():
            (lp,) = self._per_token(TokenLogprobs(self.engine.module, self.settings["temperature"]), b)
        return (lp * b["response_mask"]).cpu()

    def train(self, batch: dict, epochs: int, seed: int) -> dict[str, float]:
        """`epochs` passes of clipped-surrogate minibatch steps over this actor's shard; returns mean statistics.

        A batch carrying "ref_logprobs" (kl_penalty "loss", GRPO's default) adds loss_kl_coef * the k3 KL to the
        reference to every step's loss, computed from this step's log-probs.
        The surrogate clips to [1 - clip_ratio_low, 1 + clip_ratio_high] (each None = clip_ratio) and takes the ratio
        per token or, with importance_ratio "sequence", GSPO's per reply.
        """
        s = self.settings
        b = self._to(batch)
        kl_in_loss = "ref_logprobs" in b
        self.engine.train()
        totals: dict[str, float] = {}
        steps = 0
        reader = TokenLogprobs(self.engine, s["temperature"], with_entropy=True)
        with torch_threads(s["policy_train_threads"]):
            for idx in self._minibatches(b["tokens"].shape[0], epochs, seed):
                mask = b["response_mask"][idx]
                logprobs, entropies = self._per_token(reader, b, idx)
                loss, stats = A.policy_loss(
                    logprobs, b["logprobs"][idx], b["advantages"][idx], mask, s["clip_ratio"],
                    clip_low=s["clip_ratio_low"], clip_high=s["clip_ratio_high"], ratio_level=s["importance_ratio"],
                )  # fmt: skip
                entropy = A.masked_mean(entropies, mask)
                if s["entropy_coef"] > 0:
                    loss = loss - s["entropy_coef"] * entropy
                if kl_in_loss:
                    kl_term = A.kl_loss(logprobs, b["ref_logprobs"][idx], mask)
                    loss = loss + s["loss_kl_coef"] * kl_term
                    stats = {**stats, "kl_loss": kl_term}
                self.engine.backward(loss)
                self.engine.step()
                for k, v in {"policy_loss": loss, "entropy": entropy, **stats}.items():
                    totals[k] = totals.get(k, 0.0) + float(v.detach())
                steps += 1
        return {k: v / max(steps, 1) for k, v in totals.items()}

    def export_to(self, staging: str) -> list[str]:
        """Rank 0 writes the policy's HF files (config, safetensors, generation config) into `staging` itself, a
        folder or an fsspec URI, so the weights never travel through Ray's object store or the driver's memory.
        Every rank calls it (ZeRO-3 gathers the shards); returns the file names written (rank 0) or []."""
        with self.full_params():
            if self.rank != 0:
                return []
            if "://" not in staging:
                Path(staging).mkdir(parents=True, exist_ok=True)
                self.engine.module.save_pretrained(staging, safe_serialization=True)
                return sorted(p.name for p in Path(staging).iterdir() if p.is_file())
            import fsspec

            with tempfile.TemporaryDirectory() as d:
                self.engine.module.save_pretrained(d, safe_serialization=True)
                fs, remote = fsspec.core.url_to_fs(staging)
                fs.put(f"{d}/", f"{remote.rstrip('/')}/", recursive=True)
                return sorted(p.name for p in Path(d).iterdir() if p.is_file())


class CriticActor(_Trainable):
    """The trainable value model: a sequence-classification model read per token (see `TokenValueModel`)."""

    def __init__(self, source: dict, settings: dict):
        super().__init__(settings)
        base = load_role_model("AutoModelForSequenceClassification", resolve_model_dir(**source), self.dtype,
                               num_labels=1)  # fmt: skip
        self.model = TokenValueModel(base).to(self.device)

    @torch.no_grad()
    def values(self, batch: dict) -> torch.Tensor:
        """V(state before each response token): [B, T], zero on padding."""
        b = self._to(batch)
        self.engine.eval()
        (v,) = self._per_token(TokenValues(self.engine), b)
        return (v * b["response_mask"]).cpu()

    def train(self, batch: dict, epochs: int, seed: int) -> dict[str, float]:
        """`epochs` passes of clipped value-loss minibatch steps over this actor's shard; returns mean statistics."""
        s = self.settings
        b = self._to(batch)
        self.engine.train()
        totals = {"value_loss": 0.0, "value_clip_frac": 0.0}
        steps = 0
        reader = TokenValues(self.engine)
        for idx in self._minibatches(b["tokens"].shape[0], epochs, seed):
            (v,) = self._per_token(reader, b, idx)
            loss, stats = A.value_loss(v, b["values"][idx], b["returns"][idx], b["response_mask"][idx], s["value_clip"])
            self.engine.backward(loss)
            self.engine.step()
            totals["value_loss"] += float(loss.detach())
            totals["value_clip_frac"] += float(stats["clip_frac"])
            steps += 1
        return {k: v / max(steps, 1) for k, v in totals.items()}


class ReferenceActor(_Role):
    """The frozen SFT policy: log-probs of sampled responses, for the KL penalty."""

    def __init__(self, source: dict, settings: dict):
        super().__init__(settings)
        model = load_role_model("AutoModelForCausalLM", resolve_model_dir(**source), self.dtype)
        self.model = model.to(self.device).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def logprobs(self, batch: dict) -> torch.Tensor:
        """log p_ref(response token): [B, T], zero on padding."""
        b = self._to(batch)
        (lp,) = self._per_token(TokenLogprobs(self.model, self.settings["temperature"]), b)
        return (lp * b["response_mask"]).cpu()


class RewardActor(_Role):
    """The frozen reward model: one score per (prompt, response), read where transformers' classifier reads it."""

    def __init__(self, source: dict, settings: dict):
        super().__init__(settings)
        base = load_role_model("AutoModelForSequenceClassification", resolve_model_dir(**source), self.dtype)
        # the pad id the reward stage trained (and evaluated) the classifier with; the tokenizer's when unset
        rm_pad = base.config.pad_token_id
        self.pad_id = int(settings["pad_token_id"] if rm_pad is None else rm_pad)
        self.model = TokenValueModel(base).to(self.device).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def scores(self, batch: dict) -> torch.Tensor:
        """Reward-model score of each sequence: [B]."""
        b = self._to(batch)
        read = reward_read_positions(b["tokens"], b["attention_mask"], self.pad_id)
        scores = torch.zeros(read.shape[0], dtype=torch.float32, device=read.device)
        for rows, start, end in length_buckets(b["attention_mask"], self.max_buckets):  # a bucket's window holds its read positions
            per_token = self.model(b["tokens"][rows, start:end], b["attention_mask"][rows, start:end])
            scores[rows] = per_token[torch.arange(len(rows), device=read.device), read[rows] - start]
        return scores.cpu()
