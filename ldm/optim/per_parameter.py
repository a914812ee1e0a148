"""One optimizer per parameter, so that each parameter can be stepped alone: in its gradient hook during backward
(the full set of gradients is never held), or with a bf16 weight updated in fp32 and rounded stochastically."""
import weakref
from collections.abc import MutableMapping
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakIdKeyDictionary

from ldm.util import UserError

Params = Iterable[Union[torch.nn.Parameter, dict]]  # parameters, or param groups with options of their own
Build = Callable[[list], torch.optim.Optimizer]  # parameters or param groups -> an optimizer over them
NOT_COPIED = frozenset({"params", "fused", "foreach", "capturable", "differentiable"})  # how, not how much, to step
LOW_BITS = 1 << 16  # the float32 mantissa bits that bfloat16 drops

_BACKWARD_STEPPER = WeakIdKeyDictionary()  # parameter -> weak reference to the optimizer that steps it in backward


def stochastic_round_to_bf16(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """`x` in bfloat16, rounded up or down at random with the probabilities that make the rounding unbiased: a
    uniform integer in [0, 2^16) is added to the float32 bit pattern and the low 16 bits are cut (Gupta et al. 2015,
    "Deep learning with limited numerical precision"); NaN stays NaN."""
    x = x.float().contiguous()
    noise = torch.randint(0, LOW_BITS, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = noise.add_(x.view(torch.int32)).bitwise_and_(-LOW_BITS).view(torch.float32).bfloat16()
    return torch.where(x.isnan(), x.bfloat16(), rounded)


def as_param_groups(params: Params) -> list[dict]:
    """The parameters as param groups, each group's parameters in a list (so that they can be read more than once)."""
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    return [{**group, "params": [group["params"]] if isinstance(group["params"], Tensor) else list(group["params"])}
            for group in groups]


class PerParameterOptimizer(torch.optim.Optimizer):
    """The optimizer that `build` makes, one instance per parameter; `param_groups` are the caller's groups (read
    and set their lr as usual), copied into the inner optimizer before each parameter's step."""

    def __init__(self, params: Params, build: Build, fused_backward: bool = False, stochastic_rounding: bool = True,
                 generator: Optional[torch.Generator] = None):
        groups = as_param_groups(params)
        self.fused_backward, self.stochastic_rounding, self.generator = fused_backward, stochastic_rounding, generator
        self._build = build
        self._inner: dict[Tensor, torch.optim.Optimizer] = {}
        self._group_index: dict[Tensor, int] = {}
        self._hooks: list[RemovableHandle] = []
        first = next((p for group in groups for p in group["params"]), None)
        super().__init__(groups, build([first]).defaults if first is not None else {})
        self.state = InnerState(self._inner)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group, with an inner optimizer (and in fused backward a gradient hook) for each of its parameters."""
        options = {k: v for k, v in param_group.items() if k != "params"}
        index = len(self.param_groups)
        super().add_param_group(param_group)
        for p in param_group["params"]:
            self._inner[p] = self._build([{**options, "params": [p]}])
            self._group_index[p] = index
            if self.fused_backward and p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._step_in_backward))
                _BACKWARD_STEPPER[p] = weakref.ref(self)

    def remove_hooks(self) -> None:
        """Stop stepping the parameters during backward."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Run the closure (forward and backward) and return its loss; step each parameter that has a gradient,
        unless the gradient hooks stepped them already (fused backward)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.fused_backward:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self._step_one(p)
        return loss

    def _step_in_backward(self, p: Tensor) -> None:
        """Step a parameter as soon as its gradient is complete and drop the gradient; only the newest optimizer
        built over a parameter steps it (an older one's hooks may still be registered)."""
        owner = _BACKWARD_STEPPER.get(p)
        if owner is not None and owner() is self:
            self._step_one(p)
            p.grad = None

    @torch.no_grad()
    def _step_one(self, p: Tensor) -> None:
        """Step one parameter with its group's current hyperparameters; a bf16 one in fp32, rounded stochastically."""
        inner = self._inner[p]
        group = self.param_groups[self._group_index[p]]
        inner.param_groups[0].update((k, v) for k, v in group.items() if k not in NOT_COPIED)
        if not (self.stochastic_rounding and p.dtype == torch.bfloat16):
            inner.step()
            return
        weight, grad = p.data, p.grad
        p.data, p.grad = weight.float(), grad.float()  # data first: a grad must match the parameter's dtype
        try:
            inner.step()
            weight.copy_(stochastic_round_to_bf16(p.data, self.generator))
        finally:
            p.data, p.grad = weight, grad

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load what `state_dict()` saved: each group's hyperparameters and each parameter's state, in the dtypes
        it was saved in (the fp32 state of a bf16 parameter stays fp32), on the parameter's device."""
        load_state(self, state_dict, self._place_state)

    def _place_state(self, key: Any, value: Any, param: Tensor) -> Any:
        """A loaded state value where the parameter's inner optimizer keeps it: its own `place_state` where it has
        one, else on the parameter's device, with a 'step' count left where torch keeps it (on the CPU unless the
        step is fused or capturable)."""
        inner = self._inner[param]
        if hasattr(inner, "place_state"):
            return inner.place_state(key, value, param)
        group = inner.param_groups[0]
        if not isinstance(value, Tensor) or (key == "step" and not (group.get("fused") or group.get("capturable"))):
            return value
        return value.to(param.device)


def load_state(optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any],
               place: Callable[[Any, Any, Tensor], Any]) -> None:
    """Load a `state_dict()` into `optimizer`: each group's hyperparameters, and each parameter's state with every
    value placed by `place(key, value, parameter)`, never cast as torch's load_state_dict casts it."""
    saved_groups = state_dict["param_groups"]
    sizes, saved = [len(g["params"]) for g in optimizer.param_groups], [len(g["params"]) for g in saved_groups]
    if sizes != saved:
        raise UserError(f"the saved optimizer state has parameter groups of {saved} parameters but this "
                        f"optimizer has {sizes}; resume with the same trainable parameters and groups")
    by_index = {}
    for group, saved_group in zip(optimizer.param_groups, saved_groups):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
        by_index.update(zip(saved_group["params"], group["params"]))
    optimizer.state.clear()
    for index, value in state_dict["state"].items():
        p = by_index[index]
        optimizer.state[p] = {key: place(key, v, p) for key, v in value.items()}


class InnerState(MutableMapping):
    """`optimizer.state` of a PerParameterOptimizer: parameter -> the state its inner optimizer keeps, to read, set
    and delete (as Lightning does to move state between devices and the trainer does to drop a frozen part's)."""

    def __init__(self, inner: Mapping[Tensor, torch.optim.Optimizer]):
        self._inner = inner

    def __getitem__(self, p: Tensor) -> Any:
        if p not in self._inner or p not in self._inner[p].state:
            raise KeyError("no optimizer state for this parameter")
        return self._inner[p].state[p]

    def __setitem__(self, p: Tensor, value: Any) -> None:
        if p not in self._inner:
            raise KeyError("not a parameter of this optimizer")
        self._inner[p].state[p] = value

    def __delitem__(self, p: Tensor) -> None:
        if p not in self._inner:
            raise KeyError("not a parameter of this optimizer")
        del self._inner[p].state[p]

    def __iter__(self) -> Iterator[Tensor]:
        return (p for p, inner in self._inner.items() if p in inner.state)

    def __len__(self) -> int:
        return sum(1 for _ in self)
