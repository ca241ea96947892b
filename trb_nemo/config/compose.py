"""Compose ``conf/<name>.yaml`` with NeMo-style ``a.b=c`` overrides into a validated TrainConfig.

Flow: Hydra composes the YAML defaults list plus overrides against the schema registered in the
ConfigStore (unknown keys and wrong types fail here), then :func:`to_typed` builds the
dataclasses bottom-up so each ``__post_init__`` runs and its error carries the dotted path.
Every failure becomes one :class:`ConfigError` line; the CLI prints it and exits 2: a wrong
type in a YAML file names the key, the value and the file (with its line), a YAML syntax error
the file and line.

An ``hf_path`` given on the command line wins over the model preset: the preset's
``checkpoint``, ``eos_token_id``, ``max_sequence_length`` and ``name`` of that network are
cleared (unless the command line sets them too) and one info line says what was dropped, so
``model.student.hf_path=S`` trains S, not the preset's checkpoint.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, OmegaConfBaseException, ValidationError

from trb_nemo.config.schema import ConfigError, TrainConfig
from trb_nemo.logs import global_rank

SCHEMA_NAME = "train_schema"


def _schema() -> DictConfig:
    """TrainConfig as Hydra's schema. Its default networks are inline, and an inline ModelSpec
    fills ``eos_token_id``/``max_sequence_length`` at construction; in the schema they stay None
    (= from the model's files), so a preset that names only ``hf_path`` reads them there."""
    node = OmegaConf.structured(TrainConfig)
    for role in ("student", "teacher"):
        node.model[role].eos_token_id = None
        node.model[role].max_sequence_length = None
    # a mapping the user fills (eval.samples_per_set={aime24: 512}): open to new keys
    OmegaConf.set_struct(node.eval.samples_per_set, False)
    return node


ConfigStore.instance().store(name=SCHEMA_NAME, node=_schema())

FROM_THE_MODEL = ("checkpoint", "eos_token_id", "max_sequence_length")
"""Fields of a model preset's network that an ``hf_path`` on the command line clears."""


def project_root() -> Path:
    """The checkout the package is installed from (editable install)."""
    return Path(__file__).resolve().parents[2]


def default_config_dir() -> Path:
    """The repository's ``conf/``."""
    return project_root() / "conf"


# ``${project_root:}`` in YAML: paths of files the project ships (e.g. the toy models)
OmegaConf.register_new_resolver("project_root", lambda: str(project_root()), replace=True)


def _required(key: str):
    raise ConfigError(key, f"is required by the model preset: add {key}=PATH to the command line")


# ``${required:a.b}`` in YAML: a value the user must give (OmegaConf's ``???`` would not survive
# the merge onto the schema's default)
OmegaConf.register_new_resolver("required", _required, replace=True)


def compose_config(
    overrides: list[str] | tuple[str, ...] = (),
    *,
    config_name: str = "train",
    config_dir: str | Path | None = None,
    check_own_models: bool = True,
) -> DictConfig:
    """Hydra-compose ``<config_dir>/<config_name>.yaml`` with ``overrides``; raises ConfigError.
    ``check_own_models``: :func:`own_models_not_on_the_toy` (off for a run's saved config,
    which the run's own command line already decided)."""
    config_dir = Path(config_dir) if config_dir is not None else default_config_dir()
    take_notes()  # a new composition: nothing left from an earlier one
    if not (config_dir / f"{config_name}.yaml").is_file():
        raise ConfigError("--config-dir", f"no {config_name}.yaml in {config_dir}; pass the folder "
                          "that holds the project's conf/")
    try:
        with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base=None):
            node = compose(config_name=config_name, overrides=list(overrides))
        hf_path_wins(node, overrides)
        OmegaConf.to_container(node, resolve=True)  # every ${...} resolves, or one line here
    except (HydraException, OmegaConfBaseException) as e:
        raise _one_line(e, config_dir) from None
    except yaml.YAMLError as e:
        raise _yaml_syntax_error(e) from None
    if check_own_models:
        own_models_not_on_the_toy(node, overrides)
        settings_that_do_something(node, overrides)
    return node


def settings_that_do_something(node: DictConfig, overrides) -> None:
    """A setting the chosen method ignores is refused when the command line sets it, and a
    method is one a user can choose: ConfigError naming what to do instead."""
    from trb_nemo.methods.table import METHOD_NAMES, METHODS

    given = _command_line_keys(overrides)
    behavior = node.rollout.behavior
    if behavior in METHODS and behavior not in METHOD_NAMES:
        raise ConfigError("rollout.behavior", f"{behavior!r} is a stage of another method, not a "
                          f"method of its own; one of {'|'.join(METHOD_NAMES)} (the SFT stage: "
                          "rollout.behavior=sft_warmup, with sft.* settings)")
    if behavior in METHODS and METHODS[behavior].target == "veto":
        ignored = [k for k in ("loss.kind", "loss.topk") if k in given]
        if ignored:
            raise ConfigError(ignored[0], "has no effect with rollout.behavior=veto: Veto's loss "
                              "is its own KL to Q ∝ pi_T pi_S^b over the full vocabulary "
                              "(tuned by loss.veto_b_start and loss.veto_direction); drop "
                              f"{' and '.join(ignored)}")


