"""The four RL roles as plain classes that `actor_pool.py` turns into Ray actors (GRPO and RLOO use all but the critic).

Each actor loads its own weights (`models.py`: one loader per role) from an artifact directory, never through the
driver, and exchanges only token tensors, log-probs, values, scores and metrics with the driver. A rollout batch is
the prompt | reply layout of `stages/common/sequences.py` (tokens, attention_mask, reply_mask, ended, prompt_len).
The trainable roles (policy, critic) are DeepSpeed engines; several actors of a role form one torch.distributed group.
The full-sequence forwards are `stages/common/forwards.py`'s (shared with eval); the losses `algorithm.py`'s.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from stages.common.forwards import TokenLogprobs, TokenValues, per_reply_token, sequence_scores
from stages.common.placements import worker_placement
from stages.common.sampling import SampledLogprobs, decoding_config
from stages.common.sequences import rollout_layout, seeded
from stages.rl import algorithm as A
from stages.rl import models
from stages.rl.devices import dist_backend, model_dtype


# ---------------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` intra-op threads, then restore the actor's own count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def engine_config(settings: dict) -> dict:
    """The DeepSpeed config of a trainable role, from the shared builder (the optimizer is a client torch AdamW)."""
    from stages.common import deepspeed_config

    return deepspeed_config.build(
        zero_stage=settings["zero_stage"], precision=settings["precision"], use_gpu=bool(settings["use_gpu"]),
        micro_batch_size=settings["micro_batch_size"], grad_accum=1, grad_clip=settings["max_grad_norm"],
        optimizer=None,
    )  # fmt: skip


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
        """Host the rendezvous of this (rank 0) actor's group on its node's address: (address, port) for init_engine."""
        from stages.common.addresses import host_rendezvous

        return host_rendezvous()

    def placement(self) -> dict:
        """Where this actor runs: its node's id and address and its process id (recorded in the stage's report)."""
        return worker_placement()

    def peak_rss(self) -> int:
        """This actor process's peak resident set size in bytes (host memory, ru_maxrss; GPU memory not included)."""
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux

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
        self.model = models.load_policy(source, self.dtype, settings.get("lora")).to(self.device)
        self.base_path = source["path"]  # the SFT artifact's path: a LoRA adapter's base
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
        layout = rollout_layout(prompt_ids, prompt_mask, out, max_new_tokens=T, pad_id=self.pad_id,
                                eos_ids=self.eos_ids)  # fmt: skip
        reply_mask = layout["reply_mask"]
        result = {
            "tokens": layout["tokens"].cpu(),
            "attention_mask": layout["attention_mask"].cpu(),
            "reply_mask": reply_mask.float().cpu(),
            "ended": layout["ended"].cpu(),
        }
        if record_logprobs:
            logprobs = torch.zeros((out.shape[0], T), dtype=torch.float32, device=out.device)
            logprobs[:, :generated] = recorder.result(out)
            result["logprobs"] = (logprobs * reply_mask).cpu()
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
        return (lp * b["reply_mask"]).cpu()

    @torch.no_grad()
    def reference_logprobs(self, batch: dict) -> torch.Tensor:
        """With LoRA, the reference's log-probs: this policy's with its adapter off, which is the SFT model exactly
        (the base weights never train), so no reference actor holds a second copy. [B, T], zero on padding."""
        with self.engine.module.disable_adapter():
            return self.logprobs(batch)

    def train(self, batch: dict, epochs: int, seed: int) -> dict[str, float]:
        """`epochs` passes of clipped-surrogate minibatch steps over this actor's shard; returns mean statistics.

        Each step's loss is `algorithm.policy_objective`: the clipped surrogate (to [1 - clip_ratio_low,
        1 + clip_ratio_high], each None = clip_ratio; the ratio per token or, importance_ratio "sequence", GSPO's per
        reply), the entropy bonus, and, for a batch carrying "ref_logprobs" (kl_penalty "loss", GRPO's default),
        loss_kl_coef * the k3 KL to the reference from this step's log-probs.
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
                logprobs, entropies = self._per_token(reader, b, idx)
                loss, stats = A.policy_objective(
                    logprobs, entropies, b["logprobs"][idx], b["advantages"][idx], b["reply_mask"][idx],
                    b["ref_logprobs"][idx] if kl_in_loss else None, clip=s["clip_ratio"], clip_low=s["clip_ratio_low"],
                    clip_high=s["clip_ratio_high"], ratio_level=s["importance_ratio"], entropy_coef=s["entropy_coef"],
                    loss_kl_coef=s["loss_kl_coef"],
                )  # fmt: skip
                self.engine.backward(loss)
                self.engine.step()
                for k, v in stats.items():
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
                self._save(staging)
                return sorted(p.name for p in Path(staging).iterdir() if p.is_file())
            import fsspec

            with tempfile.TemporaryDirectory() as d:
                self._save(d)
                fs, remote = fsspec.core.url_to_fs(staging)
                fs.put(f"{d}/", f"{remote.rstrip('/')}/", recursive=True)
                return sorted(p.name for p in Path(d).iterdir() if p.is_file())


    def _save(self, directory: str) -> None:
        """The HF files; with LoRA the merged model plus the adapter under adapter/, naming the SFT model as base."""
        module = self.engine.module
        if self.settings.get("lora") is None:
            module.save_pretrained(directory, safe_serialization=True)
            return
        from stages.common.lora import merged, save_adapter

        merged(module).save_pretrained(directory, safe_serialization=True)
        save_adapter(module, directory, base_path=self.base_path)


class CriticActor(_Trainable):
    """The trainable value model: a sequence-classification model read per token (see `TokenValueModel`)."""

    def __init__(self, source: dict, settings: dict):
        super().__init__(settings)
        self.model = models.load_critic(source, self.dtype, settings.get("lora")).to(self.device)

    @torch.no_grad()
    def values(self, batch: dict) -> torch.Tensor:
        """V(state before each response token): [B, T], zero on padding."""
        b = self._to(batch)
        self.engine.eval()
        (v,) = self._per_token(TokenValues(self.engine), b)
        return (v * b["reply_mask"]).cpu()

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
            loss, stats = A.value_loss(v, b["values"][idx], b["returns"][idx], b["reply_mask"][idx], s["value_clip"])
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
        self.model = models.load_reference(source, self.dtype).to(self.device)

    @torch.no_grad()
    def logprobs(self, batch: dict) -> torch.Tensor:
        """log p_ref(response token): [B, T], zero on padding."""
        b = self._to(batch)
        (lp,) = self._per_token(TokenLogprobs(self.model, self.settings["temperature"]), b)
        return (lp * b["reply_mask"]).cpu()


class RewardActor(_Role):
    """The frozen reward model: one score per (prompt, response), read where transformers' classifier reads it."""

    def __init__(self, source: dict, settings: dict):
        super().__init__(settings)
        model, self.pad_id = models.load_reward_model(source, self.dtype, int(settings["pad_token_id"]))
        self.model = model.to(self.device)

    @torch.no_grad()
    def scores(self, batch: dict) -> torch.Tensor:
        """Reward-model score of each sequence: [B]."""
        b = self._to(batch)
        return sequence_scores(self.model, b["tokens"], b["attention_mask"], self.pad_id, self.max_buckets).cpu()
