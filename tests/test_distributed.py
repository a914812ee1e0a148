"""Distributed training on the CPU (gloo), as CI can run it: two DDP processes on the tiny config train to the same
weights, write one run folder with one set of checkpoints and sample grids, scale the learning rate by both devices
and resume under DDP at the saved step; ddp_spawn hands its weights back and exits 0."""
import csv
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from rank_probe import weights_hash

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch build has no gloo backend for CPU process groups")


def train(*args, probe):
    proc = subprocess.run([sys.executable, "main.py", *args, "--accelerator", "cpu", "--devices", "2",
                           "lightning.callbacks.probe.target=rank_probe.RankWeights",
                           f"lightning.callbacks.probe.params.folder={probe}"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    hashes = sorted(probe.glob("rank*.sha256"))
    assert [p.name for p in hashes] == ["rank0.sha256", "rank1.sha256"]
    assert len({p.read_text() for p in hashes}) == 1, "the two ranks ended with different weights"
    return proc, hashes[0].read_text()


def fresh_run(tmp_path, tiny_ckpt, photos, strategy):
    return ("--base", "configs/tiny/v1-finetune_unfrozen.yaml", "-t", "--actual_resume", str(tiny_ckpt), "-n", "ddp",
            "--data_root", str(photos[0]), "--reg_data_root", str(photos[1]), "--class_word", "dog",
            "-l", str(tmp_path / "logs"), "--strategy", strategy)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from test_monitors import make_folder
    root = tmp_path_factory.mktemp("ddp-data")
    return make_folder(root / "photos", 3, 0), make_folder(root / "class", 4, 1)


def test_ddp_trains_one_run_with_identical_ranks_and_resumes(tmp_path, tiny_ckpt, photos):
    proc, trained = train(*fresh_run(tmp_path, tiny_ckpt, photos, "ddp"), "--scale_lr", probe=tmp_path / "probe1")
    assert "x 2 (devices) x 1 (batch size)" in proc.stdout
    (run,) = (tmp_path / "logs").iterdir()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step_2.ckpt", "step_4.ckpt"]
    assert sorted(p.name.split("_gs-")[0] + p.name.split("_gs-")[1][:6] for p in (run / "images" / "train").iterdir()) \
        == [f"{kind}{step:06}" for kind in ("inputs", "samples_class", "samples_instance") for step in (2, 4)]
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert last["global_step"] == 4 and weights_hash(last["state_dict"]) == trained

    train("-r", str(run), "--max_steps", "6", "--strategy", "ddp", probe=tmp_path / "probe2")
    resumed = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert resumed["global_step"] == 6
    assert int(resumed["optimizer_states"][0]["state"][0]["step"]) == 6  # Adam went on from step 4
    steps = []
    for path in sorted(run.glob("csv/*/metrics.csv")):
        with open(path, newline="") as handle:
            steps.append([int(row["step"]) for row in csv.DictReader(handle) if row.get("train/loss")])
    assert steps == [[0, 1, 2, 3], [4, 5]]
    assert len(list(tmp_path.joinpath("logs").iterdir())) == 1


def test_ddp_spawn_hands_the_weights_back_and_exits_0(tmp_path, tiny_ckpt, photos):
    proc, trained = train(*fresh_run(tmp_path, tiny_ckpt, photos, "ddp_spawn"), probe=tmp_path / "probe")
    (run,) = (tmp_path / "logs").iterdir()
    assert weights_hash(torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")["state_dict"]) == trained
    assert "nothing to train" not in proc.stdout and "Traceback" not in proc.stderr
    assert "in eval mode" not in proc.stderr  # Lightning's warning that main.py filters, filtered in the workers too


def test_a_launcher_started_run_needs_one_run_folder(tmp_path, tiny_ckpt, photos):
    env = {**ENV, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    env.pop("DREAMBOOTH_RUN_DIR", None)
    proc = subprocess.run([sys.executable, "main.py", *fresh_run(tmp_path, tiny_ckpt, photos, "ddp")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: every process of this run was started by torchrun")
    assert "export DREAMBOOTH_RUN_DIR=logs/<name>" in proc.stderr and not (tmp_path / "logs").exists()
