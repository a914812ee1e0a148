"""The best step (ldm/callbacks/best_step.py) and the fidelity it watches (ldm/eval/fidelity.py, the toy scorer of
ldm/toy/metrics.py): the best round's weights kept for mode max and min, the best known after a resume, one line for
a metric that nothing logs, early stopping with its reason (end to end: tests/e2e/test_best_step_e2e.py)."""
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.helpers.models import build_tiny_model, save_tiny_scorers
from tests.helpers.runs import make_class_images
from ldm.callbacks import BestStep, EvaluationLoss, ValidationSamples
from ldm.eval.fidelity import Term, fidelity, parse_recipe
from ldm.toy.metrics import ToySampleScorer
from ldm.toy.world import random_layout, random_scene, render, subject_scene

BIAS = "model.diffusion_model.out.2.bias"  # set to the step in the stand-in runs: which step a file holds


class Trainer(SimpleNamespace):
    """What the best step reads from a pl.Trainer."""

    def __init__(self, root: Path, callbacks: list):
        super().__init__(global_step=0, is_global_zero=True, default_root_dir=str(root), optimizers=[],
                         should_stop=False, callbacks=callbacks, datamodule=None,
                         strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision))


@pytest.fixture(scope="module")
def model():
    return build_tiny_model()


def start(callback: BestStep, root: Path, step: int = 0, monitor=None) -> Trainer:
    monitor = monitor or EvaluationLoss(every_n_steps=1)
    trainer = Trainer(root, [monitor, callback])
    trainer.global_step = step
    callback.setup(trainer, None, "fit")
    callback.on_train_start(trainer, None)
    return trainer


def rounds(trainer: Trainer, model, values: dict[int, float], name: str = "val/fidelity") -> None:
    """A round of the monitor at each step, with the model's weights marked by the step."""
    callback = trainer.callbacks[-1]
    for step, value in values.items():
        trainer.global_step = step
        with torch.no_grad():
            model.model.diffusion_model.out[-1].bias.fill_(step)
        for listen in trainer.callbacks[0].listeners:
            listen(trainer, model, {name: value, "val/other": value / 2})
        callback.on_train_batch_end(trainer, model, None, None, step - 1)


def kept_step(root: Path) -> int:
    return int(load_file(root / "checkpoints" / "best.safetensors")[BIAS][0])


@pytest.mark.parametrize("mode, best", [("max", 2), ("min", 4)])
def test_the_best_round_is_kept_with_its_scores_and_command(tmp_path, model, mode, best):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "t-project.yaml").write_text("model: {}\n")
    callback = BestStep(mode=mode)
    trainer = start(callback, tmp_path)
    trainer.datamodule = SimpleNamespace(instance=SimpleNamespace(identifier="sks", class_word="dog"))
    rounds(trainer, model, {1: 0.3, 2: 0.7, 3: 0.5, 4: 0.1})
    assert kept_step(tmp_path) == best
    record = json.loads((tmp_path / "checkpoints" / "best.json").read_text())
    value = {2: 0.7, 4: 0.1}[best]
    assert record["best"] == {"step": best, "value": value, "scores": {"val/fidelity": value, "val/other": value / 2}}
    path = tmp_path / "checkpoints" / "best.safetensors"
    assert callback.summary(trainer, model) == [
        f"best step: {best} by val/fidelity ({mode}) {value:.4f} (other {value / 2:.3f}): {path}",
        f"sample the best step: python scripts/stable_txt2img.py --ckpt {path} --config "
        f"{tmp_path / 'configs' / 't-project.yaml'} --prompt \"photo of a sks dog\""]
    assert not trainer.should_stop  # no patience: no early stopping
    with pytest.raises(ValueError, match="mode max or min"):
        BestStep(mode="best")


def test_a_resumed_run_knows_the_best_so_far(tmp_path, model):
    first = BestStep()
    rounds(start(first, tmp_path), model, {1: 0.3, 2: 0.7, 3: 0.5})
    state = first.state_dict()  # last.ckpt at step 3, after its round
    resumed = BestStep()
    resumed.load_state_dict(state)
    trainer = start(resumed, tmp_path, step=3)
    rounds(trainer, model, {4: 0.6})
    assert kept_step(tmp_path) == 2 and resumed.best["step"] == 2  # 0.6 is no better than step 2's 0.7
    rounds(trainer, model, {5: 0.8})
    assert kept_step(tmp_path) == 5

    fresh = BestStep()  # without the state, and without best.json, the first round is the best
    rounds(start(fresh, tmp_path / "fresh"), model, {4: 0.6})
    assert kept_step(tmp_path / "fresh") == 4


