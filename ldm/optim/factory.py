"""Optimizers of a training run: fused AdamW by default, or the one that `model.params.optimizer` names, stepped
per parameter when the spec asks for fused backward or when bf16 weights are rounded stochastically."""
import inspect
import logging
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.optim.adamw8bit import AdamW8bit
from ldm.optim.per_parameter import Params, PerParameterOptimizer, as_param_groups
from ldm.util import UserError, get_obj_from_str, import_offline

logger = logging.getLogger(__name__)

# name: (module, class, pip package) of the optional optimizers
OPTIONAL = {
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "lion": ("lion_pytorch", "Lion", "lion-pytorch"),
    "schedulefree_adamw": ("schedulefree", "AdamWScheduleFree", "schedulefree"),
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
}
BUILTIN = {"adamw8bit_torch": AdamW8bit, "adafactor": torch.optim.Adafactor}
NAMES = ("adamw", *BUILTIN, *OPTIONAL)
SPEC_KEYS = ("target", "params", "fused_backward", "stochastic_rounding")
# optimizers that cannot step one parameter alone, by the package that they come from
WHOLE_MODEL = {"prodigyopt": "Prodigy estimates one step size from all parameters together",
               "schedulefree": "a schedule-free optimizer switches all weights together between train() and eval()"}
PRODIGY_LR_RANGE = (0.1, 10.0)  # Prodigy estimates the step size itself; its lr is a multiplier, usually 1.0


