"""Small helpers shared by the whole package: the config factory and parameter counting."""
import importlib
from typing import Any, Mapping

import torch


class UserError(Exception):
    """Bad input the user can fix; command lines print the message as one line and exit with status 1."""


def get_obj_from_str(path: str) -> Any:
    """Import `package.module.Name` and return `Name`."""
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def instantiate_from_config(config: Mapping, **extra: Any) -> Any:
    """Build `target(**params, **extra)` from a `target:` / `params:` mapping."""
    if "target" not in config:
        raise KeyError(f"config has no 'target' to instantiate: {dict(config)}")
    unknown = set(config) - {"target", "params", "base_learning_rate"}  # the lr sits beside target in model configs
    if unknown:
        raise KeyError(f"config for {config['target']} has unknown keys {sorted(unknown)}; expected 'target' and 'params'")
    params = dict(config.get("params") or {})
    return get_obj_from_str(config["target"])(**params, **extra)


def count_params(module: torch.nn.Module) -> int:
    """Number of parameters of a module (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())
