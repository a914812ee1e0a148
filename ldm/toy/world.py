"""The toy world of the demo: small RGB scenes of one object (ball, box or flower) in a context, drawn procedurally
and deterministically from a `Scene` description, each with a Stable-Diffusion-style caption.

The DreamBooth subject is one look that pretraining never shows: a ball whose top half is yellow and bottom half blue.
No object of any class with a yellow-and-blue two-tone look (in either order) appears in the pretraining scenes, so
the second subject, for runs with several subjects, is the box whose top half is blue and bottom half yellow.
"""
from dataclasses import dataclass, replace
from typing import Callable, Optional

import numpy as np

CLASSES = ("ball", "box", "flower")
CONTEXTS = ("plain", "forest", "kitchen", "street", "snow", "beach")
COMPARED_CONTEXTS = CONTEXTS[1:]  # the five contexts of the recontextualisation prompts
COLOURS = {
    "red": (205, 35, 35), "orange": (245, 135, 20), "yellow": (245, 215, 35),
    "green": (35, 150, 45), "blue": (35, 75, 215), "purple": (140, 50, 185),
}
PATTERNS = ("plain", "two-tone", "striped")
PATTERN_WEIGHTS = (0.4, 0.3, 0.3)
CONTEXT_PHRASES = {
    "plain": "on a plain background", "forest": "in the forest", "kitchen": "in the kitchen",
    "street": "on the street", "snow": "in the snow", "beach": "on the beach",
}
CAPTION_PREFIXES = ("a photo of", "photo of", "")
SUPERSAMPLE = 2


@dataclass(frozen=True)
class Scene:
    """One object in one context. `colours` is (main, second): the top and bottom halves of a two-tone object, the
    body and middle band of a striped one; a plain object uses the first. Positions are fractions of the side:
    (`x`, `y`) is where the object stands, `size` its half-height. `seed` draws the background's details."""

    cls: str
    colours: tuple[str, str]
    pattern: str
    context: str
    x: float = 0.5
    y: float = 0.8
    size: float = 0.18
    seed: int = 0

    def __post_init__(self) -> None:
        if self.cls not in CLASSES or self.context not in CONTEXTS or self.pattern not in PATTERNS:
            raise ValueError(f"unknown class, context or pattern in {self}")
        if any(colour not in COLOURS for colour in self.colours):
            raise ValueError(f"unknown colour in {self.colours}; expected some of {tuple(COLOURS)}")


SUBJECT = Scene("ball", ("yellow", "blue"), "two-tone", "plain")
BOX_SUBJECT = Scene("box", ("blue", "yellow"), "two-tone", "plain")
SUBJECTS = {"ball": SUBJECT, "box": BOX_SUBJECT}  # the subjects by their class word


def has_subject_look(scene: Scene) -> bool:
    """Whether the object looks like the subject's kind: two-tone yellow and blue (any class, either order)."""
    return scene.pattern == "two-tone" and set(scene.colours) == set(SUBJECT.colours)


def is_subject(scene: Scene, subject: Scene = SUBJECT) -> bool:
    """Whether the scene shows `subject` (by default the ball, top half yellow, bottom half blue)."""
    return (scene.cls, scene.pattern, scene.colours) == (subject.cls, subject.pattern, subject.colours)


def subject_scene(context: str = "plain", x: float = 0.5, y: float = 0.8, size: float = 0.18, seed: int = 0,
                  subject: Scene = SUBJECT) -> Scene:
    """`subject` (by default the ball) in `context`, standing at (x, y)."""
    return replace(subject, context=context, x=x, y=y, size=size, seed=seed)


def random_layout(rng: np.random.Generator) -> dict[str, float]:
    """A position and size for an object that keeps it inside the picture and on the ground."""
    size = float(rng.uniform(0.12, 0.24))
    x = float(rng.uniform(size + 0.04, 1 - size - 0.04))
    y = float(rng.uniform(max(0.62, 2 * size + 0.04), 0.94))
    return {"x": x, "y": y, "size": size, "seed": int(rng.integers(2**31))}


def random_scene(rng: np.random.Generator, cls: Optional[str] = None, context: Optional[str] = None) -> Scene:
    """A pretraining scene: uniform class, context and colours, never with the subject's look."""
    while True:
        pattern = PATTERNS[rng.choice(len(PATTERNS), p=PATTERN_WEIGHTS)]
        first, second = rng.choice(len(COLOURS), size=2, replace=False)
        names = tuple(COLOURS)
        scene = Scene(cls or CLASSES[rng.integers(len(CLASSES))], (names[first], names[second]), pattern,
                      context or CONTEXTS[rng.integers(len(CONTEXTS))], **random_layout(rng))
        if not has_subject_look(scene):
            return scene


