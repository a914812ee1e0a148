"""`--stop_text_encoder_training`: the text encoder of a LatentDiffusion trains until a step and is frozen from it on,
for the rest of the run and for every resume of it (last.ckpt records the step of the freeze)."""
import logging
from typing import Any, Optional

from pytorch_lightning.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)

TEXT_ENCODER_STOPPED_AT = "text_encoder_stopped_at"  # the key of last.ckpt that records the step of the freeze


class TextEncoderStop:
    """Mixed into LatentDiffusion; `cond_stage_stop_step` comes from the config, `text_encoder_stopped_at` from a
    resumed last.ckpt."""

    cond_stage_stop_step: Optional[float]
    text_encoder_stopped_at: Optional[int]

    def text_encoder_stop_step(self) -> Optional[int]:
        """The step from which the text encoder is frozen (cond_stage_stop_step, a fraction of max_steps below 1), or
        the step at which the resumed run froze it, whichever is earlier."""
        stop = self.cond_stage_stop_step
        if stop is not None:
            stop = round(stop * self.trainer.max_steps) if stop < 1 else int(stop)
        stops = [step for step in (stop, self.text_encoder_stopped_at) if step is not None]
        return min(stops) if stops else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """last.ckpt also records the step at which the text encoder was frozen."""
        super().on_save_checkpoint(checkpoint)
        if self.text_encoder_stopped_at is not None:
            checkpoint[TEXT_ENCODER_STOPPED_AT] = self.text_encoder_stopped_at

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A resumed run's text encoder stays frozen from the step at which its run froze it."""
        super().on_load_checkpoint(checkpoint)
        self.text_encoder_stopped_at = checkpoint.get(TEXT_ENCODER_STOPPED_AT)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        stop = self.text_encoder_stop_step()
        if stop is not None and self.cond_stage_trainable and self.global_step >= stop:
            self.stop_text_encoder_training(stop)
            self.text_encoder_stopped_at = stop

    def stop_text_encoder_training(self, stop: int) -> None:
        """Freeze the text encoder and drop its optimizer state; its parameter group stays (empty of gradients), so
        that a resumed run's optimizer state still matches the groups; under DDP the model is wrapped anew."""
        self.cond_stage_trainable = False
        self.cond_stage_model.requires_grad_(False).train(False)
        for optimizer in self.trainer.optimizers:
            for param in self.cond_stage_model.parameters():
                param.grad = None
                optimizer.state.pop(param, None)
        strategy = self.trainer.strategy
        if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
            strategy.model = strategy.model.module
            strategy.configure_ddp()  # a wrapper waits for the gradients of all that trained when it was built
        logger.info("step %d: the text encoder is frozen from step %d on (stop_text_encoder_training); the UNet "
                    "trains on", self.global_step, stop)
