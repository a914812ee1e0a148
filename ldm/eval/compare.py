"""Models side by side (scripts/compare.py): the same prompts, seeds and sampler for each, one labelled picture,
and a table of what each costs (trainable parameters, file size, s/step, peak memory) and, with a scorer, scores.

A model is `[LABEL=]CKPT[+LORA[:SCALE]][+EMBEDDING[:WORD]]...`: a checkpoint, with LoRA files folded in and
textual-inversion embeddings bound to their words. A scorer takes a prompt's images and gives each image a subject and
a prompt fidelity in [0, 1]; the toy world's is here, CLIP and DINO scorers plug into the same `Scorer` interface."""
import csv
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

from PIL import Image, ImageDraw

from ldm.checkpoint import CheckpointError, adapter_kind, read_embedding, read_lora
from ldm.embeddings.files import parse_embedding_spec
from ldm.images import default_font, make_grid
from ldm.lora.files import parse_lora_spec
from ldm.util import UserError, mean, user_or_project_path

logger = logging.getLogger(__name__)
SUMMARY_FILE = "summary.json"  # what a training run writes beside its checkpoints/ folder (ldm/callbacks/progress.py)
SURROUNDINGS = ("in a forest", "in a kitchen", "on a street", "in the snow", "on the beach")


@dataclass
class ModelSpec:
    """A model of the comparison: its label, checkpoint, LoRA specs (`file[:scale]`) and textual-inversion embedding
    specs (`file[:word]`, bound after any --embedding bound in every model)."""

    label: str
    ckpt: str
    loras: list[str] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str, resolve: Callable[[str], str] = str) -> "ModelSpec":
        """`[LABEL=]CKPT[+FILE[:SCALE|:WORD]]...`: each FILE a LoRA (at SCALE) or an embedding (bound to WORD), told
        apart by its content; `resolve` turns each path as written into a file (evaluate.py's `*`). The label defaults
        to the stem of the last file (a CKPT `data/...` that is not in the working folder is the project's own)."""
        label, sep, files = text.partition("=")
        if not sep or re.search(r"[/\\]", label):  # an "=" inside a path (logs/lr=1e-6/...) is no label
            label, files = "", text
        ckpt, *parts = files.split("+")
        if not ckpt or any(not part for part in parts):
            raise UserError(f"--model {text}: expected [LABEL=]CKPT[+LORA[:SCALE]][+EMBEDDING[:WORD]]..., e.g. "
                            "r8=sd.ckpt+r8.safetensors")
        if label in (".", ".."):
            raise UserError(f"--model {text}: the label names the folder samples/<label>/; choose another")
        spec = cls(label, resolve(user_or_project_path(ckpt)))
        last = spec.ckpt
        for part in parts:
            last = spec._add(part, resolve, text)
        spec.label = label or Path(last).stem
        return spec

    def _add(self, part: str, resolve: Callable[[str], str], text: str) -> str:
        """Add one `FILE[:SCALE|:WORD]` part of `text` as a LoRA or an embedding, by what the file holds; its path."""
        path, tail = parse_embedding_spec(part)  # a path that exists as written keeps its colons
        path = resolve(path)
        try:
            kind = adapter_kind(path)
        except CheckpointError as err:
            raise UserError(f"--model {text}: a +FILE must be a LoRA or an embedding file: {err}") from None
        number = tail is not None and _is_number(tail)
        if kind == "lora" and tail is not None and not number:
            raise UserError(f"--model {text}: {path} is a LoRA file, so its :{tail} must be a scale (a number, e.g. "
                            f"{path}:0.8)")
        if kind == "embedding" and number:
            raise UserError(f"--model {text}: {path} is a textual-inversion embedding, so its :{tail} must be the word "
                            f"it binds (e.g. {path}:sks), not a scale")
        (self.loras if kind == "lora" else self.embeddings).append(path if tail is None else f"{path}:{tail}")
        return path

    def files(self) -> list[Path]:
        """What the model adds to its base: the LoRA and embedding files, or the checkpoint itself."""
        return ([Path(parse_lora_spec(lora)[0]) for lora in self.loras]
                + [Path(parse_embedding_spec(spec)[0]) for spec in self.embeddings]) or [Path(self.ckpt)]


def _is_number(text: str) -> bool:
    """Whether `text` reads as a LoRA scale (as `parse_lora_spec` reads it)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def unique_labels(specs: Sequence[ModelSpec]) -> None:
    """Number repeated labels (`last`, `last-2`), so that every row can be told apart."""
    seen: dict[str, int] = {}
    for spec in specs:
        seen[spec.label] = seen.get(spec.label, 0) + 1
        if seen[spec.label] > 1:
            spec.label = f"{spec.label}-{seen[spec.label]}"


def default_prompts(identifier: str, class_word: str) -> list[str]:
    """The subject in five surroundings, then the bare class prompt (does the class still look like itself?)."""
    return [f"a photo of {identifier} {class_word} {where}" for where in SURROUNDINGS] + [f"a photo of a {class_word}"]


def run_summary(path: Path) -> Optional[dict[str, Any]]:
    """The training summary of the run whose `checkpoints/` folder holds `path`, or None (also when unreadable)."""
    summary = path.parent.parent / SUMMARY_FILE
    if path.parent.name != "checkpoints" or not summary.is_file():
        return None
    try:
        values = json.loads(summary.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:  # a run may be writing it right now
        logger.warning("%s: not readable (%s); its columns show -", summary, err)
        return None
    return values if isinstance(values, dict) else None


def adapter_numel(spec: ModelSpec) -> Optional[int]:
    """How many numbers the model's LoRA files (without the .alpha scalars) and embedding vectors hold; None for a
    full model."""
    if not spec.loras and not spec.embeddings:
        return None
    loras = sum(tensor.numel() for lora in spec.loras for key, tensor in read_lora(parse_lora_spec(lora)[0])[0].items()
                if not key.endswith(".alpha"))
    return loras + sum(read_embedding(parse_embedding_spec(emb)[0]).vectors.numel() for emb in spec.embeddings)


def cost_row(spec: ModelSpec) -> dict[str, Any]:
    """Trainable parameters, file size and the training run's s/step and peak memory (None where unknown)."""
    files = spec.files()
    summary = next((s for s in map(run_summary, files) if s), None) or {}
    trainable = summary.get("trainable_parameters")
    return {"model": spec.label, "files": " + ".join(p.name for p in files),
            "trainable_parameters": adapter_numel(spec) if trainable is None else trainable,
            "file_mb": sum(p.stat().st_size for p in files) / 1e6,
            "seconds_per_step": summary.get("seconds_per_step"), "peak_memory": summary.get("peak_memory")}


