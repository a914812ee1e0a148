"""Configs: the one YAML reader; a run's merged config (main.py's --base files and overrides), checked so that every
key is known and every value has its type, from the keyword arguments (and their type hints) of the classes that the
config's `target:`s name, a mistake being one line naming the key; and a model config's sizes (native image size,
latent shapes)."""
import collections.abc
import inspect
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.util import UserError, get_obj_from_str, project_path

TOP_LEVEL_KEYS = ("model", "data", "lightning")
LIGHTNING_KEYS = ("trainer", "modelcheckpoint", "callbacks", "loss_plot", "progress")
NODE_KEYS = {"target": str, "params": dict, "base_learning_rate": float}  # the lr sits beside target in model configs
CONFIGS = project_path("configs")
DEFAULT_CONFIG = CONFIGS / "stable-diffusion" / "v1-inference.yaml"
REQUIRED_CONFIG_KEYS = ("model.target", "model.params.channels", "model.params.unet_config.params.channel_mult",
                        "model.params.first_stage_config.params.ddconfig.ch_mult")


def check_sections(config: DictConfig) -> None:
    """Refuse a top-level key or a `lightning:` key that nothing reads (a misspelled section or override)."""
    for where, node, known in (("", config, TOP_LEVEL_KEYS), ("lightning.", config.get("lightning") or {},
                                                                  LIGHTNING_KEYS)):
        for key in node:
            if key not in known:
                raise UserError(f"config key {where}{key} is unknown (known here: {', '.join(known)}): a misspelled "
                                "section or a.b=c override?")


def describe_type(hint: Any) -> str:
    """A type hint as users read it: int, float, a list, one of 'a', 'b', ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in args if a is not type(None)) + " or null"
    named = {list: "a list", tuple: "a list", collections.abc.Sequence: "a list", dict: "a mapping",
             collections.abc.Mapping: "a mapping"}
    return named.get(origin or hint) or getattr(hint, "__name__", str(hint))


def fits(value: Any, hint: Any) -> bool:
    """Whether a YAML value (None, bool, int, float, str, list, dict) fits a type hint; hints it cannot judge fit."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    base = origin or hint
    if base in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if base is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(fits(v, a) for v, a in zip(value, args))
        return not args or all(fits(v, args[0]) for v in value)
    if base in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    return True  # a class of our own or a callable: the constructor judges it


def check_node(node: Any, where: str) -> None:
    """Check a resolved config tree: in every `target:`/`params:` mapping, each param is a keyword argument of the
    target's constructor, of its type; nested mappings and lists are walked too."""
    if isinstance(node, list):
        for index, item in enumerate(node):
            check_node(item, f"{where}[{index}]")
        return
    if not isinstance(node, dict):
        return
    if isinstance(node.get("target"), str) and "." in node["target"] and set(node) <= set(NODE_KEYS):
        check_target(node, where)  # (an optimizer spec, a short name or flags beside target: optim/factory.py)
    for key, value in node.items():
        check_node(value, f"{where}.{key}" if where else str(key))


def keyword_arguments(target: Any) -> tuple[Optional[dict[str, inspect.Parameter]], dict[str, Any], bool]:
    """The keyword arguments a class (with those its **kwargs pass on to its bases) or function takes, their type
    hints, and whether it takes any keyword at all; None when its signature cannot be read."""
    functions = [klass.__dict__["__init__"] for klass in target.__mro__ if "__init__" in klass.__dict__] \
        if inspect.isclass(target) else [target]
    parameters: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    for function in functions:
        try:
            own, own_hints = inspect.signature(function).parameters, typing.get_type_hints(function)
        except (TypeError, ValueError, NameError):
            return (parameters or None), hints, True
        for name, parameter in own.items():
            if parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY) \
                    and name != "self":
                parameters.setdefault(name, parameter)
                hints.setdefault(name, own_hints.get(name, inspect.Parameter.empty))
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in own.values()):
            return parameters, hints, False
        if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in own.values()) or function is object.__init__:
            return parameters, hints, True  # (*args, **kwargs): passed on to what we cannot follow
    return parameters, hints, True


def check_target(node: Mapping[str, Any], where: str) -> None:
    """One `target:`/`params:` mapping against the signature of the class it names."""
    prefix = f"{where}." if where else ""
    for key, value in node.items():
        expected = NODE_KEYS[key] if key != "params" else typing.Optional[dict]
        if not fits(value, expected):
            raise UserError(f"config {prefix}{key} = {value!r}: expected {describe_type(expected)}")
    try:
        target = get_obj_from_str(node["target"])
    except (ImportError, AttributeError, ValueError) as err:
        raise UserError(f"config {prefix}target {node['target']!r} cannot be imported ({err})") from None
    parameters, hints, takes_any = keyword_arguments(target)
    if parameters is None:  # a builtin or a class without a readable signature: it judges its values itself
        return
    for key, value in (node.get("params") or {}).items():
        if key not in parameters:
            if takes_any:
                continue
            raise UserError(f"config key {prefix}params.{key} is unknown to {node['target']} "
                            f"(it takes {', '.join(sorted(parameters))})")
        hint = hints[key]
        if not fits(value, hint) and not (value is None and parameters[key].default is None):
            raise UserError(f"config {prefix}params.{key} = {value!r}: expected {describe_type(hint)}")


