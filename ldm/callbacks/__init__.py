"""Lightning callbacks of a training run: run folder, checkpoints (with the atomic checkpoint I/O), sample images."""
from ldm.callbacks.checkpointing import AtomicCheckpointIO, StepCheckpoint
from ldm.callbacks.image_logger import ImageLogger
from ldm.callbacks.setup import SetupCallback

__all__ = ["AtomicCheckpointIO", "ImageLogger", "SetupCallback", "StepCheckpoint"]
