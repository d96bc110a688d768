"""The GPU smoke test's third part: every artifact the pipeline part published loads in plain Hugging Face
transformers (and PEFT for an `adapter/`) on the GPU and gives finite outputs, as docs/GPU.md promises.
Writes OUT/load.json: one row per artifact. Usage: python scripts/gpu_smoke/load_check.py OUT"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def check(art, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    row = {"ref": art.ref, "kind": art.kind}
    path = Path(art.path)
    if art.kind == "tokenizer" or not (path / "config.json").is_file():
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            AutoTokenizer.from_pretrained(path)
            row["loaded"] = "AutoTokenizer"
        else:
            row["loaded"] = "not a model"
        return row
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cls = AutoModelForSequenceClassification if art.kind == "reward-model" else AutoModelForCausalLM
    model = cls.from_pretrained(path, torch_dtype=dtype).to(device).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], device=device) % model.config.vocab_size
    with torch.no_grad():
        out = model(input_ids=ids).logits
    row.update(loaded=cls.__name__, device=str(out.device), dtype=str(out.dtype), finite=bool(torch.isfinite(out).all()))
    if (path / "adapter").is_dir():
        from peft import PeftModel

        base_path = json.loads((path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
        base = cls.from_pretrained(base_path, torch_dtype=dtype).to(device)
        peft = PeftModel.from_pretrained(base, path / "adapter").eval()
        with torch.no_grad():
            adapted = peft(input_ids=ids).logits
        row["adapter_max_abs_diff"] = float((adapted.float() - out.float()).abs().max())
    return row


def main(out: Path) -> int:
    import torch

    from stages.common.store import ArtifactStore

    run = json.loads((out / "run.json").read_text())
    store = ArtifactStore(run["store"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for info in run["stages"].values():
        for ref in info["outputs"].values():
            try:
                rows.append(check(store.get(ref), device))
            except Exception as e:  # noqa: BLE001 - a load failure is the finding: record it, check the rest
                rows.append({"ref": ref, "loaded": None, "error": f"{type(e).__name__}: {e}"[:400]})
            print(json.dumps(rows[-1]), flush=True)
    (out / "load.json").write_text(json.dumps(rows, indent=1) + "\n")
    bad = [r for r in rows if r.get("loaded") is None or r.get("finite") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