def adamw(params: Params, lr: float, **kwargs) -> torch.optim.AdamW:
    """AdamW, fused into one kernel where this torch has one for the parameters' device (on a CPU it is about eight
    times faster than the per-tensor loop for the toy model's 5 M parameters)."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # an older torch, or a device without the fused kernel
        return torch.optim.AdamW(params, lr=lr, **kwargs)


def make_optimizer(spec: Optional[Mapping], params: Params, lr: float) -> torch.optim.Optimizer:
    """The optimizer that `model.params.optimizer` ({target: name or dotted class path, params: {...},
    fused_backward: false, stochastic_rounding: true}) names, at learning rate `lr`; None is fused AdamW with torch's
    defaults. It is a PerParameterOptimizer for fused backward, or to round trainable bf16 weights stochastically."""
    target, kwargs, fused_backward, rounding = _parse(spec)
    params = as_param_groups(params)
    factory = _factory(target, kwargs)
    package = factory.__module__.split(".")[0]  # the optimizer's, by name or by dotted path
    if package == "prodigyopt":
        _check_prodigy(params, lr)
    if getattr(factory, "rounds_bf16", False):  # it steps bf16 weights in fp32 and rounds them stochastically itself
        kwargs.setdefault("stochastic_rounding", rounding is not False)
        rounding = False
    build = partial(factory, lr=lr, **kwargs)
    if _per_parameter(target, package, params, fused_backward, rounding):
        return _build(target, lambda: PerParameterOptimizer(params, build, fused_backward=fused_backward,
                                                            stochastic_rounding=rounding is not False))
    optimizer = _build(target, lambda: build(params))
    if is_schedule_free(optimizer):
        optimizer.train()  # its step() refuses to run in eval mode, the mode it is created in
    return optimizer


def uses_fused_backward(optimizer: Any) -> bool:
    """Whether an optimizer (or Lightning's wrapper of one) steps the parameters in their gradient hooks during
    backward, so that no gradient is left after backward (no gradient accumulation, clipping or scaling)."""
    return isinstance(optimizer, PerParameterOptimizer) and optimizer.fused_backward


def _per_parameter(target: str, package: str, groups: list[dict], fused_backward: bool,
                   rounding: Optional[bool]) -> bool:
    """Whether the optimizer steps each parameter alone: for fused backward, or to round trainable bf16 weights
    stochastically (`rounding` None: by default, which an optimizer of the whole model turns off with a warning)."""
    bf16 = rounding is not False and any(p.requires_grad and p.dtype == torch.bfloat16
                                         for group in groups for p in group["params"])
    if not (fused_backward or bf16):
        return False
    reason = WHOLE_MODEL.get(package)
    if reason is None:
        return True
    if fused_backward:
        raise UserError(f"model.params.optimizer {target}: fused_backward steps each parameter alone during "
                        f"backward, but {reason}; set model.params.optimizer.fused_backward: false")
    if rounding:
        raise UserError(f"model.params.optimizer {target}: stochastic_rounding steps each bf16 parameter alone, but "
                        f"{reason}; set model.params.optimizer.stochastic_rounding: false")
    logger.warning("model.params.optimizer %s: the bf16 weights are rounded to nearest, not stochastically, since "
                   "%s", target, reason)
    return False


def state_tensors(node: Any) -> list[torch.Tensor]:
    """The tensors of an optimizer state (or of one parameter's), also where bitsandbytes nests them in a dict."""
    if isinstance(node, torch.Tensor):
        return [node]
    if isinstance(node, Mapping):
        return [t for value in node.values() for t in state_tensors(value)]
    return []


def is_schedule_free(optimizer: Any) -> bool:
    """Whether an optimizer keeps two sets of weights and switches between them with train() and eval()."""
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


@contextmanager
def optimizer_eval_mode(optimizers: Union[torch.optim.Optimizer, Iterable[torch.optim.Optimizer]]) -> Iterator[None]:
    """Put the eval weights of schedule-free optimizers into the model for the block (to sample or save them), and
    the training weights back on exit; optimizers without train() and eval() are left alone."""
    if isinstance(optimizers, torch.optim.Optimizer):
        optimizers = [optimizers]
    training = [opt for opt in optimizers if is_schedule_free(opt) and _in_train_mode(opt)]
    for optimizer in training:
        optimizer.eval()
    try:
        yield
    finally:
        for optimizer in training:
            optimizer.train()


def _in_train_mode(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a schedule-free optimizer holds its training weights (assumed so when it has no train_mode flag)."""
    return any(group.get("train_mode", True) for group in optimizer.param_groups)


def _parse(spec: Optional[Mapping]) -> tuple[str, dict, bool, Optional[bool]]:
    """The target, keyword arguments, fused_backward and stochastic_rounding (None when unset) of an optimizer
    spec, checked for stray keys; without target or params (or without a spec), the target is adamw."""
    if spec is None:
        return "adamw", {}, False, None
    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    if not isinstance(spec, Mapping):
        raise UserError(f"model.params.optimizer: expected {{target: NAME, params: {{...}}}}, got {spec!r}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise UserError(f"model.params.optimizer has unknown keys {unknown}; expected "
                        f"{', '.join(repr(key) for key in SPEC_KEYS)}")
    for key in ("fused_backward", "stochastic_rounding"):
        if spec.get(key) is not None and not isinstance(spec[key], bool):
            raise UserError(f"model.params.optimizer.{key}: expected true or false, got {spec[key]!r}")
    flags = (bool(spec.get("fused_backward")), spec.get("stochastic_rounding"))
    only_flags = bool(spec) and "params" not in spec  # {fused_backward: ..., stochastic_rounding: ...} alone
    target = spec.get("target", "adamw" if only_flags else None)
    if not isinstance(target, str) or not target:
        raise UserError(f"model.params.optimizer.target is missing; one of {', '.join(NAMES)} or a dotted class path")
    kwargs = spec.get("params") or {}
    if not isinstance(kwargs, Mapping):
        raise UserError(f"model.params.optimizer.params: expected a mapping of keyword arguments, got {kwargs!r}")
    return target, dict(kwargs), *flags


def _factory(target: str, kwargs: Mapping) -> Callable[..., torch.optim.Optimizer]:
    """The constructor that the target names, `factory(params, lr=..., **kwargs)`, its keywords checked."""
    if target == "adamw":
        _check_keywords(target, torch.optim.AdamW, kwargs, reserved=("fused",))
        return adamw
    cls = _import_class(target)
    _check_keywords(target, cls, kwargs)
    return cls


def _import_class(target: str) -> type:
    """The optimizer class of a known name (its optional package imported here) or of a dotted path."""
    if target in BUILTIN:
        return BUILTIN[target]
    if target in OPTIONAL:
        module, name, package = OPTIONAL[target]
        try:
            return getattr(import_offline(module), name)
        except ImportError:
            raise UserError(f"model.params.optimizer {target} needs the {package} package: "
                            f"pip install {package}") from None
    if "." not in target:
        raise UserError(f"model.params.optimizer: unknown optimizer {target!r}; known names are {', '.join(NAMES)}, "
                        "or give a dotted class path such as torch.optim.SGD")
    try:
        cls = get_obj_from_str(target)
    except (ImportError, AttributeError) as err:
        raise UserError(f"model.params.optimizer {target}: cannot import it ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise UserError(f"model.params.optimizer {target} is not a torch.optim.Optimizer class")
    return cls


def _check_keywords(target: str, cls: type, kwargs: Mapping, reserved: tuple[str, ...] = ()) -> None:
    """A clear error for a keyword that the optimizer does not take, or that is set elsewhere."""
    if "lr" in kwargs:
        raise UserError(f"model.params.optimizer {target}: set the learning rate with model.base_learning_rate, "
                        "not model.params.optimizer.params.lr")
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # a class whose signature Python cannot read: let it check its own arguments
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = set(parameters) - {"params", "lr", *reserved}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise UserError(f"model.params.optimizer {target} has no option {', '.join(unknown)}; "
                        f"it takes {', '.join(sorted(accepted))}")


def _check_prodigy(params: list, lr: float) -> None:
    """Prodigy takes one learning rate for all parameter groups (0 freezes a group), and is usually run at lr 1.0."""
    for i, group in enumerate(params):
        if isinstance(group, dict) and group.get("lr", lr) not in (lr, 0.0):
            raise UserError(f"model.params.optimizer prodigy: parameter group {i} has lr {group['lr']:g} but Prodigy "
                            f"takes one learning rate ({lr:g}) for all groups, or 0 to freeze one; leave "
                            "model.params.cond_stage_lr (--text_encoder_lr) unset")
    low, high = PRODIGY_LR_RANGE
    if not low <= lr <= high:
        logger.warning("model.params.optimizer prodigy at learning rate %g: Prodigy finds the step size itself and "
                       "lr ~1.0 is usual (model.base_learning_rate=1.0, without --scale_lr)", lr)


def _build(target: str, construct: Callable[[], torch.optim.Optimizer]) -> torch.optim.Optimizer:
    """Call the optimizer's constructor, turning a bad option value into a UserError."""
    try:
        return construct()
    except (TypeError, ValueError) as err:
        raise UserError(f"model.params.optimizer {target}: {err}") from err


def check_fused_backward(trainer: Any, compile_unet: bool) -> None:
    """Refuse the trainer settings that need the full set of gradients, which a fused backward never holds."""
    problems = [(trainer.accumulate_grad_batches > 1, f"accumulate_grad_batches {trainer.accumulate_grad_batches} "
                 "(the gradients of several batches must be summed before the step)"),
                (bool(trainer.gradient_clip_val), f"gradient_clip_val {trainer.gradient_clip_val} (clipping "
                 "needs the norm of all gradients)"),
                (str(trainer.precision) == "16-mixed", "precision 16-mixed (its loss scaler unscales all "
                 "gradients before the step; use bf16-mixed or bf16-true)"),
                (trainer.world_size > 1, f"{trainer.world_size} processes (each parameter would step before its "
                 "gradient is averaged across them)"),
                (compile_unet, "compile_unet (--compile: the compiled UNet's backward returns all its "
                 "gradients at once, so the fused backward would save nothing)")]
    for problem, why in problems:
        if problem:
            raise UserError(f"model.params.optimizer.fused_backward (--fused_backward) does not work with {why}; "
                            "drop one of them")
