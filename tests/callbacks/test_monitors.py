"""Monitors during training: the evaluation loss (a fixed set, bit-identical for the same weights, training's random
stream untouched), validation samples with CLIP scores and their progression grid, predicted-x0 previews (all of them
end to end through main.py: tests/e2e/test_monitors_e2e.py)."""
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from ldm.callbacks.eval_loss import EvaluationLoss, band_names, evaluation_losses, spread_timesteps
from ldm.callbacks.validation import ValidationSamples, column_title, progression_grid
from ldm.data.personalized import PersonalizedBase
from ldm.eval.fidelity import clip_scores
from ldm.images import read_metadata, save_image
from ldm.modules.encoders.vision import ClipEmbedder
from tests.helpers.models import build_tiny_model, save_tiny_scorers


def make_folder(folder, n, seed):
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    for k in range(n):
        pixels = (torch.rand(64 + 8 * k, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{k}.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("monitors")
    return make_folder(root / "photos", 3, 0), make_folder(root / "class", 5, 1)


def datasets(folders):
    photos, class_images = folders
    return {"train": PersonalizedBase(str(photos), size=64, repeats=1),
            "reg": PersonalizedBase(str(class_images), size=64, repeats=1, reg=True)}


def test_timesteps_spread_over_the_schedule_and_bands_cover_it():
    assert spread_timesteps(4, 1000).tolist() == [125, 375, 625, 875]
    assert band_names(4, 1000) == [("loss_t0-249", 0, 250), ("loss_t250-499", 250, 500),
                                   ("loss_t500-749", 500, 750), ("loss_t750-999", 750, 1000)]


def test_evaluation_loss_is_bit_identical_and_leaves_training_randomness_alone(folders):
    model, data = build_tiny_model(), datasets(folders)
    callback = EvaluationLoss(every_n_steps=1, timesteps=4, bands=2, class_images=2, batch_size=3)
    state = torch.get_rng_state()
    first = callback.evaluate(model, data)
    assert torch.equal(torch.get_rng_state(), state)
    assert set(first) == {"val/loss", "val/loss_instance", "val/loss_class", "val/loss_t0-499", "val/loss_t500-999"}
    assert len(callback.fixed.captions) == (3 + 2) * 4 and callback.fixed.n_instance == 3 * 4
    assert first["val/loss"] == pytest.approx(first["val/loss_instance"] + model.reg_weight * first["val/loss_class"])
    assert EvaluationLoss(every_n_steps=1, timesteps=4, bands=2, class_images=2, batch_size=3).evaluate(
        model, data) == first  # a new callback (another run, or a resumed one) builds the same set

    fixed = callback.fixed
    z, noise, t = fixed.latents[0][None], fixed.noise[0][None], fixed.timesteps[:1]
    with torch.no_grad():
        eps = model.apply_model(model.q_sample(z, t, noise), t, model.get_learned_conditioning(fixed.captions[:1]))
    model.eval()
    assert evaluation_losses(model, fixed, 1)[0] == pytest.approx(float(((eps - noise) ** 2).mean()), rel=1e-5)
    with torch.no_grad():
        model.model.diffusion_model.out[-1].bias.add_(0.1)
    assert callback.evaluate(model, data)["val/loss"] != first["val/loss"]


def test_evaluation_loss_is_float32_while_bf16_is_the_default_dtype(folders):
    """Lightning's bf16-true precision makes bfloat16 the default dtype while the callbacks run."""
    model, data = build_tiny_model(), datasets(folders)
    callback = EvaluationLoss(every_n_steps=1, timesteps=2, bands=1, class_images=1, batch_size=3)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        callback.evaluate(model, data)
        losses = evaluation_losses(model, callback.fixed, 3)
    finally:
        torch.set_default_dtype(default)
    assert losses.dtype == torch.float32 and losses.isfinite().all()


def test_clip_scores_follow_the_papers_definitions(tmp_path, folders):
    clip = ClipEmbedder(save_tiny_scorers(tmp_path)[0])
    photos = [Image.open(p) for p in sorted(folders[0].iterdir())]
    subject, plain = [Image.open(p) for p in sorted(folders[1].iterdir())][:2], photos[:1]
    scores = clip_scores(clip, {"photo of a sks dog": subject, "photo of a dog": plain}, clip.images(photos), "sks")
    text = clip.texts(["photo of a dog"])
    expected_t = torch.cat([clip.images(subject) @ text.T, clip.images(plain) @ text.T]).mean()
    expected_i = (clip.images(subject) @ clip.images(photos).T).mean()
    assert scores["val/clip_t"] == pytest.approx(float(expected_t), abs=1e-6)
    assert scores["val/clip_i"] == pytest.approx(float(expected_i), abs=1e-6)


def test_progression_grid_has_a_row_per_step(tmp_path):
    for step in (2, 10):
        (tmp_path / f"step_{step:06}").mkdir()
        for k in range(3):
            for seed in (0, 1):
                save_image(Image.new("RGB", (64, 64), (40 * k, 100 * seed, step)),
                           tmp_path / f"step_{step:06}/p{k}_s{seed}.png", {"prompt": f"prompt {k}", "seed": seed})
    (tmp_path / "step_000012").mkdir()  # a step killed before its first cell: no row
    assert column_title(sorted((tmp_path / "step_000002").iterdir())) == \
        "1-2: prompt 0, 3-4: prompt 1, 5-6: prompt 2 (seeds 0, 1)"
    two_rows = progression_grid(tmp_path, 32)
    (tmp_path / "step_000010").rename(tmp_path / "later")
    one_row = progression_grid(tmp_path, 32)
    assert two_rows.height - one_row.height >= 32 and min(two_rows.width, one_row.width) >= 6 * 32


def test_the_best_steps_row_is_marked(tmp_path):
    for step in (2, 10):
        (tmp_path / f"step_{step:06}").mkdir()
        save_image(Image.new("RGB", (64, 64), (90, 90, step)), tmp_path / f"step_{step:06}/p0_s0.png",
                   {"prompt": "prompt 0", "seed": 0})
    plain, marked = progression_grid(tmp_path, 32), progression_grid(tmp_path, 32, (10, "fidelity 0.900"))
    assert marked.height == plain.height and marked.width > plain.width  # the longer label widens the label strip
    validation = ValidationSamples(every_n_steps=2, seeds=[0])
    validation.folder = lambda trainer: tmp_path
    path = validation.write_progression(SimpleNamespace(is_global_zero=True), (10, "fidelity 0.900"))
    assert read_metadata(path)["best_step"] == 10
    assert "best_step" not in read_metadata(validation.write_progression(SimpleNamespace(is_global_zero=True)))


def test_the_validations_share_of_the_training_time_is_logged_at_the_end(monkeypatch, caplog):
    validation = ValidationSamples(every_n_steps=2, seeds=[0])
    clock = iter([0.0, 10.0, 13.0, 30.0, 34.0, 40.0])  # start; a round from 10 to 13 s and one from 30 to 34; the end
    monkeypatch.setattr("ldm.callbacks.validation.time.monotonic", lambda: next(clock))
    monkeypatch.setattr(validation, "sample", lambda trainer, pl_module: {})
    monkeypatch.setattr(validation, "write_progression", lambda trainer: None)
    trainer = SimpleNamespace(global_step=0, max_steps=4, is_global_zero=True)
    validation.on_train_start(trainer, None)
    for step in (1, 2, 3, 4):
        trainer.global_step = step
        validation.on_train_batch_end(trainer, None, None, None, 0)
    with caplog.at_level("INFO", logger="ldm.callbacks.validation"):
        validation.on_train_end(trainer, None)
    assert caplog.messages == ["validation: 2 rounds took 7 s, 18 % of this session's 40 s of training (the best "
                               "step's bookkeeping included)"]
