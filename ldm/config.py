"""Checks of a merged run config: every key is known and every value has its type, from the keyword arguments (and
their type hints) of the classes that the config's `target:`s name; a mistake is one line naming the key."""
import collections.abc
import inspect
import types
import typing
from typing import Any, Mapping, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.util import UserError, get_obj_from_str

TOP_LEVEL_KEYS = ("model", "data", "lightning")
LIGHTNING_KEYS = ("trainer", "modelcheckpoint", "callbacks", "loss_plot", "progress")
NODE_KEYS = {"target": str, "params": dict, "base_learning_rate": float}  # the lr sits beside target in model configs


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
        check_target(node, where)  # (an optimizer spec, with a short name or flags beside target, is ldm.optim's)
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
