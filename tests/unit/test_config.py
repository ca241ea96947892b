"""Config composition and validation: every YAML under conf/, overrides, one-line errors.

Run: .venv/bin/python -m pytest tests/unit/test_config.py
"""

import subprocess
import sys
from pathlib import Path

import pytest

from trb_nemo import cli
from trb_nemo.commands.preflight import preflight
from trb_nemo.config.compose import default_config_dir, load_config
from trb_nemo.config.schema import ConfigError, ModelSpec, TrainConfig

CONF = default_config_dir()
GROUP_OPTIONS = sorted(
    (group.name, f.stem) for group in CONF.iterdir() if group.is_dir() for f in group.glob("*.yaml")
)


def test_conf_has_groups():
    groups = {g for g, _ in GROUP_OPTIONS}
    assert {"model", "parallel"} <= groups


def test_default_config_composes_and_validates():
    cfg = load_config()
    assert isinstance(cfg, TrainConfig)
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.parallel.local_world_size == 2
    assert cfg.model.student.eos_token_id != cfg.model.teacher.eos_token_id


OWN_ON_TOY = ["data.source=toy_math"]
REQUIRED = {("model", "hf"): ["model.student.hf_path=student", "model.teacher.hf_path=teacher",
                              *OWN_ON_TOY],
            ("model", "qwen3_4b_to_0.6b"): OWN_ON_TOY, ("model", "qwen3_8b_to_1.7b"): OWN_ON_TOY}
"""What a preset asks the command line for (without it: one line naming the key); a preset of
real models on the toy task says so (the default data.source is refused for them)."""


@pytest.mark.parametrize("group,option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_group_yaml_composes_and_validates(group, option):
    cfg = load_config([f"{group}={option}", *REQUIRED.get((group, option), [])])
    assert isinstance(cfg, TrainConfig)
    if group == "recipe":  # a recipe sets keys of several sections (`# @package _global_`)
        assert cfg != load_config()
        assert cfg.rollout.max_new_tokens == 7168 and cfg.optim.max_steps == 400
        return
    node = getattr(cfg, group)
    assert node is not None


def test_every_yaml_file_is_covered():
    files = {p.relative_to(CONF).with_suffix("").as_posix() for p in CONF.rglob("*.yaml")}
    covered = {"train"} | {f"{g}/{o}" for g, o in GROUP_OPTIONS}
    assert files == covered


def test_overrides_reach_the_typed_config():
    cfg = load_config(["trb.eps0=0.05", "parallel.tensor_model_parallel_size=4",
                       "parallel.num_local_ranks=4", "rollout.behavior=fixed"])
    assert cfg.trb.eps0 == 0.05
    assert cfg.parallel.tensor_model_parallel_size == 4
    assert cfg.rollout.behavior == "fixed"


@pytest.mark.parametrize(
    "override,key,fragment",
    [
        ("trb.eps0=-1", "trb.eps0", ">= 0"),
        ("trb.no_such_key=1", "trb.no_such_key", "unknown key"),
        ("+trb.no_such_key=1", "trb.no_such_key", "unknown key"),
        ("trb.eps0=abc", "trb.eps0", "Float"),
        ("trb.schedule=exponential", "trb.schedule", "linear|cosine|constant|none"),
        ("rollout.behavior=dagger", "rollout.behavior", "student|trb|fixed|skd|temperature|veto|sft_warmup, got"),
        ("loss.kind=forward", "loss.kind", "topk|full|sampled"),
        ("model.student.no_field=3", "model.student.no_field", "unknown key"),
        ("model=nope", "model", "available"),
        ("model.fp8=hybrid", "model.fp8", "transformer_engine"),
        ("model.teacher=null", "model.teacher", "teacher"),
        ("model.student.num_attention_heads=3", "model.student.hidden_size", "divisible"),
        ("parallel.fused_ops=yes", "parallel.fused_ops", "auto|on|off"),
        ("rollout.draft_tokens=-1", "rollout.draft_tokens", "[0, 32]"),
        ("rollout.draft_tokens=64", "rollout.draft_tokens", "[0, 32]"),
        # torchrun dies of Slurm's warning signal (no handler), taking its ranks mid-save
        ("launcher.launch_mode=torchrun", "launcher.signal_seconds_before_end", "torchrun"),
    ],
)
def test_bad_values_name_the_key(override, key, fragment):
    with pytest.raises(ConfigError) as err:
        load_config([override])
    assert err.value.key == key
    assert fragment in err.value.reason
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("behavior", ["student", "skd", "temperature"])
def test_speculative_drafts_need_a_trust_region_behavior(behavior):
    with pytest.raises(ConfigError) as err:
        load_config([f"rollout.behavior={behavior}", "rollout.draft_tokens=4"])
    assert err.value.key == "rollout.draft_tokens"
    assert "rollout.draft_tokens=0" in err.value.reason
    for ok in ("trb", "fixed"):
        assert load_config([f"rollout.behavior={ok}", "rollout.draft_tokens=4"]).rollout.draft_tokens == 4


def test_cross_field_tp_must_divide_heads():
    with pytest.raises(ConfigError) as err:
        preflight(load_config(["parallel.tensor_model_parallel_size=8", "parallel.num_local_ranks=8"]))
    assert err.value.key == "parallel.tensor_model_parallel_size"
    assert "num_attention_heads" in err.value.reason


def test_cross_field_context_must_hold_prompt_and_response():
    with pytest.raises(ConfigError) as err:
        preflight(load_config(["rollout.max_new_tokens=1000"]))
    assert err.value.key == "model.student.max_sequence_length"


def test_fused_ops_on_needs_a_compiler(monkeypatch, tmp_path):
    """A machine probe: the pre-flight's, before any rank starts (the schema reads no PATH)."""
    from trb_nemo.commands.preflight import check_machine

    cfg = load_config(["parallel.fused_ops=on"])  # valid as a config on any machine
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler in an empty folder
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ConfigError) as err:
        check_machine(cfg)
    assert err.value.key == "parallel.fused_ops" and "C++ compiler" in err.value.reason
    monkeypatch.undo()
    check_machine(cfg)


