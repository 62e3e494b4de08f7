"""Structured configs for every command: a dataclass schema, merged as schema <- YAML <- command line.

Each command declares a dataclass (fields may carry ``metadata={"help": ...}``). ``load`` merges an
optional YAML file (``config=PATH`` on the command line) and ``key=value`` overrides into it with
omegaconf, and turns every omegaconf complaint (unknown key, missing value, wrong type) into one
``UserError`` that names the key.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from datamodels_ml.errors import UserError

__all__ = ["load", "describe", "to_flat_dict", "to_dotlist"]


def _key_of(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    return str(key) if key is not None else "?"


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def load(schema: type, argv: list[str], *, config_key: str | None = None) -> Any:
    """Return a ``schema`` instance from ``argv`` (``key=value`` tokens).

    With ``config_key`` (e.g. ``"config"``), a token ``config=PATH`` names a YAML file merged before
    the other tokens. Raises ``UserError`` naming the offending key.
    """
    yaml_path = None
    overrides: list[str] = []
    for token in argv:
        if "=" not in token or token.startswith("="):
            raise UserError(f"expected key=value, got '{token}'")
        key, _, value = token.partition("=")
        if config_key is not None and key == config_key:
            yaml_path = value
        else:
            overrides.append(token)

    base = OmegaConf.structured(schema)
    layers = [base]
    source = "the command line"
    try:
        if yaml_path is not None:
            if not os.path.isfile(yaml_path):
                raise UserError(f"config file not found: {yaml_path}")
            source = yaml_path
            loaded = OmegaConf.load(yaml_path)
            if loaded is None or not hasattr(loaded, "keys"):
                raise UserError(f"{yaml_path}: expected a YAML mapping of config keys")
            layers.append(loaded)
            base = OmegaConf.merge(*layers)
            layers = [base]
        source = "the command line"
        cli = OmegaConf.from_dotlist(overrides)
        cfg = OmegaConf.merge(base, cli)
    except ConfigKeyError as exc:
        raise UserError(f"unknown config key '{_key_of(exc)}' (from {source})") from None
    except OmegaConfBaseException as exc:
        raise UserError(f"invalid value for '{_key_of(exc)}' (from {source}): {_first_line(exc)}") from None
    except Exception as exc:  # YAML syntax errors and the like
        if isinstance(exc, UserError):
            raise
        raise UserError(f"cannot read config from {source}: {_first_line(exc)}") from None

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"missing required config key '{missing[0]}'"
                        + (f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else ""))
    try:
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as exc:
        raise UserError(f"missing required config key '{_key_of(exc)}'") from None
    except OmegaConfBaseException as exc:
        raise UserError(f"invalid value for '{_key_of(exc)}': {_first_line(exc)}") from None


def to_flat_dict(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a (nested) config dataclass into ``{"a.b": value}`` for logging as parameters."""
    out: dict[str, Any] = {}
    items = dataclasses.asdict(obj).items() if dataclasses.is_dataclass(obj) else dict(obj).items()
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(to_flat_dict(value, prefix=name + "."))
        else:
            out[name] = value
    return out


def to_dotlist(tree: Any) -> list[str]:
    """``{"cfg": {"k": 20}}`` -> ``["cfg.k=20"]``: dot-list tokens for ``load``, values written as YAML."""
    import json

    tokens: list[str] = []
    for key, value in to_flat_dict(tree).items():
        if isinstance(value, dict):  # an empty mapping overrides nothing
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif value is None:
            text = "null"
        elif isinstance(value, (list, tuple)):
            text = json.dumps(list(value))
        else:
            text = str(value)
        tokens.append(f"{key}={text}")
    return tokens


def describe(schema: type, prefix: str = "") -> list[str]:
    """One line per config key: name, default (or 'required') and help, for ``--help``."""
    lines: list[str] = []
    for f in dataclasses.fields(schema):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, type) and dataclasses.is_dataclass(f.type)):
            lines.extend(describe(f.type, prefix=name + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = "required" if f.default == MISSING else f"default {f.default!r}"
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
            if dataclasses.is_dataclass(value):
                lines.extend(describe(type(value), prefix=name + "."))
                continue
            default = f"default {value!r}"
        else:
            default = "required"
        help_text = f.metadata.get("help", "")
        said = "(default" in help_text  # the help already says what the default does: not twice
        lines.append(f"  {name:<28} {help_text}" + ("" if said else f" ({default})"))
    return lines
