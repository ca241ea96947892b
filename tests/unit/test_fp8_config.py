"""FP8 as a Hopper user configures it: the recipe, first/last layers in bf16, the teacher's own
precision, the padded token dimension. Invalid combinations exit 2 with one line naming the key;
valid ones compose (``--cfg job``: Transformer Engine is only needed to build the model).

Run: .venv/bin/python -m pytest tests/unit/test_fp8_config.py
"""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from harness import spawn_bare

from trb_nemo import cli
from trb_nemo.commands import preflight
from trb_nemo.config.compose import load_config
from trb_nemo.config.schema import ConfigError, ModelConfig, ModelSpec, ParallelConfig
from trb_nemo.models.gpt import fp8_kwargs, fp8_padded_length, transformer_config
from trb_nemo.models.pipeline import schedule_seq_length

TE = ["model.transformer_impl=transformer_engine", "model.precision=bf16"]
HYBRID = TE + ["model.fp8=hybrid"]
TENSORWISE = HYBRID + ["model.fp8_recipe=tensorwise"]
INLINE = ["model.student.checkpoint=null", "model.teacher.checkpoint=null"]
"""The toy models with their inline architecture, so the schema checks them per pipeline stage."""


@pytest.fixture(autouse=True)
def _te_2_4(monkeypatch):
    """Results must not depend on the Transformer Engine installed (none on CPU machines)."""
    monkeypatch.setattr(preflight, "installed_te_version", lambda: "2.4.0")


