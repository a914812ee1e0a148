"""The toy world's tools end to end: the scorer and the VAE train and lower their losses, and
scripts/pretrain_toy_model.py runs every stage, records them, goes on from --init and resumes from the state it
wrote."""
import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import load_model_weights, read_state_dict
from ldm.toy.pretraining import random_scenes, render_all, train_vae
from ldm.toy.scorer import ToyScorer, fit_scorer, load_scorer
from ldm.util import instantiate_from_config
from tests.helpers.repo import REPO
from tests.toy.test_toy_model import TOY

pytestmark = pytest.mark.e2e


def test_fit_scorer_and_train_vae_run_and_lower_their_losses():
    scorer = fit_scorer(steps=3, pool=16, batch_size=4)
    assert isinstance(scorer, ToyScorer) and not scorer.training
    torch.manual_seed(0)
    vae = instantiate_from_config(OmegaConf.load(TOY / "v1-inference.yaml").model.params.first_stage_config)
    images = render_all(random_scenes(8, seed=0))
    before = (vae.decode(vae.encode(images).mode()) - images).abs().mean()
    train_vae(vae, images, steps=30, batch_size=8, lr=2e-3)
    with torch.no_grad():
        after = (vae.decode(vae.encode(images).mode()) - images).abs().mean()
    assert after < 0.85 * before


@pytest.mark.slow  # 40 s: each stage is tested alone above and in tests/toy/
def test_pretraining_script_runs_every_stage_and_records_them(tmp_path):
    configs = [tmp_path / name for name in ("v1-inference.yaml", "v1-finetune_unfrozen.yaml")]
    for path in configs:
        path.write_text((TOY / path.name).read_text())
    data = tmp_path / "data"

    def pretrain(stage: str, workdir: str, steps: int, *extra: str) -> None:
        proc = subprocess.run(
            [sys.executable, "scripts/pretrain_toy_model.py", "--stage", stage, "--workdir", str(tmp_path / workdir),
             "--data_dir", str(data), "--configs", *map(str, configs), "--vae_steps", "2", "--vae_pool", "24",
             "--scorer_steps", "2", "--scorer_pool", "16", "--scorer_validation", "2", "--box_head_pool", "16",
             "--box_head_steps", "2", "--scenes", "16", "--steps",
             str(steps), "--interval", "2", "--batch_size", "4", "--eval_samples", "0", *extra],
            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    pretrain("all", "work", 2)
    record = json.loads((data / "pretraining.json").read_text())
    assert set(record) >= {"vae", "scorer", "box_head", "latents", "diffusion"} and record["diffusion"]["steps"] == 2
    scale = record["vae"]["scale_factor"]
    assert all(OmegaConf.load(path).model.params.scale_factor == pytest.approx(scale, abs=1e-5) for path in configs)
    model = instantiate_from_config(OmegaConf.load(configs[0]).model)
    assert load_model_weights(model, data / "toy-v1.safetensors").loaded["UNet"]
    assert load_scorer(data / "scorer.safetensors") is not None

    # The intermediate files are gone: --init goes on from the committed weights, at the recorded step.
    init = tmp_path / "toy-v1-step2.safetensors"
    init.write_bytes((data / "toy-v1.safetensors").read_bytes())
    pretrain("latents", "fresh", 4, "--init", str(init))
    pretrain("diffusion", "fresh", 4, "--init", str(init))
    record = json.loads((data / "pretraining.json").read_text())
    assert record["diffusion"]["steps"] == 4 and [h["step"] for h in record["diffusion"]["history"]] == [2, 4]
    went_on, started = read_state_dict(data / "toy-v1.safetensors"), read_state_dict(init)
    assert went_on.keys() == started.keys()
    assert not torch.equal(went_on["model.diffusion_model.out.2.weight"], started["model.diffusion_model.out.2.weight"])
    assert torch.equal(went_on["first_stage_model.decoder.conv_out.weight"],
                       started["first_stage_model.decoder.conv_out.weight"])  # the VAE came from --init
    pretrain("diffusion", "fresh", 6)  # resumes from the state it wrote, which holds the VAE too
    assert json.loads((data / "pretraining.json").read_text())["diffusion"]["steps"] == 6
