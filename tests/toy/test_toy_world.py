"""The toy world: deterministic renders of every class x context x pattern, captions, the subject never in the
pretraining distribution (the committed subject photos as the script makes them: tests/e2e/test_toy_world_e2e.py)."""
import numpy as np
import pytest

from ldm.toy.world import (BOX_SUBJECT, CLASSES, CONTEXTS, PATTERNS, SUBJECT, Scene, caption, has_subject_look,
                           is_subject, random_caption, random_scene, render, subject_scene)


@pytest.mark.parametrize("context", CONTEXTS)
def test_every_class_and_pattern_renders_in_every_context(context):
    background = render(Scene("ball", ("red", "blue"), "plain", context, size=0.01, y=0.99))
    for cls in CLASSES:
        for pattern in PATTERNS:
            image = render(Scene(cls, ("red", "blue"), pattern, context, seed=3))
            assert image.shape == (64, 64, 3) and image.dtype == np.uint8
            changed = np.abs(image.astype(int) - background.astype(int)).sum(-1) > 60
            assert changed.mean() > 0.03, (cls, pattern, context)  # the object is drawn, not lost in the background


def test_rendering_is_deterministic_and_the_seed_draws_the_background():
    scene = Scene("flower", ("purple", "orange"), "striped", "forest", x=0.4, y=0.8, size=0.2, seed=7)
    assert np.array_equal(render(scene), render(scene))
    other_trees = Scene("flower", ("purple", "orange"), "striped", "forest", x=0.4, y=0.8, size=0.2, seed=8)
    assert not np.array_equal(render(scene), render(other_trees))
    assert render(scene, side=32).shape == (32, 32, 3)


def test_patterns_put_the_colours_where_the_caption_says():
    scene = subject_scene("plain", x=0.5, y=0.9, size=0.3)
    image = render(scene).astype(int)
    top, bottom = image[20, 32], image[44, 32]  # above and below the ball's middle (centre at y = 0.6 * 64)
    assert top[0] > 150 and top[1] > 150 and top[2] < 100  # yellow
    assert bottom[2] > 120 and bottom[0] < 80  # blue


def test_captions():
    assert caption(Scene("ball", ("red", "blue"), "plain", "beach")) == "a photo of a red ball on the beach"
    assert caption(Scene("box", ("orange", "green"), "striped", "snow")) == (
        "a photo of an orange box with a green stripe in the snow")
    assert caption(SUBJECT, context=False, prefix="") == "a yellow and blue ball"
    assert caption(Scene("flower", ("red", "blue"), "two-tone", "kitchen"), colour=False, prefix="photo of") == (
        "photo of a flower in the kitchen")


def test_pretraining_never_shows_the_subject_or_the_identifier():
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(3000)]
    assert not any(has_subject_look(s) for s in scenes)
    assert {s.cls for s in scenes} == set(CLASSES) and {s.context for s in scenes} == set(CONTEXTS)
    assert {s.pattern for s in scenes} == set(PATTERNS)
    assert any(s.pattern == "two-tone" and "yellow" in s.colours for s in scenes)  # the parts of the look do occur
    captions = [random_caption(s, rng) for s in scenes]
    assert not any("sks" in c for c in captions)
    assert any(c == "a photo of a ball" or c == "photo of a ball" for c in captions)
    assert is_subject(subject_scene("beach")) and not is_subject(Scene("ball", ("blue", "yellow"), "two-tone", "beach"))


def test_the_second_subject_is_a_box_no_pretraining_scene_shows():
    assert has_subject_look(BOX_SUBJECT) and BOX_SUBJECT.cls != SUBJECT.cls
    assert is_subject(subject_scene("snow", subject=BOX_SUBJECT), BOX_SUBJECT)
    assert not is_subject(subject_scene("snow"), BOX_SUBJECT) and not is_subject(Scene(
        "box", ("yellow", "blue"), "two-tone", "snow"), BOX_SUBJECT)
