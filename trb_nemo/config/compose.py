"""Compose ``conf/<name>.yaml`` with NeMo-style ``a.b=c`` overrides into a validated TrainConfig.

Flow: Hydra composes the YAML defaults list plus overrides against the schema registered in the
ConfigStore (unknown keys and wrong types fail here), then :func:`to_typed` builds the
dataclasses bottom-up so each ``__post_init__`` runs and its error carries the dotted path.
Every failure becomes one :class:`ConfigError` line; the CLI prints it and exits 2.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, OmegaConfBaseException, ValidationError

from trb_nemo.config.schema import ConfigError, TrainConfig

SCHEMA_NAME = "train_schema"
ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)


def project_root() -> Path:
    """The checkout the package is installed from (editable install)."""
    return Path(__file__).resolve().parents[2]


def default_config_dir() -> Path:
    """The repository's ``conf/``."""
    return project_root() / "conf"


# ``${project_root:}`` in YAML: paths of files the project ships (e.g. the toy models)
OmegaConf.register_new_resolver("project_root", lambda: str(project_root()), replace=True)


def compose_config(
    overrides: list[str] | tuple[str, ...] = (),
    *,
    config_name: str = "train",
    config_dir: str | Path | None = None,
) -> DictConfig:
    """Hydra-compose ``<config_dir>/<config_name>.yaml`` with ``overrides``; raises ConfigError."""
    config_dir = Path(config_dir) if config_dir is not None else default_config_dir()
    if not (config_dir / f"{config_name}.yaml").is_file():
        raise ConfigError("--config-dir", f"no {config_name}.yaml in {config_dir}; pass the folder "
                          "that holds the project's conf/")
    try:
        with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base=None):
            return compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise _one_line(e) from None


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
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(path + e.key, e.reason) from None


def load_config(
    overrides: list[str] | tuple[str, ...] = (),
    *,
    config_name: str = "train",
    config_dir: str | Path | None = None,
) -> TrainConfig:
    """compose_config + to_typed: the validated config of a run. Raises ConfigError."""
    node = compose_config(overrides, config_name=config_name, config_dir=config_dir)
    try:
        return to_typed(node)
    except OmegaConfBaseException as e:  # an interpolation that does not resolve
        raise _one_line(e) from None


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


def _one_line(e: Exception) -> ConfigError:
    """Turn a Hydra/OmegaConf error into ConfigError(dotted key, what is allowed)."""
    cause = e.__cause__ or e
    key = getattr(cause, "full_key", None) or "config"
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if isinstance(cause, ConfigAttributeError) and " not in " in first:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        return ConfigError(key, f"unknown key; allowed here: {_allowed_keys(parent)}")
    if isinstance(cause, ValidationError):
        return ConfigError(key, first.replace(" of type 'str'", ""))
    if isinstance(cause, MissingConfigException):
        group = re.search(r"Could not find '([^/']+)/", first)
        options = re.findall(r"^\t(\S+)$", str(cause), flags=re.M)
        if group and options:
            return ConfigError(group.group(1), f"{first.split(': ', 1)[-1]}; available: "
                                               f"{', '.join(o for o in options if '=' not in o)}")
    return ConfigError(key, first)


def composed_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (what a run saves beside its outputs)."""
    return OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(cfg)))
