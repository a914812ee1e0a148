"""The toy world's tools: the toy configs keep the SD v1 keys, the committed scorer reads renders it was not fitted on,
and the pretraining steps train and resume exactly."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import load_model_weights, read_checkpoint, read_state_dict, save_checkpoint
from ldm.data.toy_world import BOX_SUBJECT, CLASSES, CONTEXTS, is_subject, random_layout, random_scene, subject_scene
from ldm.eval.toy_scorer import ToyScorer, fit_scorer, fit_subject_head, load_scorer, near_misses, render_scenes
from ldm.pretraining import DiffusionPretraining, SceneLatents, random_scenes, render_all, train_vae
from ldm.util import instantiate_from_config
from tests.helpers.repo import REPO

TOY = REPO / "configs" / "toy"
SCORER = REPO / "data" / "toy" / "scorer.safetensors"


def toy_model(config: str = "v1-inference.yaml"):
    return instantiate_from_config(OmegaConf.load(TOY / config).model)


def test_both_toy_configs_have_the_keys_of_the_sd_v1_configs():
    def keys(node, prefix=""):
        return {prefix + k for k in node} | {x for k, v in node.items() if isinstance(v, dict)
                                            for x in keys(v, f"{prefix}{k}.")}
    for toy, full in (("v1-inference.yaml", "v1-inference.yaml"), *((name, name) for name in (
            "v1-finetune_unfrozen.yaml", "v1-finetune_lowmem.yaml", "v1-finetune_lora.yaml"))):
        toy_keys = keys(OmegaConf.to_container(OmegaConf.load(TOY / toy)))
        full_keys = keys(OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "stable-diffusion" / full)))
        text_keys = {k for k in toy_keys if ".text_config" in k}  # the toy text encoder is smaller than ViT-L/14
        assert toy_keys - text_keys - {"model.params.cond_stage_config.params"} == full_keys, toy


def test_committed_scorer_reads_renders_it_was_not_fitted_on():
    scorer = load_scorer(SCORER)
    rng = np.random.default_rng(2024)  # a seed of its own: these renders were never in the scorer's training pool
    subjects = [subject_scene(c, **random_layout(rng)) for c in CONTEXTS for _ in range(8)]
    balls = [random_scene(rng, cls="ball", context=c) for c in CONTEXTS for _ in range(8)]
    found = scorer.predict(render_scenes(subjects))
    assert np.mean([p["subject"] for p in found]) >= 0.9
    assert np.mean([p["context"] == s.context for p, s in zip(found, subjects)]) >= 0.9
    assert np.mean([p["subject"] for p in scorer.predict(render_scenes(balls))]) <= 0.1


def test_committed_scorer_finds_the_box_subject_apart_from_the_ball():
    scorer = load_scorer(SCORER)
    rng = np.random.default_rng(2025)
    boxes = [subject_scene(c, **random_layout(rng), subject=BOX_SUBJECT) for c in CONTEXTS for _ in range(8)]
    balls = [subject_scene(c, **random_layout(rng)) for c in CONTEXTS for _ in range(8)]
    on_boxes, on_balls = scorer.predict(render_scenes(boxes)), scorer.predict(render_scenes(balls))
    assert np.mean([p["subject_box"] for p in on_boxes]) >= 0.9 and np.mean([p["subject"] for p in on_boxes]) <= 0.1
    assert np.mean([p["subject_box"] for p in on_balls]) <= 0.1


def test_a_subject_head_is_fitted_without_touching_the_other_heads():
    torch.manual_seed(0)
    scorer = ToyScorer()
    before = {k: v.clone() for k, v in scorer.state_dict().items()}
    fit_subject_head(scorer, BOX_SUBJECT, pool=32, views=1, steps=5)
    after = scorer.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"heads.subject_box.weight", "heads.subject_box.bias"}
    rng = np.random.default_rng(0)
    misses = [near_misses(rng, BOX_SUBJECT) for _ in range(200)]
    assert not any(is_subject(s, BOX_SUBJECT) for s in misses) and {s.cls for s in misses} == set(CLASSES)


def test_scorer_interface_on_pictures_of_any_size():
    from PIL import Image
    scores = ToyScorer().score_images([Image.new("RGB", (64, 64)), Image.new("RGBA", (128, 96))])
    assert len(scores) == 2
    assert set(scores[0]) == {"subject", "subject_prob", "subject_box", "subject_box_prob", "cls", "context", "colour"}
    assert isinstance(scores[0]["subject"], bool) and scores[0]["context"] in CONTEXTS


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


def test_diffusion_pretraining_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    model = toy_model()
    scenes = random_scenes(6, seed=1)
    latents = SceneLatents(scenes, torch.randn(6, 4, 16, 16).half(), torch.full((6, 4, 16, 16), 0.1).half())
    trainer = DiffusionPretraining(model, latents, batch_size=2, warmup=2)
    trainer.train_step()
    save_checkpoint(trainer.state(), tmp_path / "state.ckpt")
    expected = [trainer.train_step() for _ in range(2)]
    resumed = DiffusionPretraining(toy_model(), latents, batch_size=2, warmup=2)
    resumed.load_state(read_checkpoint(tmp_path / "state.ckpt"))
    assert resumed.step == 1
    assert [resumed.train_step() for _ in range(2)] == pytest.approx(expected, rel=1e-5)
    ema, live = trainer.ema_state_dict(), model.state_dict()
    assert set(ema) == set(live)
    key = "model.diffusion_model.out.2.weight"
    assert not torch.equal(ema[key], live[key])  # the exported weights are the average, not the last step's


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
