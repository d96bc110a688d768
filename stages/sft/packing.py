"""`sft.packing`: TRL's packing, checked so that packed sequences never attend to each other.

What TRL 1.16 does with `SFTConfig(packing=True)` (strategy "bfd", its default): rows are packed best-fit decreasing
into rows of at most `max_length` tokens, and that strategy turns `padding_free` on: the collator concatenates the
whole micro-batch into ONE row, sends `position_ids` that restart at 0 for every packed sequence and no
`attention_mask`, sets the label of each sequence's first token to -100, and `compute_loss` passes `use_cache=False`.

Who keeps the sequences apart: with flash attention the varlen kernel (cu_seq_lens from the position ids); with the
attention this project loads (`sdpa`, stages/common/hf.py; `eager` likewise) transformers' own masks:
`masking_utils.create_causal_mask` finds the packed sequences from the position ids when there is no attention mask
and no cache (`find_packed_sequence_indices`) and builds a block-diagonal causal mask. A model whose modeling code
builds its mask another way would attend across the packed sequences and train on wrong contexts without a sign, so:
- `preflight` (the driver, before Ray starts) refuses packing in one line for a model type whose transformers
  modeling module does not use `create_causal_mask`, or one transformers does not ship (remote code);
- `check_packed_attention` (the worker, on the model actually loaded) runs one no-grad forward of two short
  sequences packed exactly as TRL's collator sends them and alone, and refuses packing if the logits differ.
  It is skipped under ZeRO-3 (weights partitioned outside the engine); the pre-flight still ran.

The cost to know: with sdpa/eager the mask spans the whole flattened micro-batch, so attention costs
(per-worker batch x max_length)^2 rather than the sum of the sequences' squares (flash varlen). Keep max_length and
the batch moderate on CPU; `batch_size` counts packed rows (each up to max_length tokens), not data rows.
"""

from __future__ import annotations

import sys

from stages.common.errors import StageInputError

# attention implementations whose kernels keep packed sequences apart from the position ids alone (varlen)
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn")
PROBE_LENGTHS = (7, 5)  # two packed sequences; the second one shows attention across the boundary
PROBE_ATOL = 1e-4


class PackingError(StageInputError):
    """Packing asked for on a model whose attention would attend across the packed sequences (one line)."""


def preflight(model_dir: str, attn_implementation: str, where: str) -> None:
    """Refuse packing before anything starts unless the model's attention keeps packed sequences apart."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    if attn_implementation in VARLEN_ATTENTION:
        return
    try:
        module = sys.modules[AutoModelForCausalLM._model_mapping[type(config)].__module__]
    except (KeyError, ValueError):
        raise PackingError(f"{where}: packing: model type {config.model_type!r} is not a transformers causal LM this "
                           "stage can check keeps packed sequences apart; set sft.packing: false") from None
    if not hasattr(module, "create_causal_mask"):
        raise PackingError(f"{where}: packing: model type {config.model_type!r} with {attn_implementation} attention "
                           "does not build its mask from the position ids, so packed sequences would attend to each "
                           "other; set sft.packing: false")


def packed_and_alone(model, vocab_size: int):
    """(logits of two short sequences packed as TRL's padding-free collator sends them, their logits alone)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    seqs = [torch.randint(1, vocab_size, (1, n), generator=generator).to(device) for n in PROBE_LENGTHS]
    position_ids = torch.cat([torch.arange(n) for n in PROBE_LENGTHS])[None].to(device)
    with torch.no_grad():
        packed = model(input_ids=torch.cat(seqs, dim=1), position_ids=position_ids, use_cache=False).logits
        alone = torch.cat([model(input_ids=s, use_cache=False).logits for s in seqs], dim=1)
    return packed.float(), alone.float()


def check_packed_attention(model, where: str) -> None:
    """Refuse packing if `model` (as loaded for training) lets a packed sequence see the one before it."""
    was_training = model.training
    model.eval()  # dropout off: the two forwards must be comparable
    try:
        packed, alone = packed_and_alone(model, model.config.get_text_config().vocab_size)
    finally:
        model.train(was_training)
    gap = float((packed - alone).abs().max())
    if gap > PROBE_ATOL:
        raise PackingError(f"{where}: packing: the model's {model.config._attn_implementation} attention lets packed "
                           f"sequences attend to each other (logits differ by {gap:.2g} from each sequence alone); "
                           "set sft.packing: false")
