"""EMA of the trained weights (`model.params.use_ema`): the UNet's in a full fine-tune, the adapter weights in an
adapter (LoRA) run, and the embedding vectors beside either (or alone in textual inversion), kept by LitEma under the
SD files' `model_ema.*` names and swapped in by `ema_scope`."""
import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from torch import nn

from ldm.modules.ema import Averaged, LitEma, named_parameters

logger = logging.getLogger(__name__)


class EmaWeights:
    """Mixed into DDPM, which sets `ema_options` (LitEma's decay, warm-up and device) and `use_ema`."""

    ema_options: dict[str, Any]
    use_ema: bool
    model: nn.Module

    def init_ema(self, module: Averaged, include: Optional[Callable[[str], bool]] = None) -> None:
        """Average the trained parameters of `module` (those `include` accepts) from now on: the UNet's, an adapter
        run's adapter weights once injected, or a textual inversion's vectors once made."""
        self.use_ema = True
        self.model_ema = LitEma(module, include=include, **self.ema_options)
        self.ignore_ema_in_ddp()

    def extend_ema(self, name: str, param: nn.Parameter) -> None:
        """Average `param` too from now on (starting from its value), named `name` in ema_source."""
        self.model_ema.track(name, param)
        self.ignore_ema_in_ddp()

    def ignore_ema_in_ddp(self) -> None:
        """Each rank averages the same weights: DDP need not broadcast the average every step."""
        self._ddp_params_and_buffers_to_ignore = [f"model_ema.{name}" for name, _ in self.model_ema.named_buffers()]

    def ema_source(self) -> Averaged:
        """What the EMA averages (a module, or parameters by name), by the names the average keeps: the UNet's
        wrapper."""
        return self.model

    @contextmanager
    def ema_scope(self, context: str | None = None) -> Iterator[None]:
        """Run the block with the EMA weights swapped in (a no-op without EMA)."""
        if not self.use_ema:
            yield
            return
        source = self.ema_source()
        averaged = [p for name, p in named_parameters(source) if name in self.model_ema.shadow_names]
        self.model_ema.store(averaged)
        self.model_ema.copy_to(source)
        if context:
            logger.info("%s: switched to EMA weights", context)
        try:
            yield
        finally:
            self.model_ema.restore(averaged)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer's step, then the EMA's (before the callbacks of the step, so that a step file holds both)."""
        super().optimizer_step(*args, **kwargs)
        if self.use_ema:
            self.model_ema(self.ema_source())