def _config_error(capsys, overrides: list[str]) -> str:
    assert cli.main(["train", "--cfg", "job", *overrides]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("trb-nemo: config error: ")
    return lines[0].removeprefix("trb-nemo: config error: ")


@pytest.mark.parametrize(
    "overrides,key,fragment",
    [
        (["model.teacher_precision=fp8"], "model.teacher_precision", "model.fp8"),
        (TE + ["model.teacher_precision=fp8"], "model.teacher_precision", "model.fp8"),
        (HYBRID + ["model.teacher_precision=fp8"], "model.teacher_precision",
         "model.fp8_recipe=tensorwise"),
        (HYBRID + ["model.fp8_first_last_layers_bf16=true"], "model.fp8_first_last_layers_bf16",
         "delayed"),
        (HYBRID + ["model.fp8_recipe=mxfp8"], "model.fp8_recipe", "delayed|tensorwise"),
        (HYBRID + ["model.fp8_recipe=blockwise"], "model.fp8_recipe", "delayed|tensorwise"),
        (HYBRID + ["model.fp8_amax_history_len=0"], "model.fp8_amax_history_len", "> 0"),
        (HYBRID + ["model.fp8_amax_compute_algo=mean"], "model.fp8_amax_compute_algo",
         "max|most_recent"),
        (HYBRID + ["model.fp8_margin=-1"], "model.fp8_margin", ">= 0"),
        (HYBRID + ["model.fp8_layers_at_end_in_bf16=-1"], "model.fp8_layers_at_end_in_bf16",
         ">= 0"),
        (HYBRID + ["model.teacher_precision=fp16"], "model.teacher_precision", "bf16|fp8"),
        (HYBRID + ["model.precision=fp32"], "model.precision", "bf16"),
        (["model.fp8=hybrid", "model.fp8_recipe=tensorwise"], "model.fp8", "transformer_engine"),
        # first/last layers in bf16: at most the layers of one pipeline stage, per network in FP8
        (TENSORWISE + INLINE + ["model.fp8_first_last_layers_bf16=true",
                                "model.fp8_layers_at_start_in_bf16=3"],
         "model.fp8_layers_at_start_in_bf16", "2 layers per pipeline stage of model.student"),
        (TENSORWISE + INLINE + ["parallel=gpu_tp4_pp2", "model.fp8_first_last_layers_bf16=true",
                                "model.fp8_layers_at_end_in_bf16=2"],
         "model.fp8_layers_at_end_in_bf16", "1 layers per pipeline stage of model.student"),
        (TENSORWISE + INLINE + ["parallel=gpu_tp4_pp2", "model.fp8_first_last_layers_bf16=true",
                                "model.teacher_precision=fp8", "model.student.num_layers=4",
                                "model.teacher.num_layers=2", "model.fp8_layers_at_end_in_bf16=2"],
         "model.fp8_layers_at_end_in_bf16", "of model.teacher"),
    ],
    ids=["teacher-fp8-without-fp8", "teacher-fp8-te-without-fp8", "teacher-fp8-delayed",
         "first-last-bf16-delayed", "recipe-mxfp8", "recipe-blockwise", "amax-history-0",
         "amax-algo", "margin", "bf16-layers-negative", "teacher-precision-name", "fp8-fp32",
         "fp8-local-impl", "bf16-start-layers-exceed-stage", "bf16-end-layers-exceed-pp-stage",
         "bf16-layers-exceed-teacher-stage"],
)
def test_invalid_fp8_combination_exits_2_with_one_line(capsys, overrides, key, fragment):
    line = _config_error(capsys, overrides)
    assert line.startswith(f"{key}: "), line
    assert fragment in line, line


def test_tensorwise_needs_te_2_2(monkeypatch):
    """A machine probe: the pre-flight's (the config schema reads no installed package)."""
    monkeypatch.setattr(preflight, "installed_te_version", lambda: "2.1.0")
    with pytest.raises(ConfigError) as err:
        preflight.check_te_version(load_config(TENSORWISE))
    assert err.value.key == "model.fp8_recipe"
    assert ">= 2.2" in err.value.reason and "2.1.0" in err.value.reason
    preflight.check_te_version(load_config(HYBRID))  # delayed scaling is fine there
    monkeypatch.setattr(preflight, "installed_te_version", lambda: "2.2.0.dev0+abc1234")
    preflight.check_te_version(load_config(TENSORWISE))
    monkeypatch.setattr(preflight, "installed_te_version", lambda: None)  # checked at build time
    preflight.check_te_version(load_config(TENSORWISE))


@pytest.mark.parametrize(
    "overrides,expect",
    [
        (HYBRID, {"fp8": "hybrid", "fp8_recipe": "delayed", "teacher_precision": "bf16",
                  "fp8_amax_history_len": 1024, "fp8_amax_compute_algo": "max"}),
        (HYBRID + ["model.fp8_amax_history_len=16", "model.fp8_amax_compute_algo=most_recent",
                   "model.fp8_margin=1"],
         {"fp8_amax_history_len": 16, "fp8_amax_compute_algo": "most_recent", "fp8_margin": 1}),
        (TENSORWISE + ["model.teacher_precision=fp8", "model.fp8_first_last_layers_bf16=true"],
         {"fp8_recipe": "tensorwise", "teacher_precision": "fp8",
          "fp8_first_last_layers_bf16": True}),
        (TE + ["model.precision=auto", "model.fp8=e4m3", "model.fp8_recipe=tensorwise"],
         {"fp8": "e4m3", "precision": "auto"}),
        (TENSORWISE + INLINE + ["parallel=gpu_tp4_pp2", "model.fp8_first_last_layers_bf16=true",
                                "model.student.num_layers=4", "model.teacher.num_layers=2",
                                "model.fp8_layers_at_end_in_bf16=2"],
         {"fp8_layers_at_end_in_bf16": 2}),  # the teacher (1 layer per stage) is not in FP8
        (["model=qwen3_8b_to_1.7b", "data.source=toy_math"],  # own models on the toy: said
         {"fp8": "hybrid", "teacher_precision": "bf16"}),
        # fp8_* settings without model.fp8 are inert, not errors
        (["model.fp8_recipe=tensorwise", "model.fp8_first_last_layers_bf16=true"],
         {"fp8": None}),
    ],
    ids=["delayed-defaults", "delayed-tuned", "tensorwise-teacher-fp8-first-last-bf16",
         "e4m3-auto-precision", "bf16-layers-only-student-in-fp8", "qwen3-8b-preset",
         "fp8-settings-without-fp8"],
)
def test_valid_fp8_combination_composes(capsys, overrides, expect):
    assert cli.main(["train", "--cfg", "job", *overrides]) == 0
    out = capsys.readouterr().out
    for name, value in expect.items():
        shown = "null" if value is None else "true" if value is True else value
        assert f"\n  {name}: {shown}\n" in out, (name, out)


def test_console_script_exits_2_with_one_line_on_an_fp8_combination():
    exe = Path(sys.executable).with_name("trb-nemo")
    proc = subprocess.run([str(exe), "train", *HYBRID, "model.teacher_precision=fp8"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.teacher_precision" in lines[0], proc.stderr
    assert "tensorwise" in lines[0]


# ----------------------------------------------------------------- token padding, model config


@pytest.mark.parametrize(
    "length,fp8,shards,expect",
    [(37, None, 1, 37), (37, None, 2, 37), (37, "hybrid", 1, 48), (48, "hybrid", 1, 48),
     (1, "e4m3", 1, 16), (17, "hybrid", 1, 32), (37, "hybrid", 2, 64), (64, "hybrid", 4, 64)],
)
def test_fp8_padded_length(length, fp8, shards, expect):
    assert fp8_padded_length(length, fp8, shards) == expect


def _stage(fp8, sequence_parallel=False, tp=1):
    config = SimpleNamespace(fp8=fp8, sequence_parallel=sequence_parallel,
                             tensor_model_parallel_size=tp)
    return SimpleNamespace(module=SimpleNamespace(config=config))  # a wrapper, as DDP is


def test_schedule_seq_length_follows_the_stage_config():
    assert schedule_seq_length(_stage(None), 37) == 37
    assert schedule_seq_length(_stage("hybrid"), 37) == 48
    assert schedule_seq_length(_stage("hybrid", sequence_parallel=True, tp=2), 37) == 64
    assert schedule_seq_length(_stage("hybrid", sequence_parallel=False, tp=2), 37) == 48


SPEC = ModelSpec(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4)


def _fp8_cfg(**changes) -> ModelConfig:
    """Built inside a test, where the installed TE version is patched."""
    return ModelConfig(**{**dict(transformer_impl="transformer_engine", fp8="hybrid",
                                 precision="bf16", fp8_recipe="tensorwise",
                                 fp8_amax_history_len=16, fp8_amax_compute_algo="most_recent",
                                 fp8_margin=2, fp8_first_last_layers_bf16=True,
                                 fp8_layers_at_start_in_bf16=1, fp8_layers_at_end_in_bf16=2),
                          **changes})

PARALLEL = ParallelConfig(tensor_model_parallel_size=1, pipeline_model_parallel_size=2)


def test_transformer_config_carries_the_fp8_settings():
    tc = transformer_config(SPEC, _fp8_cfg(), PARALLEL)  # Megatron validates it (no TE needed)
    assert (tc.fp8, tc.fp8_recipe) == ("hybrid", "tensorwise")
    assert (tc.fp8_amax_history_len, tc.fp8_amax_compute_algo, tc.fp8_margin) == (16, "most_recent", 2)
    assert tc.first_last_layers_bf16
    assert (tc.num_layers_at_start_in_bf16, tc.num_layers_at_end_in_bf16) == (1, 2)
    assert tc.bf16


def test_delayed_defaults_reach_megatron():
    cfg = ModelConfig(transformer_impl="transformer_engine", fp8="e4m3", precision="bf16")
    tc = transformer_config(SPEC, cfg, PARALLEL)
    assert (tc.fp8, tc.fp8_recipe, tc.fp8_amax_history_len, tc.fp8_amax_compute_algo) == \
        ("e4m3", "delayed", 1024, "max")
    assert not tc.first_last_layers_bf16


def test_without_fp8_the_config_is_unchanged():
    assert fp8_kwargs(ModelConfig()) == {"fp8": None}
    tc = transformer_config(SPEC, ModelConfig(precision="fp32"), PARALLEL)
    assert tc.fp8 is None and not tc.first_last_layers_bf16


def test_teacher_runs_without_fp8_under_teacher_precision_bf16():
    cfg = _fp8_cfg()
    teacher_cfg = cfg.for_teacher()
    assert cfg.teacher_precision == "bf16" and teacher_cfg.fp8 is None
    assert teacher_cfg.precision == "bf16" and teacher_cfg.teacher is cfg.teacher
    tc = transformer_config(SPEC, teacher_cfg, PARALLEL)
    assert tc.fp8 is None and not tc.first_last_layers_bf16 and tc.bf16
    assert transformer_config(SPEC, cfg, PARALLEL).fp8 == "hybrid"  # the student keeps FP8


def test_teacher_keeps_fp8_under_teacher_precision_fp8():
    cfg = _fp8_cfg(teacher_precision="fp8")
    assert cfg.for_teacher() is cfg
    tc = transformer_config(SPEC, cfg.for_teacher(), PARALLEL)
    assert (tc.fp8, tc.fp8_recipe, tc.num_layers_at_end_in_bf16) == ("hybrid", "tensorwise", 2)
    assert ModelConfig().for_teacher() == ModelConfig()  # no FP8: nothing to change


# ------------------------------------------------------- the padding in the schedule is exact


def _logits_and_grads_with_and_without_padding():
    """One rank: a local-spec GPTModel; ``config.fp8`` switches the padding on (Megatron's FP8
    context is a no-op without Transformer Engine, so the arithmetic is the same otherwise)."""
    import torch

    from trb_nemo.models.networks import build_network
    from trb_nemo.models.pipeline import run_schedule
    from trb_nemo.parallel import groups

    spec = ModelSpec(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                     vocab_size=128, max_sequence_length=64)
    parallel = ParallelConfig(tensor_model_parallel_size=1)
    pg = groups.initialize(parallel, seed=0)
    model = build_network(spec, ModelConfig(student=spec, teacher=None, precision="fp32"),
                          parallel, pg)
    tokens = torch.randint(0, 128, (2, 21), generator=torch.Generator().manual_seed(0))
    out = []
    for fp8 in (None, "hybrid"):
        model.config.fp8 = fp8
        model.zero_grad(set_to_none=True)

        def on_logits(index, mb, logits_BSV):
            loss = logits_BSV.float().logsumexp(-1).sum()
            return loss, torch.tensor(42), {"logits": logits_BSV.detach().clone()}

        [res] = run_schedule(model, [{"tokens": tokens}], on_logits, pg,
                             forward_only=False).values()
        out.append((res["logits"], [p.grad.clone() for p in model.parameters()]))
    groups.destroy()
    return out


@pytest.mark.dist
def test_fp8_padding_leaves_logits_and_gradients_unchanged():
    [[(plain, plain_grads), (padded, padded_grads)]] = spawn_bare(
        _logits_and_grads_with_and_without_padding, 1)
    assert plain.shape == padded.shape == (2, 21, 128)  # on_logits sees S, not 32
    assert (plain - padded).abs().max() <= 1e-5
    for g, h in zip(plain_grads, padded_grads, strict=True):
        assert (g - h).abs().max() <= 1e-5 * max(1.0, g.abs().max().item())
