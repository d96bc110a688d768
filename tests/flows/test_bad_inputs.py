"""Every user mistake is one line: exit 2, a single `error: ...` line last on stderr, no traceback, nothing published.

Issue 12, item 1. Each case goes through the command line (`flows.cli.main` in-process, a few through the real
`rlhf` console script) and checks the same four things: exit code 2; stderr's last non-empty line is the only line
starting with "error:" and names what is wrong and where; no "Traceback" in stdout or stderr; the artifact store
holds exactly the manifests, objects and cache entries it held before (refused data is never published as a new
dataset version). Cases that need artifacts run on a copy of one store built once per module.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from flows.cli import main
from stages.common.store import ArtifactStore
from tests.tiny_models import publish_rows, publish_tiny_base_model, save_tiny_model_dir

RLHF = str(Path(sys.executable).parent / "rlhf")
TEXTS = ["User: Describe the cat.\nAssistant: The cat is happy.", "User: Describe the dog.\nAssistant: The dog is calm."]
SFT_ROWS = [{"prompt": "User: Describe the cat.\nAssistant:", "completion": " The cat is happy."},
            {"prompt": "User: Describe the dog.\nAssistant:", "completion": " The dog is calm."},
            {"prompt": "User: Describe the bird.\nAssistant:", "completion": " The bird is small."}]  # fmt: skip
PAIRS = [{"prompt": "User: Describe the cat.\nAssistant:", "chosen": " The cat is happy.", "rejected": " no"},
         {"prompt": "User: Describe the dog.\nAssistant:", "chosen": " The dog is calm.", "rejected": " no"},
         {"prompt": "User: Describe the bird.\nAssistant:", "chosen": " The bird is small.", "rejected": " no"}]  # fmt: skip


# --- the store every artifact case starts from, and the evidence each case checks -----------------------------------


@pytest.fixture(scope="module")
def base_store(tmp_path_factory) -> Path:
    """A store with a tiny causal LM (`tiny-lm@v1`), the same weights as a reward model, and a dataset (built once)."""
    root = tmp_path_factory.mktemp("bad-inputs") / "artifacts"
    store = ArtifactStore(str(root))
    publish_tiny_base_model(store, TEXTS * 20, name="tiny-lm")
    model_dir = save_tiny_model_dir("gpt2", TEXTS * 20, root.parent / "rm", head="reward-model")
    store.publish(model_dir, name="tiny-rm", kind="reward-model", stage="tests")
    publish_rows(store, "sft-data", SFT_ROWS[:2], SFT_ROWS[2:], fmt="sft")
    return root


@pytest.fixture
def store(base_store, tmp_path) -> Path:
    """A private copy of the module's store."""
    copy = tmp_path / "artifacts"
    shutil.copytree(base_store, copy, symlinks=True)
    return copy


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Run in a scratch folder: the default store (./artifacts) and MLflow's sqlite file land there, not in the repo."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RLHF_STORE", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def snapshot(root: Path) -> list[str]:
    """Every committed file of a store: manifests, objects and cache entries (tmp/ is scratch)."""
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.parts[len(root.parts)] != "tmp")


def assert_one_line_error(code: int, out: str, err: str, *expected: str) -> str:
    """Exit 2, the last non-empty stderr line is the only `error:` line and holds every `expected` text."""
    assert code == 2, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in out + err, out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    last = lines[-1]
    assert last.startswith("error: "), err
    assert [line for line in (out + err).splitlines() if line.startswith("error:")] == [last], out + err
    for text in expected:
        assert text in last, f"{text!r} not in {last!r}"
    return last


