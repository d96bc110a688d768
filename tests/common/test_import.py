"""`rlhf artifacts import`: local HF models, tokenizers and data sets become verified artifacts, or one-line refusals.

Fast tests (no Ray): tiny random models of four architectures saved as real HF directories, imported through the CLI
in-process (plus real subprocesses for the exit code and stderr), then loaded back with plain transformers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from flows.cli import build_parser, main
from stages.common.artifact_import import ArtifactImportError, import_model, safetensors_header
from stages.common.store import ArtifactStore
from stages.data.ingest import import_dataset, infer_format
from tests.tiny_models import TINY_ARCHS, build_tiny_model, build_tiny_tokenizer, save_tiny_model_dir

TEXTS = [
    f"User: Describe the {noun}.\nAssistant: The {noun} is {adj} and {adj2}."
    for noun in ("cat", "dog", "fox", "owl", "bee", "elk")
    for adj, adj2 in (("calm", "brave"), ("sad", "rude"), ("kind", "quick"))
]
RLHF = str(Path(sys.executable).parent / "rlhf")


def _import(capsys, src, kind: str, name: str, store: Path, *extra: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what building the source dir printed (save_pretrained's progress bar)
    code = main(["artifacts", "import", str(src), "--kind", kind, "--name", name, "--store", str(store), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def _snapshot(root: Path) -> dict[str, int]:
    """Every file under a store root with its size: what 'the store is unchanged' compares."""
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def _param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied embedding once, as safetensors


# ------------------------------------------------------------------------------------------------ pure pieces


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["text"], "corpus"),
        (["prompt", "completion"], "sft"),
        (["messages"], "sft"),
        (["prompt", "chosen", "rejected"], "preferences"),  # also holds `prompt`, but preferences is more specific
        (["id", "rejected", "prompt", "chosen"], "preferences"),
        (["prompt", "source"], "prompts"),
    ],
)
def test_infer_format_picks_the_most_specific_match(columns, expected):
    assert infer_format(columns, "x.jsonl") == expected


def test_infer_format_refuses_ambiguous_or_unknown_columns():
    with pytest.raises(ArtifactImportError, match=r"fit more than one format \(corpus, sft\); pass --format"):
        infer_format(["text", "prompt", "completion"], "x.jsonl")
    with pytest.raises(ArtifactImportError, match="columns question, answer match no data format"):
        infer_format(["question", "answer"], "x.jsonl")


def test_safetensors_header_counts_parameters_and_catches_truncation(tmp_path):
    tokenizer = build_tiny_tokenizer(TEXTS)
    model = build_tiny_model("qwen2", tokenizer)  # tied embedding: stored once
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    header = safetensors_header(weights)
    n = sum(int(t["shape"][0]) * (int(t["shape"][1]) if len(t["shape"]) > 1 else 1) for t in header.values())
    assert n == _param_count(model)
    assert header["model.embed_tokens.weight"]["shape"] == [len(tokenizer), 32]
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(weights.read_bytes()[:-4])
    with pytest.raises(ArtifactImportError, match="truncated or damaged safetensors file"):
        safetensors_header(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ArtifactImportError, match="header is not JSON"):
        safetensors_header(junk)


# ------------------------------------------------------------------------------------------------ models


# (arch, tokenizer variant): Llama without a pad token (as Llama ships), GPT-NeoX without a chat template.
VARIANTS = [
    ("llama", {"pad_token": False}),
    ("qwen2", {}),
    ("gpt_neox", {"chat_template": False}),
    ("gpt2", {}),
]


@pytest.mark.parametrize(("arch", "variant"), VARIANTS, ids=[a for a, _ in VARIANTS])
def test_import_each_architecture_then_load_with_plain_transformers(capsys, tmp_path, arch, variant):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert set(TINY_ARCHS) == {a for a, _ in VARIANTS}
    src = save_tiny_model_dir(arch, TEXTS, tmp_path / "src", **variant)
    (src / "README.md").write_text("a model card\n")
    (src / "training_args.bin").write_bytes(b"\x80\x04pickle")  # a pickle next to safetensors weights: left behind
    store_root = tmp_path / "store"

    code, out, err = _import(capsys, src, "causal-lm", f"{arch}-lm", store_root)
    assert (code, err) == (0, "")
    assert out.startswith(f"imported {src} as {arch}-lm@v1 (causal-lm, ")
    code, out, err = _import(capsys, src, "causal-lm", f"{arch}-lm", store_root)
    assert (code, out.split(" (")[0]) == (0, f"already in the store as {arch}-lm@v1")

    store = ArtifactStore(store_root)
    assert [m["version"] for m in store.list(f"{arch}-lm")] == [1]
    art = store.get(f"{arch}-lm@latest", kind="causal-lm")
    assert "training_args.bin" not in art.manifest["files"] and "README.md" not in art.manifest["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(art.manifest["files"])
    extra = art.manifest["extra"]
    assert extra["files_left_out"] == ["README.md", "training_args.bin"]
    assert (art.manifest["config"]["source"], art.manifest["stage"]) == (str(src), "import")
    assert extra["model_type"] == arch and extra["architectures"] == json.loads((src / "config.json").read_text())[
        "architectures"]

    original = AutoModelForCausalLM.from_pretrained(src).eval()
    loaded = AutoModelForCausalLM.from_pretrained(art.path).eval()
    tokenizer = AutoTokenizer.from_pretrained(art.path)
    assert art.metrics == {"n_params": _param_count(original), "vocab_size": len(tokenizer)}
    assert (tokenizer.pad_token is None) == (variant.get("pad_token") is False)
    assert bool(tokenizer.chat_template) == variant.get("chat_template", True) == extra["chat_template"]
    ids = tokenizer(TEXTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, original(ids).logits)


def test_import_sharded_weights_and_python_api_reimport(tmp_path):
    from transformers import AutoModelForCausalLM

    src = save_tiny_model_dir("gpt2", TEXTS, tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(src)
    (src / "model.safetensors").unlink()
    model.save_pretrained(src, max_shard_size="100KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    store = ArtifactStore(tmp_path / "store")
    art = import_model(store, src, "causal-lm", "sharded")
    assert set(shards) | {"model.safetensors.index.json"} <= set(art.manifest["files"])
    assert art.metrics["n_params"] == _param_count(model)
    again = import_model(store, str(src), "causal-lm", "sharded")
    assert (again.ref, again.digest) == ("sharded@v1", art.digest)
    AutoModelForCausalLM.from_pretrained(art.path)


def test_import_into_an_object_store_uri(tmp_path, monkeypatch):
    """A remote store (memory://) gets the files uploaded from the staged links, and re-import finds them."""
    import uuid

    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path / "cache"))  # where remote objects are materialised
    src = save_tiny_model_dir("llama", TEXTS, tmp_path / "src")
    store = ArtifactStore(f"memory://import-test-{uuid.uuid4().hex}")
    art = import_model(store, src, "causal-lm", "remote-llama")
    assert store.verify("remote-llama@v1").digest == art.digest
    again = import_model(store, src, "causal-lm", "remote-llama")
    assert again.ref == "remote-llama@v1" and [m["version"] for m in store.list("remote-llama")] == [1]
    AutoModelForCausalLM.from_pretrained(again.path)


