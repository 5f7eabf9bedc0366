"""Configuration: ``configs/base.yaml`` holds every key and its default; a preset overrides a
subset; the command line overrides anything (``--set optim.lr=3e-4``). Unknown keys are errors
that name the key. The effective config is a plain nested dict, saved in the run folder."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A bad preset name, key or value; the message names it (one line per problem)."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


BASES = ("base", "supervised_base")


def list_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem not in BASES)


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def defaults(base: str = "base") -> dict:
    """Every key with its default: ``base`` (pretraining) or ``supervised_base`` (fine-tuning, linear)."""
    if base not in BASES:
        raise ConfigError(f"unknown config base {base!r} ({', '.join(BASES)})")
    return _read_yaml(CONFIG_DIR / f"{base}.yaml")


def merge(base: dict, override: Mapping, *, where: str, prefix: str = "", problems: list[str] | None = None) -> dict:
    """``base`` updated with ``override``; every key of ``override`` must exist in ``base``. A bad
    key raises ConfigError, or is added to ``problems`` (and left out) when a list is given."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        name = f"{prefix}{key}"
        problem = None
        if key not in out:
            problem = f"unknown config key '{name}' in {where} (known here: {', '.join(sorted(out))})"
        elif isinstance(out[key], dict) and not isinstance(value, Mapping):
            problem = f"config key '{name}' in {where} is a section; give it a mapping, not {value!r}"
        if problem is not None:
            if problems is None:
                raise ConfigError(problem)
            problems.append(problem)
        elif isinstance(out[key], dict):
            out[key] = merge(out[key], value, where=where, prefix=f"{name}.", problems=problems)
        else:
            out[key] = value
    return out


def parse_value(text: str) -> Any:
    """A --set value: YAML scalars and lists (3e-4, true, null, [0.4, 1.0]); plain text otherwise."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads 3e-4 as a string; accept the float people mean
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def dotted_to_nested(assignments: Iterable[str]) -> dict:
    nested: dict = {}
    for item in assignments:
        if "=" not in item:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part} is given both as a value and a section")
        node[parts[-1]] = parse_value(raw)
    return nested


def load_config(preset: str | None = None, overrides: Mapping | None = None, sets: Iterable[str] = (),
                base: str = "base") -> dict:
    """<base>.yaml <- preset (a name in configs/ or a YAML path) <- overrides <- --set assignments."""
    cfg = defaults(base)
    problems: list[str] = []  # every problem is reported, not only the first
    if preset:
        path = Path(preset)
        if not path.suffix:
            path = CONFIG_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown preset {preset!r}: no file {path} (presets: {', '.join(list_presets())})")
        cfg = merge(cfg, _read_yaml(path), where=str(path), problems=problems)
    if overrides:
        cfg = merge(cfg, overrides, where="the command line", problems=problems)
    sets = list(sets)
    if sets:
        cfg = merge(cfg, dotted_to_nested(sets), where="--set", problems=problems)
    check(cfg, base, problems)
    return cfg


def check(cfg: Mapping, base: str = "base", problems: Iterable[str] = ()) -> None:
    """Raise ConfigError listing every problem of ``cfg`` (types, ranges, choices) at once, after
    ``problems`` found earlier."""
    from dinocxr_fast.config_schema import validate  # noqa: PLC0415

    problems = [*problems, *validate(dict(cfg), base)]
    if problems:
        raise ConfigError(f"{len(problems)} problem(s): " + "; ".join(problems), problems)


def save_config(cfg: Mapping, path: Path) -> None:
    path.write_text(yaml.safe_dump(dict(cfg), sort_keys=False))
