"""EMA of the trained weights (`model.params.use_ema`): the UNet's in a full fine-tune, the adapter weights in an
adapter (LoRA) run, kept by LitEma under the SD files' `model_ema.*` names and swapped in by `ema_scope`."""
import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from torch import nn

from ldm.modules.ema import LitEma

logger = logging.getLogger(__name__)


class EmaWeights:
    """Mixed into DDPM, which sets `ema_options` (LitEma's decay, warm-up and device) and `use_ema`."""

    ema_options: dict[str, Any]
    use_ema: bool
    model: nn.Module

    def init_ema(self, module: nn.Module, include: Optional[Callable[[str], bool]] = None) -> None:
        """Average the trained parameters of `module` (those `include` accepts) from now on: the UNet's, or an adapter
        run's adapter weights once injected."""
        self.use_ema = True
        self.model_ema = LitEma(module, include=include, **self.ema_options)
        # each rank averages the same weights: DDP need not broadcast the average every step
        self._ddp_params_and_buffers_to_ignore = [f"model_ema.{name}" for name, _ in self.model_ema.named_buffers()]

    def ema_source(self) -> nn.Module:
        """The module whose parameters the EMA averages, by their names in it: the UNet's wrapper."""
        return self.model

    @contextmanager
    def ema_scope(self, context: str | None = None) -> Iterator[None]:
        """Run the block with the EMA weights swapped in (a no-op without EMA)."""
        if not self.use_ema:
            yield
            return
        source = self.ema_source()
        averaged = [p for name, p in source.named_parameters() if name in self.model_ema.shadow_names]
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
