"""LoRA adapters with `peft`, shared by every training stage: the `lora:` config section, the peft config built from
it, the check that it can wrap a model (read before anything starts), and how a LoRA-trained stage publishes.

Why one module: the TRL stages hand the peft config to their trainer, the RL stage wraps its own roles, and both
publish the same layout, so the choices below are made once:
- `target_modules: all-linear` (the default) is peft's rule: every linear layer of the attention and MLP blocks
  (GPT-2's Conv1D included), never the output head.
- A published artifact is the merged model, a plain HF directory that `from_pretrained` loads like any other stage
  output, plus the adapter in peft's format under `adapter/`, whose `base_model_name_or_path` is the base artifact's
  path in the store, so `PeftModel.from_pretrained(base, path/adapter)` rebuilds the same model.
- Heads that start untrained (a reward model's score, a critic's value head) train in full beside the adapters
  (`modules_to_save`): a low-rank update of a random head would learn nothing useful.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from stages.common.config import Section
from stages.common.errors import StageInputError

ADAPTER_DIR = "adapter"  # the adapter's folder inside a published artifact
ADAPTER_CONFIG = "adapter_config.json"
ALL_LINEAR = "all-linear"


class LoraSection(Section):
    """Train a low-rank adapter instead of every weight (`null` in a stage's config = full fine-tuning)."""

    r: int = Field(16, ge=1)  # adapter rank
    alpha: float = Field(32.0, gt=0)  # scale alpha / r on the adapter's update (peft's lora_alpha)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # dropout on the adapter's input; 0 keeps RL log-probs exact
    # module names (suffixes, as peft matches them) or "all-linear": every attention and MLP linear, not the head
    target_modules: list[str] | Literal["all-linear"] = ALL_LINEAR
    # QLoRA: load the frozen base in 4 bits (bitsandbytes); needs a CUDA device, refused before a CPU run starts
    quantize: Literal["4bit"] | None = None


def refuse_zero3(lora: LoraSection | None, zero_stage: int | None) -> None:
    """LoRA with ZeRO-3 is refused: merging the adapter into weights that ZeRO-3 shards across ranks would need a
    gather this project has not written or tested; ZeRO 0-2 keep whole weights on every rank, and an adapter's
    optimizer state is small enough that ZeRO-3 buys little."""
    if lora is not None and zero_stage == 3:
        raise ValueError("lora with zero_stage 3 is not supported (use zero_stage 2 or less)")


class LoraError(StageInputError):
    """A `lora:` section that cannot wrap its model (one line)."""


def peft_config(section: LoraSection, *, task_type: str, full_modules: list[str] | None = None):
    """The `peft.LoraConfig` of a section; `full_modules` are trained in full beside the adapters."""
    import peft

    targets = section.target_modules if section.target_modules == ALL_LINEAR else list(section.target_modules)
    return peft.LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=targets,
        task_type=task_type,
        modules_to_save=full_modules or None,
    )


def check_wraps(section: LoraSection, model_config: dict[str, Any], *, head: str, where: str) -> None:
    """Wrap a weightless copy of the model (built from its config.json on the meta device) with the section's
    adapters, so targets that match nothing or a model type peft cannot wrap fail in seconds, before any stage."""
    import torch
    import transformers

    if section.quantize is not None and not torch.cuda.is_available():
        raise LoraError(f"{where}.quantize: {section.quantize} (QLoRA) needs a CUDA device; this machine has none")
    try:
        config = transformers.AutoConfig.for_model(**model_config)
    except (ValueError, KeyError, TypeError) as exc:
        raise LoraError(f"{where}: cannot read the model's config for LoRA ({_first_line(exc)})") from None
    auto = (transformers.AutoModelForSequenceClassification if head == "reward-model"
            else transformers.AutoModelForCausalLM)  # fmt: skip
    with torch.device("meta"):
        try:
            model = auto.from_config(config)
        except (ValueError, KeyError) as exc:
            raise LoraError(f"{where}: cannot build a {config.model_type} model to wrap ({_first_line(exc)})") from None
    wrap(model, section, task_type="SEQ_CLS" if head == "reward-model" else "CAUSAL_LM", where=where)


def wrap(model, section: LoraSection, *, task_type: str, where: str, full_modules: list[str] | None = None):
    """`peft.get_peft_model` with its refusals (no matching module, an unsupported layer) as one LoraError line."""
    import peft

    try:
        return peft.get_peft_model(model, peft_config(section, task_type=task_type, full_modules=full_modules))
    except (ValueError, TypeError, NotImplementedError, KeyError) as exc:
        targets = section.target_modules
        what = ", ".join(targets) if isinstance(targets, list) else targets
        raise LoraError(f"{where}.target_modules: [{what}] cannot wrap this {type(model).__name__} "
                        f"({_first_line(exc)})") from None  # fmt: skip


def save_adapter(peft_model, out_dir: str | Path, base_path: str) -> Path:
    """Write the adapter in peft's format under `out_dir/adapter/`, naming `base_path` (the base artifact's path)
    as its base, so `PeftModel.from_pretrained(AutoModel...(base_path), out_dir/adapter)` works as printed."""
    target = Path(out_dir) / ADAPTER_DIR
    peft_model.save_pretrained(str(target), safe_serialization=True)
    config_file = target / ADAPTER_CONFIG
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = base_path
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for stray in target.glob("README.md"):  # peft writes a model-card stub; the manifest is the card here
        stray.unlink()
    return target


def merged(peft_model):
    """The plain model with the adapters folded into its weights (a copy to publish; training may go on)."""
    import copy

    return copy.deepcopy(peft_model).merge_and_unload()


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts: what the stage report shows for a LoRA run."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
