"""Config loading: every error class gives one line naming source, key path, expectation and the value found."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flows.config import PipelineConfig, load_config, preset_path
from stages.common.config import ConfigError, apply_overrides, deep_merge, parse_override


def _error(tmp_path, text: str | None = None, overrides: list[str] | None = None) -> str:
    cfg_file = None
    if text is not None:
        cfg_file = tmp_path / "my.yaml"
        cfg_file.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config("tiny", str(cfg_file) if cfg_file else None, overrides or [])
    message = str(info.value)
    assert "\n" not in message
    return message


def test_presets_load_and_differ():
    tiny, demo, gpu = (load_config(p) for p in ("tiny", "demo", "gpu-cluster"))
    assert isinstance(tiny, PipelineConfig)
    assert tiny.data.demo.size == "tiny" and demo.data.demo.size == "demo"
    assert gpu.run.use_gpu is True and tiny.run.use_gpu is False
    assert tiny.to_dict() != demo.to_dict()


def test_unknown_key_names_file_and_path(tmp_path):
    msg = _error(tmp_path, "run:\n  sed: 3\n")
    assert msg == f"config error in {tmp_path / 'my.yaml'}: run.sed: unknown key (found 3)"


def test_unknown_key_in_stage_section(tmp_path):
    msg = _error(tmp_path, "pretrain:\n  no_such_knob: 1\n")
    assert "pretrain.no_such_knob: unknown key" in msg and str(tmp_path / "my.yaml") in msg


def test_wrong_type_is_not_coerced(tmp_path):
    msg = _error(tmp_path, "run:\n  num_workers: '2'\n")
    assert "run.num_workers: expected a valid integer, found '2'" in msg


def test_out_of_range(tmp_path):
    msg = _error(tmp_path, "run:\n  num_workers: 0\n")
    assert msg.endswith("run.num_workers: expected a value >= 1, found 0")


def test_literal_choice(tmp_path):
    msg = _error(tmp_path, "data:\n  demo:\n    size: huge\n")
    assert "data.demo.size: expected one of 'tiny' or 'demo', found 'huge'" in msg


def test_error_from_override_names_the_override(tmp_path):
    msg = _error(tmp_path, overrides=["run.cpus_per_worker=-1"])
    assert msg == "config error in --set run.cpus_per_worker=-1: run.cpus_per_worker: expected a value > 0, found -1"


def test_error_from_preset_when_no_user_layer_sets_it(tmp_path):
    # A section replaced by a scalar in the user's file: the user's file is blamed, since it set the key.
    msg = _error(tmp_path, "run: 5\n")
    assert str(tmp_path / "my.yaml") in msg and "run:" in msg


def test_bad_yaml_and_missing_file(tmp_path):
    msg = _error(tmp_path, "run: [unclosed\n")
    assert "not valid YAML" in msg and "line" in msg
    with pytest.raises(ConfigError, match="no such file"):
        load_config("tiny", str(tmp_path / "absent.yaml"))


def test_top_level_must_be_mapping(tmp_path):
    assert "expected a mapping of sections" in _error(tmp_path, "- a\n- b\n")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        parse_override("run.seed")
    with pytest.raises(ConfigError, match="empty key path"):
        parse_override("run..seed=1")


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset_path("huge")


def test_overrides_are_typed_and_win():
    cfg = load_config("tiny", None, ["run.seed=7", "run.use_gpu=false", "run.store=memory://x"])
    assert cfg.run.seed == 7 and cfg.run.use_gpu is False and cfg.run.store == "memory://x"


def test_config_file_layers_over_preset(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  seed: 11\n")
    cfg = load_config("tiny", str(f))
    assert cfg.run.seed == 11 and cfg.data.demo.size == "tiny"  # preset value kept


@given(
    st.dictionaries(st.sampled_from("abc"), st.integers() | st.dictionaries(st.sampled_from("xy"), st.integers())),
    st.dictionaries(st.sampled_from("abc"), st.integers() | st.dictionaries(st.sampled_from("xy"), st.integers())),
)
def test_deep_merge_override_wins_and_inputs_untouched(base, override):
    base_copy, override_copy = repr(base), repr(override)
    merged = deep_merge(base, override)
    assert repr(base) == base_copy and repr(override) == override_copy
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            assert merged[key] == {**base[key], **value}
        else:
            assert merged[key] == value
    for key in base.keys() - override.keys():
        assert merged[key] == base[key]


def test_apply_overrides_builds_nested_sections():
    assert apply_overrides({"a": 1}, ["b.c.d=2", "a=x"]) == {"a": "x", "b": {"c": {"d": 2}}}


@pytest.mark.parametrize(("override", "new"), [
    ("ppo.algorithm=grpo", "align.methods"), ("ppo.group_size=4", "grpo.group_size or rloo.group_size"),
    ("ppo.grpo_scale_rewards=false", "grpo.scale_rewards"),
])  # fmt: skip
def test_keys_of_the_one_rl_section_are_refused_naming_the_new_key(override, new):
    with pytest.raises(ConfigError, match=rf"--set {override}: {override.split('=')[0]} is no longer a key; use {new}"):
        load_config("tiny", overrides=[override])


def test_each_rl_method_has_its_own_section_and_cache_key():
    from flows.plan import stage_cache_key

    base, tuned = load_config("tiny"), load_config("tiny", overrides=["grpo.learning_rate=0.001"])
    assert base.grpo.rollout_batch_size == base.ppo.rollout_batch_size == 16  # the preset's shared RL settings
    assert tuned.grpo.learning_rate == 0.001 and tuned.ppo.learning_rate == base.ppo.learning_rate
    assert stage_cache_key("grpo", tuned, {}) != stage_cache_key("grpo", base, {})
    assert stage_cache_key("ppo", tuned, {}) == stage_cache_key("ppo", base, {})  # tuning grpo leaves ppo cached
    assert stage_cache_key("rloo", tuned, {}) == stage_cache_key("rloo", base, {})


def test_exponent_floats_without_a_dot_are_numbers():
    """PyYAML (YAML 1.1) reads `2e-5` as a string: `--set grpo.learning_rate=2e-5` was refused as not a number."""
    from stages.common.config import load_yaml, parse_override

    assert parse_override("grpo.learning_rate=2e-5") == (["grpo", "learning_rate"], 2e-5)
    assert load_yaml("lr: 1E3\nbetas: [-2e+2, 3.5e-1]\nname: e5\nn: 3") == {"lr": 1000.0, "betas": [-200.0, 0.35],
                                                                            "name": "e5", "n": 3}  # fmt: skip