def appearance(scene: Scene) -> str:
    """The words for the object's look: "red ball", "yellow and blue ball", "red ball with a blue stripe"."""
    first, second = scene.colours
    if scene.pattern == "two-tone":
        return f"{first} and {second} {scene.cls}"
    if scene.pattern == "striped":
        return f"{first} {scene.cls} with a {second} stripe"
    return f"{first} {scene.cls}"


def with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def caption(scene: Scene, colour: bool = True, context: bool = True, prefix: str = "a photo of") -> str:
    """The scene's caption, e.g. "a photo of a red ball on the beach"; parts can be left out."""
    text = with_article(appearance(scene) if colour else scene.cls)
    if context:
        text += " " + CONTEXT_PHRASES[scene.context]
    return f"{prefix} {text}" if prefix else text


def random_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A pretraining caption: the look and the context each named three times in four."""
    return caption(scene, colour=bool(rng.random() < 0.75), context=bool(rng.random() < 0.75),
                   prefix=CAPTION_PREFIXES[rng.integers(len(CAPTION_PREFIXES))])


def render(scene: Scene, side: int = 64) -> np.ndarray:
    """The scene as a [side, side, 3] uint8 RGB array, drawn at twice the size and averaged down."""
    n = side * SUPERSAMPLE
    v, u = (np.mgrid[0:n, 0:n] + 0.5) / n
    rng = np.random.default_rng(scene.seed)
    image = BACKGROUNDS[scene.context](u, v, rng)
    _draw_shadow(image, u, v, scene)
    _draw_object(image, u, v, scene)
    image = image.reshape(side, SUPERSAMPLE, side, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(image, 0, 255).round().astype(np.uint8)


def object_mask(scene: Scene, side: int = 64) -> np.ndarray:
    """The share of each pixel that the object covers, [side, side] in [0, 1] (its shadow is background)."""
    n = side * SUPERSAMPLE
    v, u = (np.mgrid[0:n, 0:n] + 0.5) / n
    image = np.full((n, n, 3), np.nan, np.float32)
    _draw_object(image, u, v, scene)
    return np.isfinite(image[..., 0]).astype(np.float32).reshape(side, SUPERSAMPLE, side, SUPERSAMPLE).mean(axis=(1, 3))


def _fill(shape: tuple[int, ...], colour: tuple[float, float, float]) -> np.ndarray:
    return np.broadcast_to(np.asarray(colour, dtype=np.float32), (*shape, 3)).copy()


def _paint(image: np.ndarray, mask: np.ndarray, colour) -> None:
    image[mask] = colour


def _vertical(v: np.ndarray, top: tuple, bottom: tuple, start: float = 0.0, end: float = 1.0) -> np.ndarray:
    """A vertical gradient from `top` at `start` to `bottom` at `end`."""
    t = np.clip((v - start) / (end - start), 0, 1)[..., None]
    return (1 - t) * np.asarray(top, np.float32) + t * np.asarray(bottom, np.float32)


def _plain(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _vertical(v, (196, 196, 200), (172, 172, 176))


def _forest(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    horizon = rng.uniform(0.55, 0.65)
    image = _vertical(v, (25, 70, 35), (45, 105, 50), 0, horizon)
    for x in np.sort(rng.uniform(0, 1, rng.integers(4, 7))):
        width = rng.uniform(0.03, 0.06)
        _paint(image, (np.abs(u - x) < width) & (v < horizon + 0.02), (85, 55, 30))
        for _ in range(3):
            cx, cy, r = x + rng.uniform(-0.08, 0.08), rng.uniform(0.02, horizon - 0.25), rng.uniform(0.08, 0.14)
            _paint(image, (u - cx) ** 2 + (v - cy) ** 2 < r * r, (30 + rng.integers(25), 115 + rng.integers(30), 40))
    ground = v >= horizon
    image[ground] = _vertical(v, (75, 60, 32), (95, 75, 40), horizon, 1)[ground]
    return image


def _kitchen(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    floor = rng.uniform(0.55, 0.62)
    image = _fill(u.shape, (236, 228, 205))
    tile = 0.09
    _paint(image, ((u % tile) < 0.012) | ((v % tile) < 0.012), (205, 195, 175))
    _paint(image, (v > floor - 0.09) & (v < floor), (150, 98, 58))
    checker = ((np.floor(u / 0.125) + np.floor((v - floor) / 0.1)) % 2 == 0) & (v >= floor)
    _paint(image, (v >= floor) & checker, (235, 235, 235))
    _paint(image, (v >= floor) & ~checker, (45, 45, 50))
    return image


def _street(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    kerb = rng.uniform(0.52, 0.58)
    image = _vertical(v, (150, 190, 235), (190, 215, 240), 0, kerb)
    left = -rng.uniform(0, 0.1)
    while left < 1:
        width, top = rng.uniform(0.18, 0.3), rng.uniform(0.08, 0.3)
        colour = [(150, 90, 70), (120, 120, 130), (170, 150, 120), (140, 110, 90)][rng.integers(4)]
        building = (u >= left) & (u < left + width - 0.02) & (v >= top) & (v < kerb)
        _paint(image, building, colour)
        windows = building & ((u - left) % 0.07 < 0.035) & ((v - top) % 0.09 < 0.045) & (v < kerb - 0.05)
        _paint(image, windows, (235, 225, 150) if rng.random() < 0.5 else (60, 70, 90))
        left += width
    _paint(image, (v >= kerb) & (v < kerb + 0.06), (165, 165, 165))
    _paint(image, v >= kerb + 0.06, (68, 68, 74))
    line = rng.uniform(0.78, 0.86)
    _paint(image, (np.abs(v - line) < 0.012) & ((u + rng.uniform()) % 0.25 < 0.13), (240, 240, 240))
    return image


def _snow(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    horizon = rng.uniform(0.45, 0.55)
    image = _vertical(v, (185, 200, 222), (215, 225, 238), 0, horizon)
    hills = horizon - 0.06 * (1 + np.sin(u * rng.uniform(6, 12) + rng.uniform(0, 6))) / 2
    _paint(image, (v >= hills) & (v < horizon), (200, 210, 225))
    ground = v >= horizon
    image[ground] = _vertical(v, (232, 237, 246), (252, 252, 255), horizon, 1)[ground]
    for _ in range(40):
        cx, cy = rng.uniform(0, 1), rng.uniform(0, horizon)
        _paint(image, (u - cx) ** 2 + (v - cy) ** 2 < 0.012 ** 2, (255, 255, 255))
    return image


def _beach(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    sea_top, shore = rng.uniform(0.3, 0.38), rng.uniform(0.5, 0.56)
    image = _vertical(v, (95, 165, 240), (160, 205, 245), 0, sea_top)
    sea = (v >= sea_top) & (v < shore)
    image[sea] = _vertical(v, (20, 90, 170), (40, 130, 200), sea_top, shore)[sea]
    waves = sea & (np.sin(u * 40 + v * 90 + rng.uniform(0, 6)) > 0.93)
    _paint(image, waves, (150, 200, 235))
    sand = v >= shore
    image[sand] = _vertical(v, (215, 190, 135), (238, 215, 160), shore, 1)[sand]
    return image


BACKGROUNDS: dict[str, Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]] = {
    "plain": _plain, "forest": _forest, "kitchen": _kitchen, "street": _street, "snow": _snow, "beach": _beach,
}


def _draw_shadow(image: np.ndarray, u: np.ndarray, v: np.ndarray, scene: Scene) -> None:
    r = scene.size
    inside = ((u - scene.x) / (1.1 * r)) ** 2 + ((v - scene.y) / (0.22 * r)) ** 2 < 1
    image[inside] *= 0.6


def _pattern(scene: Scene, pv: np.ndarray) -> np.ndarray:
    """Colours over the object's height: `pv` runs from -1 (top) to 1 (bottom)."""
    first, second = (np.asarray(COLOURS[c], np.float32) for c in scene.colours)
    if scene.pattern == "two-tone":
        use_second = pv >= 0
    elif scene.pattern == "striped":
        use_second = np.abs(pv) < 1 / 3
    else:
        use_second = np.zeros_like(pv, dtype=bool)
    return np.where(use_second[..., None], second, first)


