"""The toy world's tools: the toy configs keep the SD v1 keys, the committed scorer reads renders it was not fitted on,
and the pretraining steps train and resume exactly (the trainings and the pretraining script end to end:
tests/e2e/test_toy_model_e2e.py)."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import read_checkpoint, save_checkpoint
from ldm.toy.pretraining import DiffusionPretraining, SceneLatents, random_scenes
from ldm.toy.scorer import ToyScorer, fit_subject_head, load_scorer, near_misses, render_scenes
from ldm.toy.world import BOX_SUBJECT, CLASSES, CONTEXTS, is_subject, random_layout, random_scene, subject_scene
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
        toy_scorer = {k for k in toy_keys if k.startswith("lightning.callbacks.validation.params.scorer.")}
        assert toy_keys - text_keys - toy_scorer - {"model.params.cond_stage_config.params"} == full_keys, toy


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