class Scorer(Protocol):
    """Per image of one prompt: `{"subject": s, "prompt": p}`, fidelities in [0, 1]."""

    def __call__(self, images: Sequence[Image.Image], prompt: str) -> list[dict[str, float]]: ...


def subject_prompts(prompts: Sequence[str], identifier: str) -> list[str]:
    """The prompts that ask for the subject (they name the identifier); all of them when none does."""
    named = [p for p in prompts if re.search(rf"\b{re.escape(identifier)}\b", p)]
    return named or list(prompts)


def _text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, font) -> None:
    """`text` at `xy`; nothing when Pillow has no font (the picture without words) or the font lacks a character."""
    if font is None:
        return
    try:
        draw.multiline_text(xy, text, fill="black", font=font)
    except (OSError, UnicodeEncodeError, ValueError):  # the bitmap fallback font knows Latin-1 only
        logger.debug("could not draw %r", text)


def wrap(text: str, width: int) -> str:
    """`text` broken into lines of at most about `width` characters, at spaces."""
    lines = [""]
    for word in text.split():
        if lines[-1] and len(lines[-1]) + 1 + len(word) > width:
            lines.append(word)
        else:
            lines[-1] = f"{lines[-1]} {word}".strip()
    return "\n".join(lines)


def draw_comparison(images: dict[str, dict[str, list[Image.Image]]], prompts: Sequence[str],
                    captions: Optional[dict[tuple[str, str], str]] = None, per_row: int = 2,
                    zoom: int = 1) -> Image.Image:
    """Rows: the models (labels on the left); columns: the prompts (on top); each cell the model's images of the
    prompt tiled `per_row` wide, with an optional caption under it."""
    cells = {}
    for label, by_prompt in images.items():
        for prompt in prompts:
            grid = make_grid(by_prompt[prompt], per_row)
            cells[label, prompt] = grid.resize((grid.width * zoom, grid.height * zoom), Image.Resampling.NEAREST)
    cell_w, cell_h = max(c.width for c in cells.values()), max(c.height for c in cells.values())
    cell_w = max(cell_w, 150)
    label_w, header_h, caption_h = 110, 48, 34 if captions else 4
    picture = Image.new("RGB", (label_w + len(prompts) * cell_w, header_h + len(images) * (cell_h + caption_h)),
                        "white")
    draw, small, large = ImageDraw.Draw(picture), default_font(12), default_font(15)
    for column, prompt in enumerate(prompts):
        _text(draw, (label_w + column * cell_w + 4, 4), wrap(prompt, cell_w // 8), large)
    for row, label in enumerate(images):
        top = header_h + row * (cell_h + caption_h)
        _text(draw, (4, top + cell_h // 2), wrap(label, 12), large)
        for column, prompt in enumerate(prompts):
            left = label_w + column * cell_w
            picture.paste(cells[label, prompt], (left, top))
            if captions and captions.get((label, prompt)):
                _text(draw, (left + 4, top + cell_h + 2), captions[label, prompt], small)
    return picture


def percent(value: Optional[float]) -> str:
    """0.5 as "50 %", None as "-"."""
    return "-" if value is None else f"{100 * value:.0f} %"


def table_rows(costs: Sequence[dict], scores: dict[str, dict[str, list[dict]]], prompts: Sequence[str],
               identifier: str = "sks") -> list[dict]:
    """One row per model: its costs, and with scores the mean subject fidelity (over the prompts that name
    `identifier`), the mean prompt fidelity (over all) and each prompt's pair."""
    rows, asking = [], subject_prompts(prompts, identifier)
    for cost in costs:
        row = dict(cost)
        by_prompt = scores.get(cost["model"])
        if by_prompt:
            cells = {p: (mean([s["subject"] for s in by_prompt[p]]), mean([s["prompt"] for s in by_prompt[p]]))
                     for p in prompts}
            row["subject_fidelity"] = mean([cells[p][0] for p in asking])
            row["prompt_fidelity"] = mean([cells[p][1] for p in prompts])
            row.update({f"{p} (subject / prompt)": f"{percent(s)} / {percent(f)}" for p, (s, f) in cells.items()})
        rows.append(row)
    return rows


def shown_value(key: str, value: Any) -> str:
    """A table value as the markdown table shows it."""
    if value is None:
        return "-"
    if key == "trainable_parameters":
        return f"{value / 1e6:.3f} M"
    if key in ("subject_fidelity", "prompt_fidelity"):
        return percent(value)
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def write_tables(rows: Sequence[dict], outdir: Path) -> str:
    """`table.csv` (raw values) and `table.md`; returns the markdown."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(outdir / "table.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(shown_value(k, row.get(k)) for k in keys) + " |" for row in rows]
    markdown = "\n".join(lines) + "\n"
    (outdir / "table.md").write_text(markdown)
    return markdown
