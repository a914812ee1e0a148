"""Run folders (ldm/training/runs.py): created exclusively, locked while a process trains them, and which run `-r latest` resumes
(main.py refusing a locked run: tests/e2e/test_runs_e2e.py)."""
import logging
import os
import shutil
from pathlib import Path

import pytest

from ldm.training.runs import LOCK_FILE, latest_run, new_run, run_lock
from ldm.util import UserError


def test_two_runs_started_in_the_same_second_get_two_folders(tmp_path):
    first = new_run(str(tmp_path / "logs"), "job", "", "2026-12-07T00-00-00")
    second = new_run(str(tmp_path / "logs"), "job", "", "2026-12-07T00-00-00")
    assert first.logdir.is_dir() and second.logdir.is_dir()
    assert (first.logdir.name, second.logdir.name) == ("2026-12-07T00-00-00_job", "2026-12-07T00-00-00_job-2")


def test_a_locked_run_refuses_a_second_process_and_a_dead_ones_lock_is_taken_over(tmp_path, caplog):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_FILE).write_text("999999999\n")  # left by a process that died (its OS lock went with it)
    with caplog.at_level(logging.INFO, logger="ldm.training.runs"), run_lock(folder):
        assert (folder / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with pytest.raises(UserError, match=rf"^{folder} is being trained by another process \(pid {os.getpid()}\); "
                                            "wait for it to end, or stop it, before resuming this run$"):
            with run_lock(folder):
                pass
    assert "took over the lock of pid 999999999, which is no longer running" in caplog.text
    with run_lock(folder):  # released at the end of the block
        pass
    assert folder.is_dir()  # a resumed run's folder stays, with its lock file


def test_a_new_run_that_fails_early_leaves_no_folder(tmp_path):
    run = new_run(str(tmp_path / "logs" / "sub"), "job", "", "now")
    with pytest.raises(UserError), run_lock(run.logdir, run.created):
        raise UserError("a photo is corrupt")
    assert not (tmp_path / "logs").exists()
    run = new_run(str(tmp_path / "logs"), "job", "", "now")
    with run_lock(run.logdir, run.created):
        (run.logdir / "configs").mkdir()
    assert (run.logdir / "configs").is_dir()


def make_run(root: Path, name: str, files: dict[str, float]) -> Path:
    """A run folder with saved configs and checkpoint files of the given modification times."""
    run = root / name
    (run / "configs").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    for file, mtime in files.items():
        path = run / "checkpoints" / file
        path.write_bytes(b"")
        os.utime(path, (mtime, mtime))
    return run


def test_latest_is_the_run_whose_last_ckpt_was_written_last(tmp_path):
    resumed = make_run(tmp_path, "2026-12-01T10-00-00_old", {"last.ckpt": 3000, "step_2.ckpt": 1000})
    make_run(tmp_path, "2026-12-02T10-00-00_mid", {"last.ckpt": 2000, "step_4.ckpt": 2000})
    newest = make_run(tmp_path, "2026-12-03T10-00-00_new", {})
    assert latest_run(tmp_path) == resumed  # resumed yesterday: not the newest-created folder
    assert latest_run(tmp_path, weights_only=True).name == "2026-12-02T10-00-00_mid"
    for run in tmp_path.iterdir():
        shutil.rmtree(run / "checkpoints")
    assert latest_run(tmp_path) == newest  # no checkpoint anywhere: the newest-created