def _draw_object(image: np.ndarray, u: np.ndarray, v: np.ndarray, scene: Scene) -> None:
    r, x, y = scene.size, scene.x, scene.y
    if scene.cls == "ball":
        cy = y - r
        pu, pv = (u - x) / r, (v - cy) / r
        mask = pu ** 2 + pv ** 2 < 1
        shade = np.clip(1.12 - 0.4 * ((pu + 0.4) ** 2 + (pv + 0.4) ** 2), 0.55, 1.15)
    elif scene.cls == "box":
        half = 0.9 * r
        pu, pv = (u - x) / half, (v - (y - half)) / half
        mask = (np.abs(pu) < 1) & (np.abs(pv) < 1)
        shade = np.where(pv < -0.75, 1.15, np.where(np.maximum(np.abs(pu), np.abs(pv)) > 0.9, 0.7, 1.0))
    else:
        head = 0.8 * r
        cy = y - 2 * r + head
        _paint(image, (np.abs(u - x) < 0.07 * r) & (v > cy) & (v < y), (40, 130, 40))
        pu, pv = (u - x) / head, (v - cy) / head
        angle, radius = np.arctan2(pv, pu), np.sqrt(pu ** 2 + pv ** 2)
        mask = radius < 0.62 + 0.38 * np.abs(np.cos(3 * angle))
        shade = np.where(radius < 0.3, 0.45, 1.0)
    colour = _pattern(scene, pv) * shade[..., None]
    image[mask] = colour[mask]
