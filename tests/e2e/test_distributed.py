"""Distributed training on the CPU (gloo), as CI can run it: two DDP processes on the tiny config train to the same
weights while drawing their own timesteps and noise, write one run folder with one set of checkpoints and sample
grids, scale the learning rate by both devices, stop training the text encoder mid-run and resume under DDP at the
saved step; LoRA on the text encoder with clip skip trains at several resolutions; ddp_spawn hands its weights back
and exits 0. Without processes: the optimizer's random stream is alike on every rank, and DDP keeps the gradients
in its buckets."""
import csv
import importlib.util
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

from ldm.callbacks import RankSeed
from ldm.checkpoint import read_lora
from ldm.optim.adamw8bit import AdamW8bit
from ldm.optim.per_parameter import PerParameterOptimizer
from tests.callbacks.test_monitors import make_folder
from tests.helpers.rank_probe import weights_hash
from tests.helpers.repo import REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                 reason="this torch build has no gloo backend for CPU process groups")]


def train(*args, probe):
    proc = subprocess.run([sys.executable, "main.py", *args, "--accelerator", "cpu", "--devices", "2",
                           "lightning.callbacks.probe.target=tests.helpers.rank_probe.RankWeights",
                           f"lightning.callbacks.probe.params.folder={probe}",
                           "lightning.callbacks.draws.target=tests.helpers.rank_probe.FirstDraws",
                           f"lightning.callbacks.draws.params.folder={probe}"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    hashes = sorted(probe.glob("rank*.sha256"))
    assert [p.name for p in hashes] == ["rank0.sha256", "rank1.sha256"]
    assert len({p.read_text() for p in hashes}) == 1, "the two ranks ended with different weights"
    return proc, hashes[0].read_text()


def first_draws(probe):
    """Each rank's first timesteps and noise, and whether its DDP wrapper kept the gradients in its buckets."""
    return [torch.load(probe / f"draws{rank}.pt") for rank in (0, 1)]


def fresh_run(tmp_path, tiny_ckpt, photos, strategy):
    return ("--base", "configs/tiny/v1-finetune_unfrozen.yaml", "-t", "--actual_resume", str(tiny_ckpt), "-n", "ddp",
            "--data_root", str(photos[0]), "--reg_data_root", str(photos[1]), "--class_word", "dog",
            "-l", str(tmp_path / "logs"), "--strategy", strategy)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp-data")
    return make_folder(root / "photos", 3, 0), make_folder(root / "class", 4, 1)


def test_ddp_trains_one_run_with_identical_ranks_and_resumes(tmp_path, tiny_ckpt, photos):
    # the text encoder stops at step 2 (DDP then waits for its gradients unless the model is wrapped anew), and again
    # at the first step of the resumed session
    proc, trained = train(*fresh_run(tmp_path, tiny_ckpt, photos, "ddp"), "--scale_lr",
                          "--stop_text_encoder_training", "2", probe=tmp_path / "probe1")
    assert "x 2 (devices) x 1 (batch size)" in proc.stdout
    rank0, rank1 = first_draws(tmp_path / "probe1")
    assert rank0["gradient_as_bucket_view"] is rank1["gradient_as_bucket_view"] is True
    assert not torch.equal(rank0["sample_noise"], rank1["sample_noise"]), "both ranks trained on the same noise"
    assert not torch.equal(rank0["sample_timesteps"], rank1["sample_timesteps"])
    (run,) = (tmp_path / "logs").iterdir()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step_2.ckpt", "step_4.ckpt"]
    assert sorted(p.name.split("_gs-")[0] + p.name.split("_gs-")[1][:6] for p in (run / "images" / "train").iterdir()) \
        == [f"{kind}{step:06}" for kind in ("inputs", "samples_class", "samples_instance") for step in (2, 4)]
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert last["global_step"] == 4 and weights_hash(last["state_dict"]) == trained

    train("-r", str(run), "--max_steps", "6", "--strategy", "ddp", probe=tmp_path / "probe2")
    resumed = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert resumed["global_step"] == 6
    stopped = torch.load(run / "checkpoints" / "step_2.ckpt", map_location="cpu")["state_dict"]
    text = [key for key in stopped if key.startswith("cond_stage_model.")]
    assert text and all(torch.equal(resumed["state_dict"][key], stopped[key]) for key in text)
    assert int(resumed["optimizer_states"][0]["state"][0]["step"]) == 6  # Adam went on from step 4
    steps = []
    for path in sorted(run.glob("csv/*/metrics.csv")):
        with open(path, newline="") as handle:
            steps.append([int(row["step"]) for row in csv.DictReader(handle) if row.get("train/loss")])
    assert steps == [[0, 1, 2, 3], [4, 5]]
    assert len(list(tmp_path.joinpath("logs").iterdir())) == 1


@pytest.mark.slow  # 19 s: DDP is tested above, LoRA, CLIP skip and resolutions alone elsewhere
def test_ddp_trains_text_encoder_lora_with_clip_skip_at_several_resolutions(tmp_path, tiny_ckpt, photos):
    # several resolutions batch through our bucket sampler, which takes each rank's share itself; LoRA on the text
    # layer after the clip-skip one would never get a gradient
    train(*fresh_run(tmp_path, tiny_ckpt, photos, "ddp"), "--rank", "4", "--lora_text_encoder", "--clip_skip", "2",
          "data.params.resolutions=[64,128]", probe=tmp_path / "probe")
    (run,) = (tmp_path / "logs").iterdir()
    tensors, metadata = read_lora(run / "checkpoints" / "last.safetensors")
    assert metadata["ss_steps"] == "4"
    text = {key.split(".")[0] for key in tensors if key.startswith("lora_te_")}
    assert len(text) == 6 and all(key.startswith("lora_te_text_model_encoder_layers_0_") for key in text)


def test_the_optimizer_steps_on_a_stream_that_every_rank_shares():
    def train_rank(rank: int, optimizer, seeded: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(300).to(torch.bfloat16))  # rounded stochastically at each step
        optimizer = optimizer([weight])
        seeds, trainer, module, noise = RankSeed(7), SimpleNamespace(global_rank=rank), SimpleNamespace(
            device=torch.device("cpu")), []
        seeds.on_train_start(trainer, module)
        for step in range(3):
            noise.append(torch.randn(4))
            weight.grad = torch.full_like(weight, 1e-3)  # DDP's averaged gradient: alike on every rank
            if seeded:
                seeds.on_before_optimizer_step(trainer, module, optimizer)
            optimizer.step()
            seeds.on_train_batch_end(trainer, module, None, None, step)
        return weight.detach().clone(), torch.stack(noise)

    # AdamW8bit hashes its rounding bits from its own seed (no global stream: alike even unseeded); the per-parameter
    # fp32 copy rounds with torch's global stream, which differs per rank unless RankSeed shares it
    for optimizer, global_stream in ((lambda p: AdamW8bit(p, compile=False), False),
                                     (lambda p: PerParameterOptimizer(p, lambda groups: torch.optim.AdamW(groups,
                                                                                                         lr=1e-3)),
                                      True)):
        (weight0, noise0), (weight1, noise1) = train_rank(0, optimizer), train_rank(1, optimizer)
        assert torch.equal(weight0, weight1), "stochastic rounding drew differently on the two ranks"
        torch.manual_seed(8)
        assert torch.equal(noise1, torch.stack([torch.randn(4) for _ in range(3)]))  # seed + rank, undisturbed
        assert not torch.equal(noise0, noise1)
        unseeded = train_rank(0, optimizer, seeded=False)[0], train_rank(1, optimizer, seeded=False)[0]
        assert torch.equal(*unseeded) != global_stream


@pytest.mark.parametrize("strategy", ["ddp", "auto", "ddp_spawn"])
def test_ddp_keeps_the_gradients_as_views_of_its_buckets(strategy):
    spec = importlib.util.spec_from_file_location("dreambooth_main_ddp", REPO / "main.py")
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_checkpointing=False)
    main.bucket_view_gradients(trainer.strategy)
    assert trainer.strategy._ddp_kwargs["gradient_as_bucket_view"] is True


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
