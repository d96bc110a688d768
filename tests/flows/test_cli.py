"""The `rlhf` command line: help everywhere, readable errors with exit codes, artifact inspection, demo data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import build_parser, main
from stages.common.store import ArtifactStore

REPO = Path(__file__).resolve().parents[2]

RLHF = [sys.executable, "-m", "flows.cli"]


def _publish_chain(root: Path):
    """A tiny two-artifact chain with lineage, published through the real store."""
    store = ArtifactStore(str(root))
    src = root.parent / "src-data"
    src.mkdir()
    (src / "train.jsonl").write_text('{"text": "the cat is happy ."}\n')
    (src / "test.jsonl").write_text('{"text": "the dog is calm ."}\n')
    data = store.publish(src, name="corpus", kind="dataset", stage="data", extra={"format": "corpus", "task": None})
    model_dir = root.parent / "src-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "gpt2"}')
    (model_dir / "weights.bin").write_bytes(bytes(range(256)) * 64)
    model = store.publish(model_dir, name="base-model", kind="causal-lm", stage="pretrain", inputs={"corpus": data},
                          metrics={"val_loss": 1.5})
    return store, data, model


def test_help_on_every_command(capsys):
    commands = [[], ["run"], ["config"], ["artifacts"], ["artifacts", "list"], ["artifacts", "show"],
                ["artifacts", "lineage"], ["artifacts", "verify"], ["data"], ["data", "demo"], ["generate"]]
    for cmd in commands:
        with pytest.raises(SystemExit) as info:
            build_parser().parse_args([*cmd, "--help"])
        assert info.value.code == 0
        assert "usage: rlhf" in capsys.readouterr().out


def test_bad_usage_exits_2_without_traceback():
    proc = subprocess.run([*RLHF, "run", "--from", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice: 'nope'" in proc.stderr and "Traceback" not in proc.stderr


def test_config_error_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  num_workers: -3\n")
    proc = subprocess.run([*RLHF, "run", "--preset", "tiny", "--config", str(bad), "--store", str(tmp_path / "s")],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: config error in {bad}: run.num_workers: expected a value >= 1, found -3"
    assert not (tmp_path / "s").exists()  # nothing written for a bad config


def test_input_without_only_is_usage_error(capsys):
    assert main(["run", "--preset", "tiny", "--input", "sft_model=x@v1"]) == 2
    assert "only meaningful with --only" in capsys.readouterr().err


def test_only_requires_model_inputs(capsys, tmp_path):
    assert main(["run", "--preset", "tiny", "--only", "reward", "--store", str(tmp_path)]) == 2
    assert "--only reward needs an artifact for sft_model" in capsys.readouterr().err


def test_only_rejects_unknown_role(capsys, tmp_path):
    assert main(["run", "--preset", "tiny", "--only", "sft", "--input", "policy=x@v1", "--store", str(tmp_path)]) == 2
    assert "sft has no input 'policy'" in capsys.readouterr().err


def test_artifacts_list_show_lineage_verify(tmp_path, capsys):
    root = tmp_path / "store"
    store, data, model = _publish_chain(root)
    assert main(["artifacts", "list", "--store", str(root), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {(m["name"], m["version"]) for m in listed} == {("corpus", 1), ("base-model", 1)}

    assert main(["artifacts", "show", "base-model@latest", "--store", str(root), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    for key in ("name", "version", "digest", "kind", "stage", "inputs", "metrics", "path"):
        assert key in shown
    assert shown["inputs"]["corpus"]["digest"] == data.digest and shown["metrics"] == {"val_loss": 1.5}
    assert Path(shown["path"], "config.json").is_file()

    assert main(["artifacts", "lineage", "base-model@v1", "--store", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("base-model@v1 (causal-lm") and out[1].strip().startswith("corpus: corpus@v1 (dataset")

    assert main(["artifacts", "verify", model.digest[:10], "--store", str(root)]) == 0
    assert capsys.readouterr().out.startswith("ok: base-model@v1")


def test_verify_flipped_byte_exits_1_naming_file(tmp_path):
    root = tmp_path / "store"
    _, _, model = _publish_chain(root)
    weights = Path(model.path) / "weights.bin"
    weights.chmod(0o644)
    blob = bytearray(weights.read_bytes())
    blob[100] ^= 0xFF
    weights.write_bytes(bytes(blob))
    proc = subprocess.run([*RLHF, "artifacts", "verify", "base-model", "--store", str(root)], capture_output=True, text=True)
    assert proc.returncode == 1 and "weights.bin" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_ref_exits_2(tmp_path, capsys):
    _publish_chain(tmp_path / "store")
    assert main(["artifacts", "show", "base-model@v7", "--store", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_data_demo_writes_four_sets(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["data", "demo", "--out", str(out), "--size", "tiny", "--seed", "3"]) == 0
    for name, columns in (("corpus", {"text"}), ("sft", {"prompt", "completion"}),
                          ("preferences", {"prompt", "chosen", "rejected"}), ("prompts", {"prompt"})):
        for split in ("train", "test"):
            lines = (out / name / f"{split}.jsonl").read_text().splitlines()
            assert lines and set(json.loads(lines[0])) == columns


def test_generate_rejects_non_causal_lm(tmp_path, capsys):
    _publish_chain(tmp_path / "store")
    assert main(["generate", "corpus@v1", "--prompt", "hi", "--store", str(tmp_path / "store")]) == 2
    assert "not a causal-lm" in capsys.readouterr().err


def test_generate_decodes_every_artifact_alike_whatever_its_generation_config(tmp_path):
    from flows.generate import generate_text
    from stages.common.hf import save_model_dir
    from tests.tiny_models import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer(["User: Describe the red cat.\nAssistant: The red cat is calm."] * 20, vocab_size=300)
    lm = build_tiny_model("llama", tok)
    store = ArtifactStore(str(tmp_path / "store"))
    save_model_dir(lm, tok, tmp_path / "plain")
    # a hub chat model's defaults (Qwen2.5-instruct style, exaggerated)
    lm.generation_config.update(do_sample=True, temperature=0.7, top_p=0.8, top_k=3, repetition_penalty=5.0,
                                no_repeat_ngram_size=1)
    save_model_dir(lm, tok, tmp_path / "hub")
    plain, hub = (store.publish(tmp_path / d, name=d, kind="causal-lm", stage="test") for d in ("plain", "hub"))
    for temperature in (0.0, 1.0):
        kw = {"prompt": "User: Describe the red cat.\nAssistant:", "max_new_tokens": 10, "temperature": temperature,
              "num_samples": 2, "seed": 3}  # fmt: skip
        assert generate_text(hub, **kw) == generate_text(plain, **kw)



def test_a_fresh_install_waits_for_prefects_first_server_start():
    """`import flows` gives Prefect's temporary server time to build its database on a slow machine's first run
    (Prefect's own default, 20 s, failed a fresh clone's first `rlhf run`); a user's own setting is kept."""
    code = ("import flows; from prefect.settings import get_current_settings; "
            "print(get_current_settings().server.ephemeral.startup_timeout_seconds)")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}

    def timeout_seen() -> int:
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                             check=True)  # fmt: skip
        return int(out.stdout.strip())

    assert timeout_seen() == 120
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "45"
    assert timeout_seen() == 45