def test_import_reward_model_and_tokenizer(capsys, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm_src = save_tiny_model_dir("llama", TEXTS, tmp_path / "rm", head="reward-model")
    lm_src = save_tiny_model_dir("qwen2", TEXTS, tmp_path / "lm")
    store_root = tmp_path / "store"
    assert _import(capsys, rm_src, "reward-model", "my-rm", store_root)[0] == 0
    assert _import(capsys, lm_src, "tokenizer", "my-tok", store_root)[0] == 0
    store = ArtifactStore(store_root)
    rm = store.get("my-rm", kind="reward-model")
    scores = AutoModelForSequenceClassification.from_pretrained(rm.path)(
        **AutoTokenizer.from_pretrained(rm.path)(TEXTS[:1], return_tensors="pt")
    ).logits
    assert scores.shape == (1, 1)
    tok = store.get("my-tok", kind="tokenizer")
    assert set(tok.manifest["files"]) == {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert tok.metrics == {"vocab_size": len(AutoTokenizer.from_pretrained(tok.path))}


# ------------------------------------------------------------------------------------------------ bad directories


def _no_config(d: Path) -> None:
    (d / "config.json").unlink()


def _no_weights(d: Path) -> None:
    (d / "model.safetensors").unlink()


def _pickled_weights(d: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()


def _truncated_weights(d: Path) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def _custom_model_type(d: Path) -> None:
    config = json.loads((d / "config.json").read_text())
    config.update(model_type="t5", architectures=["T5ForConditionalGeneration"])
    (d / "config.json").write_text(json.dumps(config))


def _no_tokenizer(d: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (d / name).unlink()


def _tokenizer_from_a_bigger_model(d: Path) -> None:
    """The tokenizer of another run, with more tokens than this model's embedding has rows."""
    other = save_tiny_model_dir("gpt2", TEXTS + [t.upper() for t in TEXTS], d.parent / "bigger")
    rows = json.loads((d / "config.json").read_text())["vocab_size"]
    assert json.loads((other / "config.json").read_text())["vocab_size"] > rows
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(other / name, d / name)


def _missing_shard(d: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(d)
    (d / "model.safetensors").unlink()
    model.save_pretrained(d, max_shard_size="100KB")
    (d / sorted(d.glob("model-*.safetensors"))[-1].name).unlink()


# (case id, how to build the source dir, damage, kind, the message must contain)
BAD_DIRS = [
    ("no-config", {}, _no_config, "causal-lm", "no config.json"),
    ("no-weights", {}, _no_weights, "causal-lm", "no model weights (expected model.safetensors"),
    ("pickled-weights", {}, _pickled_weights, "causal-lm", "pickled weights (pytorch_model.bin) are refused"),
    ("truncated-weights", {}, _truncated_weights, "causal-lm", "truncated or damaged safetensors file"),
    ("missing-shard", {}, _missing_shard, "causal-lm", "which is missing (1 of"),
    ("not-a-causal-lm-type", {}, _custom_model_type, "causal-lm", "model_type 't5' is not loadable by AutoModelForCausalLM"),
    ("classifier-as-causal-lm", {"head": "reward-model"}, None, "causal-lm",
     "architectures GPT2ForSequenceClassification is not a causal LM"),
    ("no-tokenizer", {}, _no_tokenizer, "causal-lm", "no tokenizer next to the model"),
    ("tokenizer-too-big", {"vocab_size": 270}, _tokenizer_from_a_bigger_model, "causal-lm",
     "does not fit the model's embedding"),
    ("causal-lm-as-reward-model", {}, None, "reward-model", "must be a sequence classifier with num_labels 1, found "
     "architectures GPT2LMHeadModel"),
    ("two-label-reward-model", {"head": "reward-model", "num_labels": 2}, None, "reward-model",
     "must have num_labels 1 (one scalar score), found num_labels 2"),
    ("no-tokenizer-files", {}, _no_tokenizer, "tokenizer", "no tokenizer files"),
]


@pytest.mark.parametrize(("build", "damage", "kind", "message"), [c[1:] for c in BAD_DIRS], ids=[c[0] for c in BAD_DIRS])
def test_bad_directory_is_one_line_exit_2_and_publishes_nothing(capsys, tmp_path, build, damage, kind, message):
    store_root = tmp_path / "store"
    good = save_tiny_model_dir("gpt2", TEXTS, tmp_path / "good")
    assert _import(capsys, good, "causal-lm", "good", store_root)[0] == 0
    before = _snapshot(store_root)
    bad = save_tiny_model_dir("gpt2", TEXTS, tmp_path / "bad", **build)
    if damage is not None:
        damage(bad)
    code, out, err = _import(capsys, bad, kind, "bad", store_root)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert _snapshot(store_root) == before


def test_bad_paths_and_flags(capsys, tmp_path):
    store_root = tmp_path / "store"
    (tmp_path / "file.txt").write_text("hello\n")
    cases = [
        ([str(tmp_path / "nope"), "--kind", "causal-lm", "--name", "x"], "no such directory"),
        ([str(tmp_path / "file.txt"), "--kind", "causal-lm", "--name", "x"], "found a file"),
        ([str(tmp_path / "nope.jsonl"), "--kind", "dataset", "--name", "x"], "no such file or directory"),
        ([str(tmp_path / "file.txt"), "--kind", "tokenizer", "--name", "x", "--format", "sft"],
         "--format applies to --kind dataset only"),
        ([str(tmp_path), "--kind", "causal-lm", "--name", "../escape"], "artifact name '../escape'"),
    ]
    for argv, message in cases:
        assert main(["artifacts", "import", *argv, "--store", str(store_root)]) == 2
        out, err = capsys.readouterr()
        assert message in err and err.count("\n") == 1, (argv, err)
    assert ArtifactStore(store_root).list() == []


def _weights_link_out(d: Path) -> None:
    """model.safetensors is a link to a file outside the folder (a secret, another user's weights)."""
    (d / "model.safetensors").rename(d.parent / "elsewhere.safetensors")
    (d / "model.safetensors").symlink_to(d.parent / "elsewhere.safetensors")


def _tokenizer_link_out(d: Path) -> None:
    (d / "tokenizer.json").rename(d.parent / "tokenizer.json")
    (d / "tokenizer.json").symlink_to(Path("..") / "tokenizer.json")  # relative, resolved outside


def _template_dir_link_out(d: Path) -> None:
    outside = d.parent / "templates"
    outside.mkdir()
    (outside / "tool.jinja").write_text("{{ messages }}")
    (d / "additional_chat_templates").symlink_to(outside, target_is_directory=True)


def _shard_named_outside(d: Path, shard: str) -> None:
    """An index whose weight_map names a shard that is not a plain relative name inside the folder."""
    (d / "model.safetensors").rename(d.parent / "outside.safetensors")
    header = safetensors_header(d.parent / "outside.safetensors")
    index = {"metadata": {}, "weight_map": {k: shard for k in header}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


ESCAPES = [
    ("weights-link-out", _weights_link_out, "model.safetensors is a link to"),
    ("tokenizer-link-out", _tokenizer_link_out, "tokenizer.json is a link to"),
    ("template-dir-link-out", _template_dir_link_out, "additional_chat_templates/tool.jinja is a link to"),
    ("shard-dotdot", lambda d: _shard_named_outside(d, "../outside.safetensors"),
     "names shard '../outside.safetensors', which is not a plain file name inside the folder"),
    ("shard-absolute", lambda d: _shard_named_outside(d, str(d.parent / "outside.safetensors")),
     "which is not a plain file name inside the folder"),
    ("shard-backslash", lambda d: _shard_named_outside(d, "..\\outside.safetensors"),
     "which is not a plain file name inside the folder"),
    ("shard-not-a-string", lambda d: _shard_named_outside(d, 7), "names shard 7, which is not a plain file name"),
]


@pytest.mark.parametrize(("damage", "message"), [c[1:] for c in ESCAPES], ids=[c[0] for c in ESCAPES])
def test_import_refuses_files_from_outside_the_folder(capsys, monkeypatch, tmp_path, damage, message):
    """A link leaving the model folder, or a shard name that is not a plain relative name, is one line and exit 2:
    nothing outside the folder is read into the store and no link is left outside the staging folder."""
    store_root = tmp_path / "store"
    bad = save_tiny_model_dir("gpt2", TEXTS, tmp_path / "bad")
    damage(bad)
    staging_root = tmp_path / "tmp"
    staging_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging_root))
    for _ in range(2):  # a second import ran into the link the first left outside its staging folder
        code, out, err = _import(capsys, bad, "causal-lm", "bad", store_root)
        assert (code, out) == (2, ""), err
        assert err.startswith(f"error: import {bad}: ") and err.count("\n") == 1, err
        assert message in err, err
    assert ArtifactStore(store_root).list() == []
    assert list(staging_root.iterdir()) == []  # the staging folder is gone and nothing was linked next to it


def test_import_accepts_links_inside_the_folder_and_the_hub_cache_layout(tmp_path):
    """Links that stay in the folder are fine, and so is the Hugging Face hub cache (snapshots/REV/* -> ../../blobs/*),
    the folder `huggingface_hub.snapshot_download` returns."""
    src = save_tiny_model_dir("gpt2", TEXTS, tmp_path / "src")
    (src / "weights").mkdir()
    (src / "model.safetensors").rename(src / "weights" / "real.safetensors")
    (src / "model.safetensors").symlink_to(Path("weights") / "real.safetensors")
    store = ArtifactStore(tmp_path / "store")
    inside = import_model(store, src, "causal-lm", "inside")

    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in sorted(p for p in src.iterdir() if p.is_file()):
        blob = repo / "blobs" / f"blob-{f.name}"
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    hub = import_model(store, snapshot, "causal-lm", "inside")
    assert hub.digest == inside.digest and hub.ref == "inside@v1"


@pytest.mark.parametrize("damage", [_no_config, _tokenizer_from_a_bigger_model], ids=["no-config", "tokenizer-too-big"])
def test_cli_subprocess_refusal_is_a_single_stderr_line(tmp_path, damage):
    bad = save_tiny_model_dir("gpt2", TEXTS, tmp_path / "bad", vocab_size=270)
    damage(bad)
    store_root = tmp_path / "store"
    proc = subprocess.run(
        [RLHF, "artifacts", "import", str(bad), "--kind", "causal-lm", "--name", "bad", "--store", str(store_root)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: import {bad}: "), proc.stderr
    assert not (store_root / "manifests").exists() or not any((store_root / "manifests").iterdir())


def test_import_help():
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["artifacts", "import", "--help"])
    assert info.value.code == 0


# ------------------------------------------------------------------------------------------------ data sets


def test_import_jsonl_preferences_inferred_and_reimported(capsys, tmp_path):
    from stages.data.read import load_dataset_artifact

    rows = [{"prompt": f"User: Describe the {n}.\nAssistant:", "chosen": f" The {n} is kind.",
             "rejected": f" The {n} is rude.", "id": i} for i, n in enumerate(["cat", "dog", "fox", "owl", "bee"] * 4)]
    rows = [dict(r, prompt=r["prompt"] + " " * r["id"]) for r in rows]  # no duplicate pairs
    src = tmp_path / "prefs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store_root = tmp_path / "store"
    code, out, err = _import(capsys, src, "dataset", "my-prefs", store_root)
    assert (code, err) == (0, "") and out.startswith(f"imported {src} as my-prefs@v1 (dataset, 2 files")
    code, out, _ = _import(capsys, src, "dataset", "my-prefs", store_root)
    assert (code, out.split(" (")[0]) == (0, "already in the store as my-prefs@v1")
    art = ArtifactStore(store_root).get("my-prefs", kind="dataset")
    assert set(art.manifest["files"]) == {"train.jsonl", "test.jsonl"}
    assert art.manifest["extra"]["format"] == "preferences" and art.manifest["config"]["source"] == str(src)
    assert art.metrics == {"train_rows": 18, "test_rows": 2}  # round(20 * 0.1) held out
    assert load_dataset_artifact(art, "test").column_names == ["prompt", "chosen", "rejected"]


def test_import_save_to_disk_folders(tmp_path):
    import datasets

    from stages.data.read import load_dataset_artifact

    sft = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(6)]),
        "test": datasets.Dataset.from_list([{"prompt": "q-test", "completion": " a-test"}]),
    })
    sft.save_to_disk(str(tmp_path / "sft-saved"))
    datasets.Dataset.from_list([{"text": f"line {i}"} for i in range(10)]).save_to_disk(str(tmp_path / "corpus-saved"))
    store = ArtifactStore(tmp_path / "store")

    art = import_dataset(store, tmp_path / "sft-saved", "my-sft")
    assert (art.manifest["extra"]["format"], art.manifest["config"]["test_split"]) == ("sft", "given")
    assert [dict(r) for r in load_dataset_artifact(art, "test")] == [{"prompt": "q-test", "completion": " a-test"}]
    corpus = import_dataset(store, tmp_path / "corpus-saved", "my-corpus")
    assert corpus.manifest["extra"]["format"] == "corpus"
    assert corpus.metrics == {"train_rows": 9, "test_rows": 1}


def test_import_ambiguous_dataset_needs_format(capsys, tmp_path):
    src = tmp_path / "mixed.jsonl"
    src.write_text("".join(json.dumps({"text": f"t{i}", "prompt": f"p{i}", "completion": f" c{i}"}) + "\n"
                           for i in range(4)))
    store_root = tmp_path / "store"
    code, _, err = _import(capsys, src, "dataset", "mixed", store_root)
    assert code == 2 and "fit more than one format (corpus, sft); pass --format" in err
    code, _, _ = _import(capsys, src, "dataset", "mixed", store_root, "--format", "sft")
    art = ArtifactStore(store_root).get("mixed")
    assert code == 0 and art.manifest["extra"]["format"] == "sft"
    assert json.loads((Path(art.path) / "train.jsonl").read_text().splitlines()[0]).keys() == {"prompt", "completion"}
