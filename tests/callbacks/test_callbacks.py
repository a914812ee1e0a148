"""Training callbacks on a stand-in trainer: when last.ckpt and step files are written and pruned, the progress
bar on a terminal, and the Lightning lines that are silenced."""
import io
import logging
import shlex
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ldm.callbacks import StepCheckpoint, StepProgress, quiet_lightning
from ldm.callbacks.checkpointing import resume_command


class Trainer(SimpleNamespace):
    """What the callbacks read from a pl.Trainer; save_checkpoint records the steps at which last.ckpt is written."""

    def __init__(self, root: Path, max_steps: int = 6):
        super().__init__(global_step=0, max_steps=max_steps, is_global_zero=True, received_sigterm=False,
                         num_devices=1, precision="32-true", log_every_n_steps=2, default_root_dir=str(root),
                         datamodule=None, last_saved=[], optimizers=[], ckpt_path=None, callbacks=[],
                         strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision))

    def save_checkpoint(self, path: Path, weights_only: bool) -> None:
        assert not weights_only
        self.last_saved.append(self.global_step)
        Path(path).write_bytes(b"resumable")


def run_steps(callback, trainer, model, steps: int) -> None:
    callback.on_train_start(trainer, model)
    try:
        for step in range(1, steps + 1):
            trainer.global_step = step
            callback.on_train_batch_end(trainer, model, {"loss": torch.tensor(1.0 / step)}, None, step - 1)
        callback.on_train_end(trainer, model)
    finally:
        callback.teardown(trainer, model, "fit")


@pytest.mark.parametrize("every_last, expected", [(None, [2, 4, 6]), (4, [4, 6]), (0, [6])])
def test_last_ckpt_is_written_every_n_steps_and_at_the_end(tmp_path, tiny_model, every_last, expected):
    trainer = Trainer(tmp_path)
    callback = StepCheckpoint(str(tmp_path), every_n_train_steps=2, save_last_every_n_steps=every_last)
    run_steps(callback, trainer, tiny_model, 6)
    assert trainer.last_saved == expected


def test_keep_last_n_prunes_older_step_files_and_their_safetensors(tmp_path, tiny_model):
    callback = StepCheckpoint(str(tmp_path), every_n_train_steps=1, save_last_every_n_steps=0, keep_last_n=2,
                              safetensors=True)
    run_steps(callback, Trainer(tmp_path, max_steps=4), tiny_model, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "last.ckpt", "last.safetensors", "step_3.ckpt", "step_3.safetensors", "step_4.ckpt", "step_4.safetensors"]
    with pytest.raises(ValueError, match="keep_last_n >= 1"):
        StepCheckpoint(str(tmp_path), keep_last_n=0)


def test_the_stop_message_says_saved_only_for_a_last_ckpt_of_that_step(tmp_path, tiny_model):
    trainer, callback = Trainer(tmp_path), StepCheckpoint(str(tmp_path / "checkpoints"), every_n_train_steps=2)
    run_steps(callback, trainer, tiny_model, 2)
    trainer.global_step = 3
    assert callback.stop_message(3) == (f"step 3 was not saved; kept {tmp_path}/checkpoints/last.ckpt (step 2) and "
                                        f"step_2.ckpt. Resume with: python main.py -t -r {tmp_path}")
    callback.on_exception(trainer, tiny_model, SIGTERMException())
    assert trainer.last_saved == [2, 3] and callback.stop_reason == "SIGTERM"
    assert callback.stop_message(3) == (f"saved {tmp_path}/checkpoints/last.ckpt. Resume with: python main.py -t -r "
                                        f"{tmp_path}")
    callback.on_exception(trainer, tiny_model, KeyboardInterrupt())  # a second Ctrl-C quits without saving
    assert trainer.last_saved == [2, 3]
    empty = StepCheckpoint(str(tmp_path / "other"))
    assert empty.stop_message(0) == "step 0 was not saved, and no checkpoint was written"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_in_steps_on_a_terminal(tmp_path, tiny_model):
    terminal = Terminal()
    run_steps(StepProgress(stream=terminal), Trainer(tmp_path, max_steps=4), tiny_model, 4)
    shown = terminal.getvalue()
    assert "step 4/4 · loss 0.521 ·" in shown and " s/step · ETA 0:00" in shown  # mean of 1, 1/2, 1/3, 1/4
    assert shown.rstrip().endswith("##########") and "Epoch" not in shown  # a full bar (ASCII: not a UTF-8 tty)


def test_progress_is_a_line_every_n_steps_in_a_log(tmp_path, tiny_model, caplog):
    with caplog.at_level(logging.INFO):
        run_steps(StepProgress(stream=io.StringIO()), Trainer(tmp_path, max_steps=5), tiny_model, 5)
    lines = [r.getMessage().split(" ·")[0] for r in caplog.records if " · loss " in r.getMessage()]
    assert lines == ["step 2/5", "step 4/5", "step 5/5"]  # log_every_n_steps 2, and the last step
    (summary,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("summary:")]
    assert "steps 0 to 5 (5 in this session)" in summary and "mean loss of the last 5 steps 0.4567" in summary


def test_lightning_noise_is_silenced_and_its_other_lines_kept():
    quiet_lightning()
    log = logging.getLogger("pytorch_lightning.utilities.rank_zero")

    def shown(message: str) -> bool:
        return bool(log.filter(log.makeRecord(log.name, logging.INFO, __file__, 1, message, (), None)))

    assert not shown("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
    assert not shown("GPU available: False, used: False") and not shown("`Trainer.fit` stopped: `max_steps=4` reached.")
    assert not shown("You are using a CUDA device ('NVIDIA A10G') that has Tensor Cores. To properly utilize them, "
                     "you should set `torch.set_float32_matmul_precision('medium' | 'high')`")
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("The 'train_dataloader' does not have many workers which may be a bottleneck.")
    assert not caught
    assert shown("Restoring states from the checkpoint path at logs/x/checkpoints/last.ckpt")


def test_the_resume_command_is_quoted_for_the_shell():
    assert resume_command(Path("logs/my run")) == "python main.py -t -r 'logs/my run'"
    assert shlex.split(resume_command(Path("logs/it's"), weights_only=True)) == [
        "python", "main.py", "-t", "-r", "logs/it's", "--resume_weights_only"]
