"""The methods of the paper's Table 1, one named entry each (``rollout.behavior=<name>``).

A method is what generates the training prefixes (its behavior policy at step k) and what the
loss pulls the student towards there (its target), with the settings and schedules that tune
them. This table is the one place they are named: the config validation, :func:`policy_for`,
the report, the CLI and ``trb-nemo compare`` read it.

Targets: ``teacher``, the per-prefix reverse KL(pi_theta || pi_T) of ``loss.kind`` (OPD; TRB
and the behavior baselines leave it unchanged); ``veto``, Veto's KL to Q ∝ pi_T pi_S^b (the
student term detached, b annealed from ``loss.veto_b_start`` to 0,
:func:`trb_nemo.ops.losses.veto_kl`), over the full vocabulary; ``sft``, the cross-entropy of
the sampled (teacher) tokens.

A method may run a stage of another method first (``pre_stage``): ``sft_warmup`` fine-tunes the
student on teacher responses (the internal ``sft`` method, its own resumable run) and then runs
OPD from those weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

TARGETS = ("teacher", "veto", "sft")


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    """The method's row in the comparison table."""
    target: str
    """``teacher`` or ``veto`` (module docstring)."""
    policy: Callable
    """(step, rollout config, trb config) -> the behavior policy of that step."""
    describe: Callable
    """TrainConfig -> one line for the report."""
    settings: tuple[str, ...] = ()
    """The config keys that tune it."""
    sweep: tuple[tuple[str, ...], ...] = ((),)
    """The paper's sweep (appendix "Baseline Setup Details"): override lists, one per point;
    ``trb-nemo compare`` runs a chosen point or all of them."""
    curves: tuple[tuple[str, str], ...] = ()
    """(metric, label) pairs that show what it does, in the report."""
    warmup: Callable = field(default=lambda cfg: (0, ""))
    """TrainConfig -> (steps, name) of its warmup phase, (0, "") without one."""
    teacher_online: bool = False
    """Its behavior policy runs the teacher while decoding (at some steps)."""
    speculative: bool = False
    """Its behavior is the trust-region policy, which ``rollout.draft_tokens`` can decode
    speculatively."""
    pre_stage: str | None = None
    """A method whose run comes first, its final weights this run's initial student."""
    public: bool = True
    """Offered by the CLI and ``compare`` (an internal stage is not)."""


def _student(step, rollout, trb):
    from trb_nemo.methods.policies import StudentPolicy

    return StudentPolicy(rollout.temperature)


def _trb(step, rollout, trb):
    from trb_nemo.methods.policies import TrustRegionPolicy
    from trb_nemo.methods.schedules import eps_at

    eps = eps_at(step, schedule=trb.schedule, eps0=trb.eps0, warmup_steps=trb.warmup_steps)
    return TrustRegionPolicy("trb", eps, trb.solver_tolerance, trb.solver_max_iterations)


def _fixed(step, rollout, trb):
    from trb_nemo.methods.policies import TrustRegionPolicy

    return TrustRegionPolicy("fixed", rollout.fixed_eps, trb.solver_tolerance,
                             trb.solver_max_iterations)


def _skd(step, rollout, trb):
    from trb_nemo.methods.policies import InjectionPolicy

    return InjectionPolicy(rollout.skd_topk, rollout.skd_teacher_temperature)


def _teacher(step, rollout, trb):
    from trb_nemo.methods.policies import TeacherPolicy

    return TeacherPolicy(1.0)


def _temperature(step, rollout, trb):
    from trb_nemo.methods.policies import StudentPolicy
    from trb_nemo.methods.schedules import temperature_at

    return StudentPolicy(temperature_at(step, start=rollout.temperature_start,
                                        end=rollout.temperature,
                                        warmup_steps=rollout.temperature_warmup_steps))


