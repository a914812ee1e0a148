"""Lightning callbacks of a training run: run folder, checkpoints (with the atomic checkpoint I/O), sample images,
evaluation loss and validation samples, the best step (and early stopping), each rank's seed, progress, the
end-of-run summary and loss plot."""
from ldm.callbacks.best_step import BestStep
from ldm.callbacks.checkpointing import AtomicCheckpointIO, StartAtStep, StepCheckpoint
from ldm.callbacks.eval_loss import EvaluationLoss
from ldm.callbacks.image_logger import ImageLogger
from ldm.callbacks.loss_plot import LossPlot
from ldm.callbacks.progress import StepProgress, quiet_lightning
from ldm.callbacks.seeding import RankSeed
from ldm.callbacks.setup import SetupCallback
from ldm.callbacks.timing import StepTimer
from ldm.callbacks.validation import ValidationSamples

__all__ = ["AtomicCheckpointIO", "BestStep", "EvaluationLoss", "ImageLogger", "LossPlot", "RankSeed", "SetupCallback",
           "StartAtStep", "StepCheckpoint", "StepProgress", "StepTimer", "ValidationSamples", "quiet_lightning"]
