"""A DreamBooth model evaluated by the paper's protocol: DreamBench's prompts (or a prompt file), N images per prompt at
fixed seeds, each scored (DINO / CLIP-I / CLIP-T, or the toy scorer); per-image and per-prompt CSVs, a summary JSON,
a grid per prompt group, and for several subjects a table in the layout of the paper's Table 1."""
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from PIL import Image

from ldm.eval.compare import ModelSpec, Scorer
from ldm.eval.generation import SampleSettings, sample_model
from ldm.images import labelled_grid
from ldm.util import UserError, atomic_write_text, mean, project_path

DREAMBENCH = project_path("data/dreambench/prompts_and_classes.json")
# DreamBench's prompt lists, in order: recontextualisation, then (live subjects) accessorisation, then properties.
GROUPS = {"object": (("recontextualization", 20), ("property", 5)),
          "live": (("recontextualization", 10), ("accessorization", 10), ("property", 5))}
COLUMNS = {"subject": "subject_fidelity", "prompt": "prompt_fidelity"}  # the toy scorer's, apart from the prompt
PAPER_ROWS = {"real images (paper)": {"dino": 0.774, "clip_i": 0.885, "clip_t": None},
              "DreamBooth, Stable Diffusion (paper)": {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305}}


def dreambench() -> dict[str, Any]:
    """DreamBench's classes, live subjects and prompt templates (data/dreambench, from google/dreambooth)."""
    return json.loads(DREAMBENCH.read_text())


def dreambench_prompts(kind: str, identifier: str, class_word: str) -> list[str]:
    """The 25 object or live-subject prompts with the identifier and class word filled in."""
    templates = dreambench()[f"{kind}_prompts"]
    return [t.format(identifier=identifier, class_word=class_word) for t in templates]


def prompt_groups(prompts: Sequence[str], kind: Optional[str]) -> list[tuple[str, list[str]]]:
    """DreamBench's groups of its prompt list; one group "prompts" for a custom list."""
    if kind is None:
        return [("prompts", list(prompts))]
    groups, start = [], 0
    for name, size in GROUPS[kind]:
        groups.append((name, list(prompts[start:start + size])))
        start += size
    return groups


@dataclass
class Subject:
    """One subject to evaluate: its name, model, real photos, class word and kind (object or live)."""
    name: str
    model: ModelSpec
    photos: list[Image.Image]
    class_word: str
    kind: str = "object"
    prompts: Optional[list[str]] = None  # None: DreamBench's for the kind


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    """Rows as CSV (the columns of the first row), floats with six decimals."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()} for row in rows)
    atomic_write_text(path, text.getvalue())


def evaluate_subject(subject: Subject, settings: SampleSettings, identifier: str, scorer: Scorer, device,
                     outdir: Path) -> dict[str, Any]:
    """Sample, score and write one subject's outputs under `outdir`; returns its summary."""
    prompts = subject.prompts or dreambench_prompts(subject.kind, identifier, subject.class_word)
    images = sample_model(subject.model, settings, prompts, device, outdir / "samples")
    per_image, per_prompt, scores = [], [], {}
    for k, prompt in enumerate(prompts):
        scores[prompt] = [{COLUMNS.get(k, k): v for k, v in score.items()}
                                  for score in scorer(images[prompt], prompt)]
        for seed, score in zip(settings.seeds, scores[prompt]):
            per_image.append({"prompt": prompt, "seed": seed, "file": f"samples/{k:02}-{seed}.png", **score})
        per_prompt.append({"prompt": prompt, **average(scores[prompt])})
    write_csv(outdir / "images.csv", per_image)
    write_csv(outdir / "prompts.csv", per_prompt)
    groups = prompt_groups(prompts, None if subject.prompts else subject.kind)
    for name, members in groups:
        grid = labelled_grid([(p, images[p]) for p in members], len(settings.seeds),
                             f"{subject.name}: {name} ({subject.model.label})")
        grid.save(outdir / f"grid-{name}.png")
    everything = [score for cell in scores.values() for score in cell]
    summary = {"name": subject.name, "class_word": subject.class_word, "kind": subject.kind,
               "model": subject.model.label, "files": [p.name for p in subject.model.files()],
               "identifier": identifier, "images": len(per_image), "seeds": settings.seeds, "sampler": "ddim",
               "steps": settings.steps, "scale": settings.scale, "scores": average(everything),
               "groups": {name: average([s for p in members for s in scores[p]]) for name, members in groups}}
    baseline = getattr(scorer, "real_baseline", None)
    if baseline is not None:
        summary["real_images"] = baseline()
    atomic_write_text(outdir / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary


def average(scores: Sequence[dict[str, float]]) -> dict[str, Optional[float]]:
    """The mean of each metric over the scored images."""
    keys = list(scores[0]) if scores else []
    return {key: mean([s[key] for s in scores]) for key in keys}


def paper_table(summaries: Sequence[dict[str, Any]], metrics: Sequence[str]) -> str:
    """Markdown in the layout of the paper's Table 1: a row per subject, their mean, the real-image baseline (mean of
    the subjects'), and the paper's figures when the metrics are the paper's."""
    def cells(values: dict) -> str:
        return " | ".join("-" if values.get(m) is None else f"{values[m]:.3f}" for m in metrics)

    lines = ["| method | " + " | ".join(m.upper().replace("_", "-") if m in PAPER_ROWS["real images (paper)"]
                                        else m.replace("_", " ") for m in metrics) + " |",
             "|---" * (len(metrics) + 1) + "|"]
    lines += [f"| {s['name']} ({s['model']}) | {cells(s['scores'])} |" for s in summaries]
    if len(summaries) > 1:
        scores = [s["scores"] for s in summaries]
        lines.append(f"| mean of {len(summaries)} subjects | {cells(average_over(scores, metrics))} |")
    reals = [s["real_images"] for s in summaries if "real_images" in s]
    if reals:
        lines.append(f"| real images (ours) | {cells(average_over(reals, metrics))} |")
    if set(metrics) == {"dino", "clip_i", "clip_t"}:
        lines += [f"| {name} | {cells(values)} |" for name, values in PAPER_ROWS.items()]
    return "\n".join(lines) + "\n"


def average_over(rows: Sequence[dict], metrics: Sequence[str]) -> dict[str, Optional[float]]:
    """The mean of each metric over `rows`, skipping the rows that lack it."""
    return {m: mean([r[m] for r in rows if r.get(m) is not None]) for m in metrics}


def subject_kind(name: str, kind: Optional[str]) -> str:
    """`kind` when given, else DreamBench's (live for its cats and dogs)."""
    if kind is not None:
        return kind
    return "live" if name in dreambench()["live_subjects"] else "object"


def subject_class(name: str, class_word: Optional[str]) -> str:
    """`class_word` when given, else DreamBench's class of the subject."""
    if class_word:
        return class_word
    classes = dreambench()["classes"]
    if name not in classes:
        raise UserError(f"subject {name}: not a DreamBench subject; pass --class_word (its class, e.g. dog)")
    return classes[name]
