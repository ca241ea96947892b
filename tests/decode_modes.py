"""Shared by tests/dist/test_decode_modes.py (gloo) and tests/gpu/test_gpu_path.py (NCCL):
which modes the networks are in while decoding and evaluating."""

import torch


def modes_seen(parallel_preset: str = "cpu_tp1"):
    from trb_nemo.config.compose import load_config
    from trb_nemo.data.prompts import build_source
    from trb_nemo.eval.pass_at_1 import evaluate
    from trb_nemo.methods.policies import TrustRegionPolicy
    from trb_nemo.models.networks import build_student, build_teacher
    from trb_nemo.models.vocab import SharedVocab
    from trb_nemo.parallel import groups
    from trb_nemo.rollout.engine import generate
    from trb_nemo.rollout.types import DecodeSettings

    cfg = load_config([f"parallel={parallel_preset}", "eval.num_problems=2", "eval.num_samples=2",
                       "eval.max_new_tokens=6"])
    pg = groups.initialize(cfg.parallel, cfg.seed)
    student, teacher = build_student(cfg.model, cfg.parallel, pg), build_teacher(cfg.model,
                                                                                 cfg.parallel, pg)
    student.train()
    seen = {"student": [], "teacher": []}
    for name, model in (("student", student), ("teacher", teacher)):
        # a module every forward runs (the decode path calls the layers, not GPTModel.forward)
        model.decoder.layers[0].self_attention.register_forward_pre_hook(
            lambda m, args, name=name: seen[name].append(m.training))
    vocab = SharedVocab.of(cfg.model)
    source = build_source(cfg)
    out = {}
    generate(student, teacher, [list(p.ids) for p in source.eval_prompts(2)],
             TrustRegionPolicy("trb", 0.02), DecodeSettings(max_new_tokens=6, topk_k=4),
             vocab=vocab, generator=torch.Generator().manual_seed(0), pg=pg)
    out["generate"] = {k: list(v) for k, v in seen.items()}
    out["after_generate"] = (student.training, teacher.training)
    for v in seen.values():
        v.clear()
    evaluate(student, source.eval_sets, cfg, vocab, 0, pg)
    out["evaluate"] = {k: list(v) for k, v in seen.items()}
    out["after_evaluate"] = (student.training, teacher.training)
    groups.destroy()
    return out


def check_modes(out):
    assert out["generate"]["student"] and out["generate"]["teacher"]
    assert not any(out["generate"]["student"] + out["generate"]["teacher"])
    assert out["evaluate"]["student"] and not any(out["evaluate"]["student"])
    assert out["evaluate"]["teacher"] == []  # pass@1 samples the student only
    assert out["after_generate"] == (True, False)
    assert out["after_evaluate"] == (True, False)


def rows_alone_and_padded(parallel_preset: str = "cpu_tp1"):
    """A TRB rollout of 5 prompts (budget 3) fed as they are, and fed in multiples of 16 rows
    (the FP8 padding: extra rows feed nothing): tokens, beta and lengths of both."""
    from trb_nemo.config.compose import load_config
    from trb_nemo.data.prompts import build_source
    from trb_nemo.methods.policies import TrustRegionPolicy
    from trb_nemo.models.networks import build_student, build_teacher
    from trb_nemo.models.vocab import SharedVocab
    from trb_nemo.parallel import groups
    from trb_nemo.rollout.engine import generate
    from trb_nemo.rollout.types import DecodeSettings

    cfg = load_config([f"parallel={parallel_preset}"])
    pg = groups.initialize(cfg.parallel, cfg.seed)
    student = build_student(cfg.model, cfg.parallel, pg)
    teacher = build_teacher(cfg.model, cfg.parallel, pg)
    prompts = [list(p.ids) for p in build_source(cfg).eval_prompts(5)]
    out = []
    for multiple in (1, 16):
        ro = generate(student, teacher, prompts, TrustRegionPolicy("trb", 0.05),
                      DecodeSettings(max_new_tokens=12, topk_k=4, max_in_flight=3, rows_multiple=multiple),
                      vocab=SharedVocab.of(cfg.model),
                      generator=torch.Generator().manual_seed(4), pg=pg)
        out.append({"tokens": ro.tokens, "beta": ro.records["beta"],
                    "lengths": ro.response_lengths})
    groups.destroy()
    return out