def check_config(config: DictConfig | Mapping, where: str = "") -> None:
    """Check every key and value of a (part of a) run config; interpolations are resolved first."""
    try:
        container = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
    except OmegaConfBaseException as err:  # an interpolation ${...} that names nothing
        raise UserError(f"config {where or 'file'}: {' '.join(str(err).split())}") from None
    check_node(container, where)


def shown(path: str | os.PathLike) -> str:
    """A path as the user would type it: relative to the working folder when it lies below it."""
    path = Path(path)
    return str(path.relative_to(Path.cwd())) if path.is_absolute() and path.is_relative_to(Path.cwd()) else str(path)


def read_yaml(path: str | os.PathLike, missing_hint: str = "") -> DictConfig:
    """A YAML file as an OmegaConf config, with a one-line error when it is missing or malformed."""
    if not Path(path).is_file():
        raise UserError(f"config not found: {path}{missing_hint}")
    try:
        return OmegaConf.load(path)
    except Exception as err:  # yaml and omegaconf raise many error types for a malformed file
        raise UserError(f"{path}: not a readable YAML config ({err})") from None


def load_config(path: str) -> DictConfig:
    """The YAML model config, with a one-line error when it is missing, malformed or not an SD v1 model config."""
    config = read_yaml(path, " (pass --config configs/stable-diffusion/v1-inference.yaml)")
    for key in REQUIRED_CONFIG_KEYS:
        if OmegaConf.select(config, key) is None:
            raise UserError(f"{path}: has no {key}; is it an SD v1 model config such as v1-inference.yaml?")
    return config


def load_run_config(paths: Sequence[str], overrides: Sequence[str]) -> DictConfig:
    """main.py's config: the --base files merged in order, then the key=value overrides, every key checked."""
    if not paths:
        raise UserError("no config: pass --base configs/stable-diffusion/v1-finetune_unfrozen.yaml")
    configs = [read_yaml(path) for path in paths]
    try:
        config = OmegaConf.merge(*configs, OmegaConf.from_dotlist(list(overrides)))
    except (OmegaConfBaseException, ValueError) as err:
        raise UserError(f"cannot apply the overrides {' '.join(overrides)}: {err}") from None
    for section in ("model", "data"):
        if section not in config:
            raise UserError(f"the merged config has no '{section}' section; start from "
                            "configs/stable-diffusion/v1-finetune_unfrozen.yaml")
    check_sections(config)
    return config


def vae_factor(config: DictConfig) -> int:
    """The autoencoder's downsampling factor f, 2^(levels - 1)."""
    return 2 ** (len(config.model.params.first_stage_config.params.ddconfig.ch_mult) - 1)


def native_size(config: DictConfig) -> int:
    """The image side the model was trained at: latent image_size times f (512 for SD v1)."""
    return config.model.params.image_size * vae_factor(config)


def size_multiple(config: DictConfig) -> int:
    """Image sides must be multiples of this: f times the UNet's 2^(levels - 1) (64 for SD v1)."""
    return vae_factor(config) * 2 ** (len(config.model.params.unet_config.params.channel_mult) - 1)


def latent_shape(config: DictConfig, height: int, width: int, channels: Optional[int] = None,
                 factor: Optional[int] = None) -> tuple[int, int, int]:
    """Latent (C, H/f, W/f) for an image size, checked against the autoencoder and UNet of `config`; `channels` and
    `factor` (--C, --f) default to the config's."""
    channels = config.model.params.channels if channels is None else channels
    factor = vae_factor(config) if factor is None else factor
    if factor != vae_factor(config):
        raise UserError(f"--f {factor} does not match the autoencoder of the config (f={vae_factor(config)}); drop --f")
    if channels != config.model.params.channels:
        raise UserError(f"--C {channels} does not match the config's {config.model.params.channels} latent channels; "
                        "drop --C")
    multiple = size_multiple(config)
    for flag, size in (("--H", height), ("--W", width)):
        if size <= 0 or size % multiple:
            nearest = sorted({max(size // multiple, 1) * multiple, (size // multiple + 1) * multiple})
            raise UserError(f"{flag} {size} must be a positive multiple of {multiple} for this model "
                            f"(autoencoder x{factor}, UNet levels); try {' or '.join(map(str, nearest))}")
    return channels, height // factor, width // factor