_BLEND = (("rollout/eps", "eps_k"), ("rollout/beta_mean", "mean beta"),
          ("rollout/kl_mean", "realized KL"))

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("student", "Vanilla OPD", "teacher", _student,
           lambda cfg: "Method `student`: vanilla on-policy distillation on student rollouts"),
    Method("trb", "TRB (ours)", "teacher", _trb,
           lambda cfg: f"Method `trb`: eps0 = {cfg.trb.eps0}, schedule `{cfg.trb.schedule}`, "
                       f"warmup K = {cfg.trb.warmup_steps} steps",
           settings=("trb.eps0", "trb.warmup_steps", "trb.schedule", "rollout.draft_tokens"),
           sweep=tuple((f"trb.eps0={e}", f"trb.warmup_steps={k}")
                       for e in (0.001, 0.005, 0.01, 0.02, 0.05) for k in (15, 25, 50)),
           curves=_BLEND,
           warmup=lambda cfg: (cfg.trb.warmup_steps, "TRB warmup"), teacher_online=True,
           speculative=True),
    Method("fixed", "Fixed-eps blending", "teacher", _fixed,
           lambda cfg: f"Method `fixed`: eps = {cfg.rollout.fixed_eps} at every step",
           settings=("rollout.fixed_eps", "rollout.draft_tokens"),
           sweep=tuple((f"rollout.fixed_eps={e}",) for e in (0.001, 0.005, 0.01, 0.02, 0.05)),
           curves=_BLEND, teacher_online=True, speculative=True),
    Method("skd", "Interleaved teacher injection (SKD)", "teacher", _skd,
           lambda cfg: f"Method `skd`: student tokens outside the teacher's top-"
                       f"{cfg.rollout.skd_topk} replaced by teacher samples at temperature "
                       f"{cfg.rollout.skd_teacher_temperature}",
           settings=("rollout.skd_topk", "rollout.skd_teacher_temperature"),
           sweep=tuple((f"rollout.skd_topk={k}", f"rollout.skd_teacher_temperature={t}")
                       for k in (15, 25, 50) for t in (0.2, 0.6, 1.0)),
           curves=(("rollout/teacher_token_share", "teacher-token share (SKD injections)"),),
           teacher_online=True),
    Method("temperature", "Temperature warmup", "teacher", _temperature,
           lambda cfg: f"Method `temperature`: student temperature "
                       f"{cfg.rollout.temperature_start} -> {cfg.rollout.temperature} over "
                       f"{cfg.rollout.temperature_warmup_steps} steps",
           settings=("rollout.temperature_start", "rollout.temperature_warmup_steps"),
           sweep=tuple((f"rollout.temperature_start={t}", f"rollout.temperature_warmup_steps={k}")
                       for t in (0.8, 0.9, 0.95) for k in (15, 25)),
           curves=(("rollout/temperature", "sampling temperature"),),
           warmup=lambda cfg: (cfg.rollout.temperature_warmup_steps, "temperature warmup")),
    Method("veto", "Veto", "veto", _student,
           lambda cfg: f"Method `veto`: student rollouts, target Q ∝ pi_T pi_S^b, b from "
                       f"{cfg.loss.veto_b_start} to 0, {cfg.loss.veto_direction} KL",
           settings=("loss.veto_b_start", "loss.veto_direction"),
           sweep=tuple((f"loss.veto_b_start={b}",) for b in (0.2, 0.4, 0.6, 0.8)),
           curves=(("train/veto_b", "Veto's b"),)),
    Method("sft_warmup", "SFT warmup", "teacher", _student,
           lambda cfg: f"Method `sft_warmup`: OPD from the student fine-tuned for "
                       f"{cfg.sft.updates} updates on teacher responses to the prompts of the "
                       f"first {cfg.sft.prompt_steps} steps",
           settings=("sft.updates", "sft.prompt_steps", "sft.lr", "sft.lr_warmup_steps"),
           sweep=tuple((f"sft.updates={s}",) for s in (15, 25, 50)), pre_stage="sft"),
    Method("sft", "SFT on teacher responses (sft_warmup's first stage)", "sft", _teacher,
           lambda cfg: f"Method `sft`: the student fine-tuned on teacher responses (T = 1.0) "
                       f"to the prompts of the first {cfg.sft.prompt_steps} OPD steps",
           teacher_online=True, public=False),
)}
METHOD_NAMES = tuple(name for name, m in METHODS.items() if m.public)
"""The methods a user picks (the CLI, compare); the config accepts every entry of METHODS."""


def method_of(name: str) -> Method:
    """The entry named ``name`` (a ValueError listing the names otherwise)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; one of {'|'.join(METHOD_NAMES)}") from None


def policy_for(step: int, rollout, trb):
    """The behavior policy of training step ``step`` (0-based): the method's own, named by
    ``rollout.behavior`` (``rollout`` and ``trb``: the config's ``RolloutConfig`` and
    ``TRBConfig``; this table reads their fields and imports no config)."""
    return method_of(rollout.behavior).policy(step, rollout, trb)


def needs_full_teacher_logits(loss_kind: str, target: str) -> bool:
    """Whether the loss reads the teacher's logits over the whole vocabulary at every prefix
    (``loss.kind=full``, and Veto's target Q ∝ pi_T pi_S^b), rather than log pi_T at a few
    recorded ids (``topk``/``sampled``) or nothing (``sft``). Scoring streams or scores them
    (:func:`trb_nemo.scoring.teacher.loss_batch`); the planner charges their memory."""
    if target == "sft":
        return False
    return loss_kind == "full" or target == "veto"