def test_a_round_after_last_ckpt_is_known_from_best_json(tmp_path, model, caplog):
    first = BestStep(patience=3)
    trainer = start(first, tmp_path)
    rounds(trainer, model, {2: 0.5})
    state = first.state_dict()  # last.ckpt at step 4 is written before step 4's round
    rounds(trainer, model, {4: 0.9, 6: 0.2})
    resumed = BestStep(patience=3)
    resumed.load_state_dict(state)
    with caplog.at_level(logging.WARNING):
        start(resumed, tmp_path, step=6)
    assert resumed.best["step"] == 4 and resumed.rounds_since_best == 1  # as best.json says after step 6's round
    assert "best.safetensors holds step 4 (val/fidelity 0.9000), a round after last.ckpt was written" in caplog.text

    changed = BestStep(monitor="val/loss", mode="min")
    changed.load_state_dict(state)
    with caplog.at_level(logging.WARNING):
        start(changed, tmp_path, step=6)
    assert changed.best is None
    assert "last.ckpt's best is by val/fidelity (max); this session watches val/loss (min) afresh" in caplog.text


def test_a_metric_that_nothing_logs_gives_one_line(tmp_path, model, caplog):
    callback = BestStep()
    with caplog.at_level(logging.WARNING):
        trainer = start(callback, tmp_path)
    rounds(trainer, model, {2: 0.1, 4: 0.2}, name="val/loss")
    assert not (tmp_path / "checkpoints").exists()
    why = "validation is off (lightning.callbacks.validation.params.every_n_steps)"
    assert caplog.messages == [f"best step: nothing will log val/fidelity: {why}"]
    assert callback.summary(trainer, model) == [
        f"best step: none kept, no monitor logged val/fidelity (they logged val/loss, val/other): {why}; "
        "lightning.callbacks.best_step.params.monitor names the metric"]

    no_scorer = BestStep()
    trainer = start(no_scorer, tmp_path, monitor=ValidationSamples(every_n_steps=2))
    assert no_scorer.summary(trainer, model) == [
        "best step: none kept, no monitor logged val/fidelity (they logged nothing): validation has no scorer "
        "(clip_model, dino_model or scorer); lightning.callbacks.best_step.params.monitor names the metric"]
    assert BestStep().summary(Trainer(tmp_path, []), model) == []  # no monitor on: nothing to say


def test_early_stopping_waits_for_patience_and_min_steps_and_says_why(tmp_path, model):
    callback = BestStep(patience=2, min_steps=4)
    trainer = start(callback, tmp_path)
    rounds(trainer, model, {1: 0.5, 2: 0.4, 3: 0.3})
    assert not trainer.should_stop  # two rounds without a better one, but before min_steps
    rounds(trainer, model, {4: 0.2})
    assert trainer.should_stop and kept_step(tmp_path) == 1
    reason = ("stopped early at step 4: val/fidelity has not improved on 0.5000 (step 1) in 3 rounds "
              "(best_step.params.patience 2)")
    assert callback.stop_reason == reason and callback.summary(trainer, model)[-1] == reason

    improving = BestStep(patience=1)
    trainer = start(improving, tmp_path / "improving")
    rounds(trainer, model, {1: 0.1, 2: 0.2, 3: 0.3})
    assert not trainer.should_stop and improving.stop_reason is None


def test_fidelity_recipes():
    recipe = parse_recipe(["binding", "recontext_subject", "1 - leakage"], ToySampleScorer.metrics)
    assert recipe == (Term("binding"), Term("recontext_subject"), Term("leakage", complement=True))
    assert fidelity(recipe, {"binding": 1.0, "recontext_subject": 0.5, "leakage": 0.25}) == pytest.approx(0.75)
    assert fidelity(recipe, {"binding": 1.0, "recontext_subject": 0.5}) is None
    assert parse_recipe(ToySampleScorer.default_recipe, ToySampleScorer.metrics) == (
        Term("binding"), Term("recontext_subject"), Term("recontext_context"), Term("leakage", complement=True))
    paper = parse_recipe(["dino / 0.668", "clip_t/0.305"], ("dino", "clip_t"))
    assert [str(term) for term in paper] == ["dino / 0.668", "clip_t / 0.305"]
    assert fidelity(paper, {"dino": 0.668, "clip_t": 0.61}) == pytest.approx(1.5)
    for bad, match in ((["2 * binding"], "expected 'metric'"), (["dino"], "dino is not measured"), ([], "a list"),
                       (["binding / 0"], "division by zero")):
        with pytest.raises(ValueError, match=match):
            parse_recipe(bad, ToySampleScorer.metrics)


