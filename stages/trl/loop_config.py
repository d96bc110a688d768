"""The contract between the driver and the workers of a TRL stage: the typed loop config and the checkpoint layout.

The driver (`stages.trl.driver.build_loop_config`) builds one frozen `TrainLoopConfig`, or a stage's subclass of it
that adds that stage's own fields (`SFTLoopConfig` in stages/sft/train.py, `RewardLoopConfig`, `DPOLoopConfig`).
Ray Train hands its `train_loop_config` dict to every worker through a pickle, so the object itself travels inside
that dict under `LOOP_KEY` (`to_ray` on the driver, `from_ray` on the worker) and workers read attributes, never
string keys. The rows are tuples; the dicts in them are the validated rows and are not to be changed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from stages.common.lora import LoraSection

FINAL_DIR = "final"  # inside the last checkpoint: the trained model + tokenizer (a standard HF dir)
RESULT_FILE = "result.json"  # inside the last checkpoint: metrics, log history, samples
HF_CHECKPOINT_DIR = "checkpoint"  # where RayTrainReportCallback puts the HF Trainer checkpoint
HF_CHECKPOINT_FILES = ("optimizer.pt", "scheduler.pt", "trainer_state.json")
# the weights of an HF Trainer checkpoint: the whole model, or with LoRA only the adapter (the base is the input's)
HF_CHECKPOINT_WEIGHTS = ("model.safetensors", "adapter_model.safetensors")

LOOP_KEY = "loop"  # the TrainLoopConfig's key in Ray Train's train_loop_config dict


@dataclass(frozen=True, kw_only=True)
class TokenizerPlan:
    """What the stage does to the tokenizer (see `stages.trl.tokens.tokenizer_plan`), recorded in the artifact."""

    pad_token: str | None
    pad_token_id: int | None
    pad_is_eos: bool
    pad_note: str | None  # one line saying pad = eos was set, or None when the tokenizer had a pad token
    chat_template: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class TrainLoopConfig:
    """What every TRL stage's workers need: the input model, the rows, the optimiser, checkpoints and resources.

    A stage with fields of its own subclasses it (frozen and keyword-only too); the driver builds it with
    `stages.trl.driver.build_loop_config(cls, ...)`.
    """

    stage: str  # the stage's name, for log lines
    tokenizer: TokenizerPlan
    model_dir: str  # the input model's directory on the driver
    model_digest: str  # ... and its artifact digest, to fetch it from the store on a node that cannot see that dir
    store_root: str | None
    train_rows: tuple[dict[str, Any], ...] = field(repr=False)
    test_rows: tuple[dict[str, Any], ...] = field(repr=False)
    max_length: int  # the token limit every row was checked against
    per_worker_batch: int
    max_steps: int
    gradient_accumulation_steps: int
    learning_rate: float
    warmup_steps: int
    weight_decay: float
    save_steps: int
    logging_steps: int
    bf16: bool
    deepspeed: dict[str, Any] | None  # the DeepSpeed config for the HF Trainer; None = plain DDP
    seed: int
    use_gpu: bool
    cpus_per_worker: float
    demo_task: bool  # the data is the built-in demo task (its gold scorer applies)
    lora: LoraSection | None = None  # train an adapter (published merged, and in peft's format under adapter/)
    activation_checkpointing: bool = False  # recompute activations in the backward pass (the stage's knob)
    report_to: tuple[str, ...] = ()  # the HF Trainer's own integrations (tracking.report_to); () = none
    logging_dir: str | None = None  # where those integrations write (beside the stage's checkpoints)

    @property
    def bf16_weights(self) -> bool:
        """Load the weights in bf16? Only under DeepSpeed, whose bf16 optimizer keeps an fp32 master copy. Plain DDP
        with `bf16: true` is the Trainer's autocast over fp32 weights: bf16 weights there would take every AdamW step
        in bf16, with no fp32 copy (issue 27 item 15)."""
        return self.bf16 and self.deepspeed is not None


def to_ray(loop: TrainLoopConfig) -> dict[str, Any]:
    """Ray Train's `train_loop_config` for `loop` (the object itself; Ray pickles it to the workers)."""
    return {LOOP_KEY: loop}


def from_ray(config: dict[str, Any]) -> TrainLoopConfig:
    """The TrainLoopConfig a worker received inside Ray Train's `train_loop_config`."""
    loop = config[LOOP_KEY]
    if not isinstance(loop, TrainLoopConfig):
        raise TypeError(f"train_loop_config[{LOOP_KEY!r}]: expected a TrainLoopConfig, found {type(loop).__name__}")
    return loop