def test_dataclass_validates_at_construction():
    with pytest.raises(ConfigError) as err:
        ModelSpec(num_attention_heads=4, num_query_groups=3)
    assert err.value.key == "num_query_groups"


def test_cli_prints_composed_config(capsys):
    assert cli.main(["train", "--cfg", "job", "trb.eps0=0.05",
                     "parallel.tensor_model_parallel_size=2"]) == 0
    out = capsys.readouterr().out
    assert "eps0: 0.05" in out
    assert "tensor_model_parallel_size: 2" in out


def test_cli_config_error_exits_2_in_process(capsys):
    assert cli.main(["train", "trb.warmup_steps=-3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["trb-nemo: config error: trb.warmup_steps: must be >= 0, got -3"]


@pytest.mark.parametrize("override,key", [("trb.eps0=-1", "trb.eps0"),
                                          ("trb.no_such_key=1", "trb.no_such_key")])
def test_console_script_exits_2_with_one_line(override, key):
    exe = Path(sys.executable).with_name("trb-nemo")
    proc = subprocess.run([str(exe), "train", override], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], proc.stderr


@pytest.mark.parametrize("overrides,key", [
    (["model.recompute_granularity=full"], "model.recompute_method"),
    (["model.recompute_granularity=full", "model.recompute_method=uniform"],
     "model.recompute_num_layers"),
    (["model.recompute_method=uniform", "model.recompute_num_layers=1"], "model.recompute_method"),
    (["model.recompute_granularity=sometimes"], "model.recompute_granularity"),
])
def test_recompute_settings_are_checked(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    assert err.value.key == key


def test_recompute_reaches_megatron_and_is_refused_on_cpu():
    import torch

    from trb_nemo.config.schema import ParallelConfig
    from trb_nemo.models.gpt import transformer_config

    cfg = load_config(["model.recompute_granularity=full", "model.recompute_method=uniform",
                       "model.recompute_num_layers=1"])
    tc = transformer_config(cfg.model.student, cfg.model, ParallelConfig(), initialize=False)
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == (
        "full", "uniform", 1)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError) as err:
            preflight(cfg)
        assert err.value.key == "model.recompute_granularity"