def test_the_toy_scorer_measures_binding_recontextualisation_and_leakage():
    rng = np.random.default_rng(7)
    picture = lambda scene: Image.fromarray(render(scene))  # noqa: E731
    samples = {"photo of a sks ball": [picture(subject_scene("plain", **random_layout(rng))) for _ in range(4)],
               "a sks ball in the forest": [picture(subject_scene("forest", **random_layout(rng))) for _ in range(4)],
               "photo of a ball": [picture(random_scene(rng, cls="ball")) for _ in range(4)]}
    validation = ValidationSamples(every_n_steps=1, scorer={"target": "ldm.toy.metrics.ToySampleScorer"})
    instance = SimpleNamespace(identifier="sks", class_word="ball", paths=[])
    state = torch.get_rng_state()
    scores = validation.score(samples, {"": list(samples)}, {"": instance})
    assert torch.equal(torch.get_rng_state(), state)  # training's random stream is untouched
    assert set(scores) == {"val/binding", "val/recontext_subject", "val/recontext_context", "val/leakage",
                           "val/fidelity"}
    assert scores["val/binding"] >= 0.75 and scores["val/recontext_subject"] >= 0.75
    assert scores["val/recontext_context"] >= 0.75 and scores["val/leakage"] <= 0.25
    expected = (scores["val/binding"] + scores["val/recontext_subject"] + scores["val/recontext_context"]
                + 1 - scores["val/leakage"]) / 4  # the toy scorer's default recipe counts the asked context
    assert scores["val/fidelity"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="the toy scorer missing.safetensors is missing"):
        ToySampleScorer("missing.safetensors")


def test_several_concepts_get_a_fidelity_each_and_their_mean():
    validation = ValidationSamples(every_n_steps=1, scorer={"target": "tests.helpers.scripted_scorer.ScriptedScorer",
                                                            "params": {"values": [0.2, 0.6]}})
    image = Image.new("RGB", (64, 64))
    instances = {"dog": SimpleNamespace(identifier="sks", class_word="dog", paths=[]),
                 "cat": SimpleNamespace(identifier="zwx", class_word="cat", paths=[])}
    samples = {"photo of a sks dog": [image], "photo of a zwx cat": [image]}
    scores = validation.score(samples, {"dog": ["photo of a sks dog"], "cat": ["photo of a zwx cat"]}, instances)
    assert scores == pytest.approx({"val/score_dog": 0.2, "val/fidelity_dog": 0.2, "val/score_cat": 0.6,
                                    "val/fidelity_cat": 0.6, "val/fidelity": 0.4})


def test_clip_and_dino_give_the_papers_fidelity(tmp_path):
    clip, dino = save_tiny_scorers(tmp_path)
    photos = make_class_images(tmp_path / "photos", 2)
    instance = SimpleNamespace(identifier="sks", class_word="dog", paths=sorted(photos.iterdir()))
    samples = {"photo of a sks dog": [Image.new("RGB", (64, 64), (200, 30, 30))] * 2,
               "photo of a dog": [Image.new("RGB", (64, 64), (30, 30, 200))] * 2}
    validation = ValidationSamples(every_n_steps=1, clip_model=str(clip), dino_model=str(dino))
    scores = validation.score(samples, {"": list(samples)}, {"": instance})
    assert set(scores) == {"val/clip_t", "val/clip_i", "val/dino", "val/fidelity"}
    assert scores["val/fidelity"] == pytest.approx((scores["val/dino"] / 0.668 + scores["val/clip_t"] / 0.305) / 2)
    clip_only = ValidationSamples(every_n_steps=1, clip_model=str(clip))
    assert clip_only.recipe == () and "needs dino, which is not measured" in clip_only.fidelity_note
    assert "val/fidelity" not in clip_only.score(samples, {"": list(samples)}, {"": instance})
    with pytest.raises(ValueError, match="not both"):
        ValidationSamples(every_n_steps=1, clip_model=str(clip), scorer={"target": "ldm.toy.metrics.ToySampleScorer"})
    with pytest.raises(ValueError, match="fidelity needs a scorer"):
        ValidationSamples(every_n_steps=1, fidelity=["clip_t"])