def cli(argv: list[str], capfd) -> tuple[int, str, str]:
    """`rlhf ARGV` in this process; argparse's own errors exit through SystemExit."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    captured = capfd.readouterr()
    return code, captured.out, captured.err


def run_args(store: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["run", "--preset", "tiny", "--store", str(store), "--set", f"run.work_dir={tmp_path / 'runs'}", *extra]


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


# --- data a stage refuses: found before Prefect, nothing published ---------------------------------------------------

SFT_ONLY = ("--only", "sft", "--input", "base_model=tiny-lm@v1")
REWARD_ONLY = ("--only", "reward", "--input", "sft_model=tiny-lm@v1")
PPO_ONLY = ("--only", "ppo", "--input", "sft_model=tiny-lm@v1", "--input", "reward_model=tiny-rm@v1")
PRETRAIN_ONLY = ("--only", "pretrain")

# (case id, --only arguments, data key, file name, rows or None for raw text, expected texts in the error line)
DATA_CASES = [
    ("missing-file", SFT_ONLY, "sft", "nowhere/sft.jsonl", None, ["nowhere/sft.jsonl", "no such file"]),
    ("empty-file", SFT_ONLY, "sft", "sft.jsonl", "", ["sft.jsonl", "empty"]),
    ("bad-json-line", SFT_ONLY, "sft", "sft.jsonl", [json.dumps(SFT_ROWS[0]), "{not json"], ["sft.jsonl", "cannot read"]),
    ("unknown-file-type", SFT_ONLY, "sft", "sft.csv", "prompt,completion\na,b\n", ["sft.csv", "unknown file type"]),
    ("missing-column", SFT_ONLY, "sft", "sft.jsonl", [{"prompt": r["prompt"]} for r in SFT_ROWS],
     ["sft.jsonl", "missing columns", "found columns: prompt"]),
    ("wrong-type", SFT_ONLY, "sft", "sft.jsonl", [{**r, "completion": 5} for r in SFT_ROWS],
     ["sft.jsonl", "row 0", "'completion'"]),
    ("empty-completion", SFT_ONLY, "sft", "sft.jsonl", [*SFT_ROWS, {"prompt": "User: hi\nAssistant:", "completion": " "}],
     ["sft.jsonl", "row 3", "'completion' is empty"]),
    ("messages-no-reply", SFT_ONLY, "sft", "sft.jsonl",
     [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
      {"messages": [{"role": "user", "content": "hi"}]}], ["sft.jsonl", "row 1", "assistant reply"]),
    ("chosen-equals-rejected", REWARD_ONLY, "preferences", "prefs.jsonl",
     [*PAIRS, {"prompt": "User: hi\nAssistant:", "chosen": " same", "rejected": " same"}],
     ["prefs.jsonl", "row 3", "chosen and rejected are the same"]),
    ("repeated-pair", REWARD_ONLY, "preferences", "prefs.jsonl", [*PAIRS, PAIRS[1]],
     ["prefs.jsonl", "row 3", "as row 1"]),
    ("empty-prompt", PPO_ONLY, "prompts", "prompts.jsonl", [{"prompt": "User: hi\nAssistant:"}, {"prompt": ""}],
     ["prompts.jsonl", "row 1", "'prompt' is empty"]),
    ("empty-text", PRETRAIN_ONLY, "corpus", "corpus.jsonl", [{"text": "the cat is happy ."}, {"text": "   "}],
     ["corpus.jsonl", "row 1", "'text' is empty"]),
]


@pytest.mark.parametrize(("only", "key", "name", "rows", "expected"), [c[1:] for c in DATA_CASES],
                         ids=[c[0] for c in DATA_CASES])  # fmt: skip
def test_bad_data_is_refused_before_publishing(only, key, name, rows, expected, store, tmp_path, capfd):
    path = tmp_path / name
    if rows is not None:
        path.write_text(rows) if isinstance(rows, str) else write_jsonl(path, rows)
    before = snapshot(store)
    code, out, err = cli(run_args(store, tmp_path, *only, "--set", f"data.{key}={path}"), capfd)
    assert_one_line_error(code, out, err, *expected)
    assert snapshot(store) == before


@pytest.mark.parametrize("source", ["demo-data/sft", "my_sft_rows", "org/data-set"])
def test_a_missing_relative_path_is_not_looked_up_on_the_hub(source, store, tmp_path, capfd):
    """A relative path that is not there (a Ray job's upload excludes demo-data/) was fetched from the Hugging Face
    Hub under that name; the Hub is reached only through `hf:NAME` (issue 27 item 10)."""
    before = snapshot(store)
    code, out, err = cli(run_args(store, tmp_path, *SFT_ONLY, "--set", f"data.sft={source}"), capfd)
    assert_one_line_error(code, out, err, source, "no such file or directory", f"hf:{source}")
    assert snapshot(store) == before


def test_bad_data_of_a_late_stage_fails_before_the_first_stage(tmp_path, capfd):
    """The whole pipeline on a fresh store: the preference file is refused before the demo corpus is published or
    pretraining starts (the run is validated first, nothing waits for the stages ahead of reward)."""
    store = tmp_path / "fresh"
    path = write_jsonl(tmp_path / "prefs.jsonl", [*PAIRS, PAIRS[0]])
    code, out, err = cli(run_args(store, tmp_path, "--set", f"data.preferences={path}"), capfd)
    assert_one_line_error(code, out, err, "prefs.jsonl", "row 3", "as row 0")
    assert snapshot(store) == []


def test_column_map_naming_a_missing_column(store, tmp_path, capfd):
    path = write_jsonl(tmp_path / "prefs.jsonl", PAIRS)
    before = snapshot(store)
    code, out, err = cli(run_args(store, tmp_path, *REWARD_ONLY, "--set", f"data.preferences={path}",
                                  "--set", "data.columns.preferences={chosen: better}"), capfd)  # fmt: skip
    assert_one_line_error(code, out, err, "prefs.jsonl", "chosen <- better", "no such column")
    assert snapshot(store) == before


def test_sft_rows_longer_than_the_context(store, tmp_path, capfd):
    long_rows = [*SFT_ROWS, {"prompt": "User: Describe the cat.\nAssistant:", "completion": " cat" * 400}]
    path = write_jsonl(tmp_path / "sft.jsonl", long_rows)
    before = snapshot(store)
    code, out, err = cli(run_args(store, tmp_path, *SFT_ONLY, "--set", f"data.sft={path}"), capfd)
    assert_one_line_error(code, out, err, "sft: data", "sft.jsonl", "1 of 3 rows are longer than the 128-token limit")
    assert snapshot(store) == before


def test_prompts_longer_than_the_context(store, tmp_path, capfd):
    rows = [{"prompt": "User: Describe the cat.\nAssistant:"}, {"prompt": "User: " + "cat " * 400 + "\nAssistant:"}]
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    before = snapshot(store)
    code, out, err = cli(run_args(store, tmp_path, *PPO_ONLY, "--set", f"data.prompts={path}"), capfd)
    assert_one_line_error(code, out, err, "prompts.jsonl", "expected at most 112 (context 128 minus ppo.max_new_tokens")
    assert snapshot(store) == before


def test_preference_pairs_longer_than_the_context(store, tmp_path, capfd):
    rows = [*PAIRS, {"prompt": "User: Describe the cat.\nAssistant:", "chosen": " cat" * 400, "rejected": " no"}]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    before = snapshot(store)
    code, out, err = cli(run_args(store, tmp_path, *REWARD_ONLY, "--set", f"data.preferences={path}"), capfd)
    assert_one_line_error(code, out, err, "reward: preferences", "prefs.jsonl", "longer than the")
    assert snapshot(store) == before


# --- inputs and refs --------------------------------------------------------------------------------------------------

REF_CASES = [
    ("wrong-kind-input", ["--only", "sft", "--input", "base_model=sft-data@v1"], ["--input base_model=sft-data@v1",
                                                                              "kind is 'dataset'", "expected 'causal-lm'"]),
    ("missing-input-ref", ["--only", "reward", "--input", "sft_model=sft-model@v9"], ["--input sft_model=sft-model@v9", "no such artifact"]),
    ("missing-input-version", ["--only", "reward", "--input", "sft_model=tiny-lm@v9"], ["--input sft_model=tiny-lm@v9", "no such version"]),
    ("bad-ref-syntax", ["--only", "reward", "--input", "sft_model=tiny-lm@@x"], ["--input sft_model=tiny-lm@@x", "bad artifact ref"]),
    ("input-without-only", ["--input", "sft_model=tiny-lm@v1"], ["--input", "only meaningful with --only"]),
    ("input-not-role-ref", ["--only", "sft", "--input", "base_model"], ["--input 'base_model'", "ROLE=REF"]),
    ("unknown-only-role", ["--only", "sft", "--input", "policy=tiny-lm@v1"], ["sft has no input 'policy'"]),
    ("only-missing-input", ["--only", "reward"], ["--only reward needs an artifact for sft_model"]),
    ("unknown-only-stage", ["--only", "critic"], ["--only", "invalid choice: 'critic'"]),
    ("from-and-only", ["--from", "sft", "--only", "reward"], ["--only", "not allowed with argument --from"]),
    ("missing-base-model", ["--set", "sft.base_model=no-such-model@latest"], ["sft.base_model: no-such-model@latest", "no such artifact"]),
    ("base-model-path-missing", ["--set", "sft.base_model=/nowhere/my-llama"], ["sft.base_model '/nowhere/my-llama'", "no such directory"]),
]


@pytest.mark.parametrize(("extra", "expected"), [c[1:] for c in REF_CASES], ids=[c[0] for c in REF_CASES])
def test_bad_inputs_and_refs(extra, expected, store, tmp_path, capfd):
    before = snapshot(store)
    code, out, err = cli(run_args(store, tmp_path, *extra), capfd)
    assert_one_line_error(code, out, err, *expected)
    assert snapshot(store) == before


# --- config and resources: refused before anything starts -----------------------------------------------------------

CONFIG_CASES = [
    ("unknown-key", ["--set", "sft.max_stepz=5"], ["sft.max_stepz", "--set"]),
    ("unknown-section", ["--set", "sftt.max_steps=5"], ["sftt"]),
    ("wrong-type", ["--set", "sft.max_steps=many"], ["sft.max_steps", "many"]),
    ("out-of-range", ["--set", "run.num_workers=0"], ["run.num_workers", ">= 1", "found 0"]),
    ("n_embd-not-divisible", ["--set", "pretrain.n_embd=65"], ["pretrain.n_head", "n_embd=65"]),
    ("vocab-too-small", ["--set", "pretrain.vocab_size=100"], ["pretrain.vocab_size", "found 100"]),
    ("use-gpu-without-gpu", ["--set", "run.use_gpu=true"], ["GPU"]),
    ("bf16-without-gpu", ["--set", "sft.bf16=true"], ["sft.bf16", "needs a GPU"]),
    ("unknown-align-method", ["--set", "align.methods=[ppo,foo]"], ["align.methods", "foo"]),
    ("dead-ray-address", ["--set", "run.ray_address=127.0.0.1:1"], ["127.0.0.1:1", "does not answer"]),
    ("gate-threshold-string", ["--set", "reward.gate.min_eval_accuracy=high"], ["reward.gate.min_eval_accuracy", "high"]),
    ("unknown-preset", ["--preset", "huge"], ["--preset", "invalid choice: 'huge'"]),
    ("missing-config-file", ["--config", "/nowhere/cfg.yaml"], ["/nowhere/cfg.yaml"]),
]


@pytest.mark.parametrize(("extra", "expected"), [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config(extra, expected, store, tmp_path, capfd):
    before = snapshot(store)
    code, out, err = cli(run_args(store, tmp_path, *extra), capfd)
    assert_one_line_error(code, out, err, *expected)
    assert snapshot(store) == before


@pytest.mark.parametrize(("text", "expected"), [
    ("run:\n  num_workers: [1\n", ["bad.yaml"]),
    ("- just\n- a list\n", ["bad.yaml"]),
    ("sft:\n  max_steps: -4\n", ["bad.yaml", "sft.max_steps"]),
], ids=["bad-yaml", "yaml-not-a-mapping", "yaml-out-of-range"])  # fmt: skip
def test_bad_config_file(text, expected, store, tmp_path, capfd):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    before = snapshot(store)
    code, out, err = cli(run_args(store, tmp_path, "--config", str(bad)), capfd)
    assert_one_line_error(code, out, err, *expected)
    assert snapshot(store) == before


def test_unknown_store_protocol(tmp_path, capfd):
    code, out, err = cli(["run", "--preset", "tiny", "--store", "foo://bucket/rlhf"], capfd)
    assert_one_line_error(code, out, err, "foo://bucket/rlhf", "foo")
    code, out, err = cli(["artifacts", "list", "--store", "foo://bucket/rlhf"], capfd)
    assert_one_line_error(code, out, err, "foo://bucket/rlhf", "foo")


# --- artifact commands ----------------------------------------------------------------------------------------------


def test_import_of_a_dir_without_config_json(store, tmp_path, capfd):
    src = tmp_path / "my-model"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"\0" * 16)
    before = snapshot(store)
    code, out, err = cli(["artifacts", "import", str(src), "--kind", "causal-lm", "--name", "mine", "--store", str(store)],
                         capfd)  # fmt: skip
    assert_one_line_error(code, out, err, str(src), "config.json")
    assert snapshot(store) == before


def test_show_of_a_missing_ref(store, capfd):
    code, out, err = cli(["artifacts", "show", "policy@v3", "--store", str(store)], capfd)
    assert_one_line_error(code, out, err, "policy@v3", "no such")


# --- issue 27 item 12: inputs that used to end in a traceback, and read commands that created a store ---------------


@pytest.mark.parametrize("command", [
    ["artifacts", "list"], ["artifacts", "show", "tiny-lm@v1"], ["artifacts", "lineage", "tiny-lm"],
    ["artifacts", "verify", "tiny-lm"], ["run", "--preset", "tiny"],
], ids=["list", "show", "lineage", "verify", "run"])  # fmt: skip
def test_store_naming_a_file(command, tmp_path, capfd):
    a_file = tmp_path / "artifacts.txt"
    a_file.write_text("not a store\n")
    code, out, err = cli([*command, "--store", str(a_file)], capfd)
    assert_one_line_error(code, out, err, str(a_file), "a file")
    assert a_file.read_text() == "not a store\n" and sorted(p.name for p in tmp_path.iterdir()) == ["artifacts.txt"]


@pytest.mark.parametrize("command", [
    ["artifacts", "list"], ["artifacts", "list", "--json"], ["artifacts", "show", "tiny-lm@v1"],
    ["artifacts", "lineage", "tiny-lm"], ["artifacts", "verify", "tiny-lm"], ["generate", "tiny-lm", "--prompt", "hi"],
    ["eval", "tiny-lm"],
], ids=["list", "list-json", "show", "lineage", "verify", "generate", "eval"])  # fmt: skip
def test_read_command_on_a_mistyped_store_creates_nothing(command, tmp_path, capfd):
    typo = tmp_path / "artifcats"
    code, out, err = cli([*command, "--store", str(typo)], capfd)
    assert_one_line_error(code, out, err, str(typo), "no artifact store")
    assert not typo.exists()


@pytest.mark.parametrize("command", [["config"], ["run", "--preset", "tiny", "--store", "artifacts"]],
                         ids=["config", "run"])  # fmt: skip
def test_config_file_not_utf8(command, store, tmp_path, capfd):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("run:\n  seed: 3  # d\xe9j\xe0 vu\n".encode("latin-1"))
    before = snapshot(store)
    code, out, err = cli([*command, "--config", str(bad)], capfd)
    assert_one_line_error(code, out, err, str(bad), "UTF-8")
    assert snapshot(store) == before


def test_ray_address_auto_without_a_cluster(store, tmp_path, capfd, monkeypatch):
    """`auto` joins a running cluster; with none, one line before Prefect or Ray start (Ray's own discovery is told
    there is none, so a Ray another test left running on this machine does not count)."""
    import ray._private.services as services

    monkeypatch.setattr(services, "find_gcs_addresses", lambda: [])
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    # the session's local Ray may already run in this process (an earlier module), so watch ray.init being called
    inits: list[tuple] = []
    real_init = ray.init
    monkeypatch.setattr(ray, "init", lambda *a, **kw: inits.append((a, kw)) or real_init(*a, **kw))
    before = snapshot(store)
    code, out, err = cli(run_args(store, tmp_path, "--set", "run.ray_address=auto"), capfd)
    assert_one_line_error(code, out, err, "ray address 'auto'", "no running Ray cluster")
    assert snapshot(store) == before
    assert inits == []


@pytest.mark.parametrize("name", ["tiny-data\n", "tiny-data\r\n", " tiny-data", "tiny data"],
                         ids=["newline", "crlf", "leading-space", "space"])  # fmt: skip
def test_artifact_name_with_whitespace(name, store, tmp_path, capfd):
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    before = snapshot(store)
    code, out, err = cli(["artifacts", "import", data, "--kind", "dataset", "--name", name, "--store", str(store)], capfd)
    assert_one_line_error(code, out, err, f"artifact name {name!r}")
    assert snapshot(store) == before


# --- the real console script: the same evidence from a separate process --------------------------------------------


def rlhf(*argv: str, cwd: Path) -> tuple[int, str, str]:
    proc = subprocess.run([RLHF, *argv], capture_output=True, text=True, cwd=cwd, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def test_console_script_unknown_store_protocol(tmp_path):
    code, out, err = rlhf("run", "--preset", "tiny", "--store", "foo://bucket/rlhf", cwd=tmp_path)
    assert_one_line_error(code, out, err, "foo://bucket/rlhf")
    assert not (tmp_path / "artifacts").exists()


def test_console_script_bad_data(store, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [json.dumps(SFT_ROWS[0]), "{not json"])
    before = snapshot(store)
    code, out, err = rlhf(*run_args(store, tmp_path, *SFT_ONLY, "--set", f"data.sft={path}"), cwd=tmp_path)
    assert_one_line_error(code, out, err, "sft.jsonl", "cannot read")
    assert snapshot(store) == before


def test_console_script_bad_data_on_a_fresh_store(tmp_path):
    store = tmp_path / "fresh"
    path = write_jsonl(tmp_path / "sft.jsonl", [*SFT_ROWS, {"prompt": "User: hi\nAssistant:", "completion": 7}])
    code, out, err = rlhf(*run_args(store, tmp_path, "--set", f"data.sft={path}"), cwd=tmp_path)
    assert_one_line_error(code, out, err, "sft.jsonl", "row 3", "'completion'")
    assert snapshot(store) == []
