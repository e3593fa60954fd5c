"""Named configurations shared by every training module: a preset by name (or an instance), field
overrides (None = keep), and ``--set FIELD=VALUE`` parsing typed by the dataclass's defaults."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from typing import Any, Mapping

from ...backend.errors import UserError


def pick(presets: Mapping[str, Any], name, overrides: Mapping[str, Any], what: str):
    """``presets[name]`` (or ``name`` itself when it is already a config) with ``overrides``."""
    if dataclasses.is_dataclass(name) and not isinstance(name, type):
        base = name
    elif name in presets:
        base = presets[name]
    else:
        raise UserError(f"unknown {what} config '{name}' ({', '.join(presets)})")
    try:
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})
    except TypeError as e:
        raise UserError(f"bad {what} config override: {e}") from None


def parse_set(cfg, items) -> dict:
    """["lambda_seg=0", "freeze_local=true"] -> overrides typed like the fields of dataclass ``cfg``."""
    types = {f.name: str(f.type) for f in dataclasses.fields(cfg) if f.name != "name"}
    fields = set(types)
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, val = item.partition("=")
        if not sep or key not in fields:
            raise UserError(f"bad --set '{item}': expected FIELD=VALUE with FIELD one of "
                            f"{', '.join(sorted(fields))}")
        default = getattr(cfg, key)
        if default is None:          # an optional field ("int | None"): typed by its annotation
            if val.lower() in ("none", "null"):
                out[key] = None
                continue
            kind = types[key].split("|")[0].strip()
            default = {"int": 0, "float": 0.0, "bool": False}.get(kind, "")
        try:
            if isinstance(default, bool):
                if val.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(val)
                out[key] = val.lower() in ("1", "true", "yes")
            elif isinstance(default, int):
                out[key] = int(val)
            elif isinstance(default, float):
                out[key] = float(val)
            elif isinstance(default, tuple):        # nested lists (channel tables) become tuples too
                out[key] = tuple(tuple(x) if isinstance(x, list) else x for x in json.loads(val))
            else:
                out[key] = val
        except (ValueError, json.JSONDecodeError):
            raise UserError(f"bad --set '{item}': cannot read '{val}' as {type(default).__name__}") from None
    return out


def from_args(get_config, args, default: str):
    """The config a training command asks for: ``--config`` (or ``default``), ``--set`` overrides,
    then ``--steps``."""
    base = get_config(getattr(args, "config", None) or default)
    cfg = get_config(base, **parse_set(base, getattr(args, "set", None)))
    if getattr(args, "steps", None):
        cfg = replace(cfg, steps=int(args.steps))
    return cfg