TOY_SOURCE = "toy_math"
"""``data.source`` of the embedded task: character ids of the toy models' vocabulary."""


def own_models_not_on_the_toy(node: DictConfig, overrides) -> None:
    """Own models are never paired with the toy demo's task or teacher unless the command line
    says so: a student given by ``model.student.hf_path`` (or a preset naming one) with the
    default ``data.source=toy_math``, or a student set on the command line beside the toy
    preset's teacher, is a ConfigError saying what to set."""
    given = _command_line_keys(overrides)
    student = node.model.student
    if student is None:
        return
    own_student = student.get("hf_path") is not None
    if own_student and node.data.source == TOY_SOURCE and "data.source" not in given:
        raise ConfigError("data.source", "is the toy task (toy_math: arithmetic in the toy "
                          "models' character ids), but the student is your own model "
                          f"(model.student.hf_path={student.hf_path}); set data.source=FILE "
                          "(.jsonl or .parquet prompts with answers), or data.source=toy_math "
                          "explicitly to run it on the toy task anyway")
    sets_student = any(k.startswith("model.student.") for k in given)
    sets_teacher = any(k.startswith("model.teacher") for k in given)
    teacher = node.model.teacher
    toy_teacher = teacher is not None and str(teacher.get("checkpoint") or "").endswith(
        "examples/toy_math/checkpoints/teacher")
    if own_student and sets_student and toy_teacher and not sets_teacher and "model" not in given:
        raise ConfigError("model.teacher.hf_path", "your student (model.student.hf_path="
                          f"{student.hf_path}) would distill from the toy demo's teacher; use "
                          "model=hf model.student.hf_path=S model.teacher.hf_path=T (or set "
                          "model.teacher.* on the command line)")


_OVERRIDE = re.compile(r"^(?:\+\+|\+|~)?([\w.]+?)(?:@[\w.]+)?=(.*)$")


def _command_line_keys(overrides) -> dict[str, str]:
    """dotted key -> value text of ``a.b=c`` overrides (``+``/``++`` prefixes dropped)."""
    found = {}
    for override in overrides:
        m = _OVERRIDE.match(override.strip())
        if m:
            found[m.group(1)] = m.group(2).strip()
    return found


def hf_path_wins(node: DictConfig, overrides) -> list[str]:
    """For each network whose ``hf_path`` the command line sets (and not to null): clear the
    preset's FROM_THE_MODEL fields the command line does not set (so weights, architecture, stop
    id and context come from that folder) and name it after the folder. Keeps one info line
    (:func:`note`) per network where a preset value was dropped; returns those lines."""
    given = _command_line_keys(overrides)
    lines = []
    for role in ("student", "teacher"):
        key = f"model.{role}"
        if given.get(f"{key}.hf_path", "null").lower() in ("null", "none", "~", ""):
            continue
        spec = node.model[role]
        if spec is None:
            continue
        dropped = []
        for name in FROM_THE_MODEL:
            if f"{key}.{name}" not in given:
                if spec[name] is not None:
                    dropped.append(f"{name}={spec[name]}")
                spec[name] = None
        if f"{key}.name" not in given and Path(str(spec.hf_path)).name:
            spec.name = Path(str(spec.hf_path)).name
        if dropped:
            lines.append(f"{key}.hf_path={spec.hf_path} from the command line replaces the model "
                         f"preset's {', '.join(dropped)}: the network, its stop id and context "
                         f"come from that folder (set {key}.<field>=... to keep one)")
    for line in lines:
        note(line)
    return lines


_NOTES: list[str] = []


def note(message: str) -> None:
    """Keep one info/warning line for :func:`print_notes`: printed only once the config is
    valid, so a config error stays the one line on stderr."""
    _NOTES.append(message)


def take_notes() -> list[str]:
    """The lines :func:`note` kept since the last composition (and forget them)."""
    notes = list(_NOTES)
    _NOTES.clear()
    return notes


def print_notes() -> None:
    """Print the kept lines (global rank 0): info lines on stdout like every trb-nemo info line,
    ``warning:`` lines on stderr."""
    import sys

    notes = take_notes()
    if global_rank() == 0:
        for line in notes:
            print(f"trb-nemo: {line}", flush=True,
                  file=sys.stderr if line.startswith("warning:") else sys.stdout)


def config_warnings(cfg: TrainConfig) -> list[str]:
    """Valid settings that likely do not do what the user wants (printed, never fatal)."""
    out = []
    t, steps = cfg.trb, cfg.optim.max_steps
    if (cfg.rollout.behavior == "trb" and t.schedule in ("linear", "cosine") and t.eps0 > 0
            and t.warmup_steps > steps):
        out.append(f"warning: trb.warmup_steps={t.warmup_steps} > optim.max_steps={steps}: the "
                   "TRB warmup never finishes (eps_k never reaches 0, so the run never gets to "
                   "pure on-policy distillation); lower trb.warmup_steps or raise optim.max_steps")
    return out


