"""The methods registry (trb_nemo/methods/table.py) is the one place the Table 1 methods are named:
the config validation, policy_for, the CLI and compare read it, and every sweep point of the
paper composes into a valid config.

Run: .venv/bin/python -m pytest tests/unit/test_methods.py
"""

import subprocess
import sys
from pathlib import Path

import pytest

from trb_nemo.config.compose import load_config
from trb_nemo.config.schema import ConfigError
from trb_nemo.methods.table import METHOD_NAMES, METHODS, TARGETS, method_of, policy_for


def test_the_schema_accepts_exactly_the_registry():
    for name in METHOD_NAMES:
        assert load_config([f"rollout.behavior={name}"]).rollout.behavior == name
    with pytest.raises(ConfigError) as err:
        load_config(["rollout.behavior=dagger"])
    assert err.value.reason.endswith("|".join(METHOD_NAMES)) or all(
        n in err.value.reason for n in METHOD_NAMES)
    with pytest.raises(ValueError, match="unknown method"):
        method_of("dagger")


def test_the_cli_offers_exactly_the_registry():
    exe = Path(sys.executable).with_name("trb-nemo")
    out = subprocess.run([str(exe), "compare", "--help"], capture_output=True, text=True,
                         timeout=120).stdout
    offered = out.split("--behaviors {", 1)[1].split("}", 1)[0].split(",")
    assert tuple(offered) == METHOD_NAMES


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_each_entry_builds_its_policy_and_its_sweep(name):
    m = METHODS[name]
    assert m.target in TARGETS and m.label
    for point in m.sweep:
        cfg = load_config([f"rollout.behavior={name}", *point])
        for step in (0, 5, 1000):
            policy = policy_for(step, cfg.rollout, cfg.trb)
            assert hasattr(policy, "choose") and hasattr(policy, "needs_teacher")
        assert m.describe(cfg).startswith(f"Method `{name}`")
        steps, phase = m.warmup(cfg)
        assert steps >= 0 and (steps == 0) == (phase == "")
    for key in m.settings:  # each setting names a real config field
        section, field = key.split(".")
        assert hasattr(getattr(load_config([]), section), field), key


def test_the_behaviors_do_what_their_entries_say():
    cfg = load_config(["trb.eps0=0.02", "trb.warmup_steps=10"])
    assert policy_for(0, cfg.rollout, cfg.trb).eps == pytest.approx(0.02)
    assert policy_for(10, cfg.rollout, cfg.trb).needs_teacher() is False  # pure OPD after K
    veto = load_config(["rollout.behavior=veto"])
    assert METHODS["veto"].target == "veto"
    assert policy_for(0, veto.rollout, veto.trb).needs_teacher() is False  # student rollouts
    assert {n for n, m in METHODS.items() if m.speculative} == {"trb", "fixed"}


def test_compare_takes_nemo_style_overrides():
    from trb_nemo.commands.compare import compare_overrides

    rest, chosen = compare_overrides(["optim.max_steps=3", "compare.methods=[student,veto]",
                                      "compare.seeds=[0,2]", "compare.sweep=true"])
    assert rest == ["optim.max_steps=3"]
    assert chosen == {"methods": ["student", "veto"], "seeds": [0, 2], "sweep": True}
    for bad, key in (("compare.methods=[dagger]", "compare.methods"),
                     ("compare.nope=1", "compare.nope"), ("compare.seeds=[a]", "compare.seeds")):
        with pytest.raises(ConfigError) as err:
            compare_overrides([bad])
        assert err.value.key == key