def to_typed(node: DictConfig, cls: type = TrainConfig, path: str = ""):
    """Build ``cls`` from ``node`` children first, so every ``__post_init__`` runs.

    A ConfigError raised by a nested dataclass comes out with its full dotted path.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for extra in set(node.keys()) - set(names):  # keys appended with +a.b=c
        raise ConfigError(f"{path}{extra}", f"unknown key; allowed here: {', '.join(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        value = node[f.name]
        sub = _dataclass_in(hints[f.name])
        if sub is not None and isinstance(value, DictConfig):
            kwargs[f.name] = to_typed(value, sub, f"{path}{f.name}.")
        elif isinstance(value, (DictConfig, list)) or OmegaConf.is_list(value):
            kwargs[f.name] = OmegaConf.to_container(value, resolve=True)
        else:
            kwargs[f.name] = value
    try:
        typed = cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(path + e.key, e.reason) from None
    if isinstance(typed, TrainConfig):
        for line in config_warnings(typed):
            note(line)
    return typed


def load_config(
    overrides: list[str] | tuple[str, ...] = (),
    *,
    config_name: str = "train",
    config_dir: str | Path | None = None,
) -> TrainConfig:
    """compose_config + to_typed: the validated config of a run. Raises ConfigError."""
    node = compose_config(overrides, config_name=config_name, config_dir=config_dir)
    try:
        cfg = to_typed(node)
    except OmegaConfBaseException as e:  # an interpolation that does not resolve
        raise _one_line(e) from None
    print_notes()
    return cfg


def _dataclass_in(annotation) -> type | None:
    """The dataclass in ``X`` or ``X | None``, else None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def _allowed_keys(dotted: str) -> str:
    """The field names of the schema node at ``dotted`` (``trb`` -> ``eps0, warmup_steps, ...``)."""
    cls: type | None = TrainConfig
    for part in [p for p in dotted.split(".") if p]:
        if cls is None:
            return ""
        cls = _dataclass_in(typing.get_type_hints(cls).get(part))
    return ", ".join(f.name for f in dataclasses.fields(cls)) if cls else ""


def _one_line(e: Exception, config_dir: Path | None = None) -> ConfigError:
    """Turn a Hydra/OmegaConf error into ConfigError(dotted key, what is allowed). A value of
    the wrong type in a YAML file (Hydra says ``In 'model/x': ValidationError ...`` and chains
    the cause only as context) also names the file and, where found, the line."""
    cause = e.__cause__ or e
    if cause is e and isinstance(e.__context__, OmegaConfBaseException):
        cause = e.__context__
    raised = e
    while raised is not None:  # a ConfigError of one of our resolvers, however deeply chained
        if isinstance(raised, ConfigError):
            return raised
        raised = raised.__cause__ or raised.__context__
    key = getattr(cause, "full_key", None) or "config"
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if isinstance(cause, ConfigAttributeError) and " not in " in first:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        return ConfigError(key, f"unknown key; allowed here: {_allowed_keys(parent)}")
    if isinstance(cause, ValidationError):
        where = re.match(r"In '([^']+)': ", str(e))
        reason = first.replace(" of type 'str'", "")
        if where and config_dir is not None:
            reason += f" ({_yaml_location(config_dir / f'{where.group(1)}.yaml', key, cause)})"
        return ConfigError(key, reason)
    if isinstance(cause, MissingConfigException):
        group = re.search(r"Could not find '([^/']+)/", first)
        options = re.findall(r"^\t(\S+)$", str(cause), flags=re.M)
        if group and options:
            return ConfigError(group.group(1), f"{first.split(': ', 1)[-1]}; available: "
                                               f"{', '.join(o for o in options if '=' not in o)}")
    return ConfigError(key, first)


def _yaml_location(file: Path, key: str, cause) -> str:
    """``file:line`` of ``key``'s last component set to the offending value (best effort)."""
    leaf, value = key.rsplit(".", 1)[-1], getattr(cause, "value", None)
    try:
        lines = file.read_text().splitlines()
    except OSError:
        return str(file)
    for number, line in enumerate(lines, start=1):
        m = re.match(rf"\s*{re.escape(leaf)}\s*:\s*(.*?)\s*(#.*)?$", line)
        if m and (value is None or str(value) in m.group(1)):
            return f"{file}:{number}"
    return str(file)


def _yaml_syntax_error(e: yaml.YAMLError) -> ConfigError:
    """``<file>:<line>: YAML syntax error: <problem>`` for a YAML file that does not parse."""
    mark = getattr(e, "problem_mark", None)
    if mark is None:
        return ConfigError("config", f"YAML syntax error: {str(e).splitlines()[0]}")
    problem = getattr(e, "problem", None) or "cannot be parsed"
    context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and context_mark is not None:
        problem += f" ({context} at line {context_mark.line + 1})"
    elif context:
        problem += f" ({context})"
    return ConfigError(f"{mark.name}:{mark.line + 1}", f"YAML syntax error at column "
                       f"{mark.column + 1}: {problem}")


def composed_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (what a run saves beside its outputs)."""
    return OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(cfg)))
