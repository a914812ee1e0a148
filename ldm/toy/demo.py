"""What the demo measures on the toy world: its prompts, the scorer's rates per prompt and model, the targets of
DreamBooth (identifier binding, prior preservation, recontextualisation), and the report files and picture."""
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

from PIL import Image

from ldm.eval.compare import draw_comparison
from ldm.images import read_metadata
from ldm.toy.scorer import ToyScorer
from ldm.toy.world import COMPARED_CONTEXTS, CONTEXT_PHRASES
from ldm.util import mean

IDENTIFIER, CLASS_WORD = "sks", "ball"
INSTANCE_PROMPT = f"photo of a {IDENTIFIER} {CLASS_WORD}"
CLASS_PROMPT = f"photo of a {CLASS_WORD}"


def context_prompts(identifier: str = IDENTIFIER, class_word: str = CLASS_WORD) -> dict[str, str]:
    """The recontextualisation prompts ("a sks ball in the forest", ...) with their contexts."""
    return {f"a {identifier} {class_word} {CONTEXT_PHRASES[c]}": c for c in COMPARED_CONTEXTS}


CONTEXT_PROMPTS = context_prompts()
PROMPTS = [INSTANCE_PROMPT, CLASS_PROMPT, *CONTEXT_PROMPTS]


def score_folder(folder: Path, scorer: ToyScorer) -> dict[str, dict[str, Any]]:
    """Per prompt, the rates the scorer measures on the PNGs of `folder` (grouped by their stored prompt)."""
    by_prompt: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(folder.glob("*.png")):
        by_prompt[read_metadata(path)["prompt"]].append(path)
    rates = {}
    for prompt, paths in by_prompt.items():
        scores = scorer.score_images([Image.open(p) for p in paths])
        context = CONTEXT_PROMPTS.get(prompt)
        rates[prompt] = {
            "samples": len(scores),
            "subject": sum(s["subject"] for s in scores) / len(scores),
            "ball": sum(s["cls"] == CLASS_WORD for s in scores) / len(scores),
            "context": None if context is None else sum(s["context"] == context for s in scores) / len(scores),
            "files": [p.name for p in paths],
        }
    return rates


def targets(rates: dict[str, dict[str, dict[str, Any]]], seconds: Optional[float]) -> list[dict[str, Any]]:
    """Each target of the demo issue with its measured value and whether it is met."""
    base, tuned = rates["base"], rates["fine-tuned"]
    rows = [
        ("identifier binding: fine-tuned 'photo of a sks ball' shows the subject", tuned[INSTANCE_PROMPT]["subject"],
         ">=", 0.8),
        ("the base model shows the subject (highest rate over all prompts)",
         max(r["subject"] for r in base.values()), "<=", 0.1),
        ("prior preservation: fine-tuned 'photo of a ball' shows the subject", tuned[CLASS_PROMPT]["subject"],
         "<=", 0.2),
        ("recontextualisation: the subject in the five context prompts (mean)",
         mean([tuned[p]["subject"] for p in CONTEXT_PROMPTS]), ">=", 0.6),
        ("recontextualisation: the asked context in the five context prompts (mean)",
         mean([tuned[p]["context"] for p in CONTEXT_PROMPTS]), ">=", 0.8),
    ]
    if seconds is not None:
        rows.append(("the whole demo, in seconds", seconds, "<=", 300))
    return [{"target": name, "measured": round(value, 4), "goal": f"{op} {goal}",
             "met": value >= goal if op == ">=" else value <= goal} for name, value, op, goal in rows]


SUMMARY_RATES = {  # a model's four summary rates: the name in reports and how each is read from its per-prompt rates
    "binding": ("identifier binding (subject in 'photo of a sks ball')", lambda r: r[INSTANCE_PROMPT]["subject"]),
    "leakage": ("prior preservation (subject in 'photo of a ball', lower is better)",
                lambda r: r[CLASS_PROMPT]["subject"]),
    "recontext_subject": ("recontextualisation: subject (mean of the five contexts)",
                          lambda r: mean([r[p]["subject"] for p in CONTEXT_PROMPTS])),
    "recontext_context": ("recontextualisation: asked context (mean of the five contexts)",
                          lambda r: mean([r[p]["context"] for p in CONTEXT_PROMPTS])),
}
SPREAD = dict(SUMMARY_RATES.values())  # the rates that the seed spread reports, by name


def summary_rates(rates: dict[str, dict[str, Any]]) -> dict[str, float]:
    """binding, leakage, recontext_subject and recontext_context of one model's per-prompt rates."""
    return {key: read(rates) for key, (_, read) in SUMMARY_RATES.items()}


def seed_spread(rates: dict[str, dict], models: dict[int, str]) -> list[dict[str, Any]]:
    """Each SPREAD rate over the fine-tuned models of several training seeds (`models`: seed -> model name): its
    value per seed, mean, min and max."""
    rows = []
    for name, read in SPREAD.items():
        values = {seed: read(rates[model]) for seed, model in models.items()}
        rows.append({"rate": name, "per_seed": values, "mean": mean(list(values.values())),
                     "min": min(values.values()), "max": max(values.values())})
    return rows


def percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.0f} %"


def write_report(folder: Path, rates: dict, stages: dict[str, float], seconds: float, commands: list[str],
                 machine: str, quick: bool, seeds: Optional[dict[int, str]] = None) -> dict[str, Any]:
    """report.json and report.md in `folder`; `stages`: the seconds each kind of command took, summed (they overlap,
    so they add up to more than the whole demo's `seconds`); with `seeds` (training seed -> fine-tuned model), the
    spread of the rates over them; returns the report."""
    report = {"machine": machine, "quick": quick, "seconds": seconds, "stages": stages,
              "targets": targets(rates, None if quick or seeds else seconds), "rates": rates, "commands": commands}
    if seeds:
        report["spread"] = seed_spread(rates, seeds)
    (folder / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    models = list(rates)
    lines = ["# DreamBooth on the toy world", "",
             f"Machine: {machine}. Whole demo: {seconds:.0f} s (summed over the commands of each kind, which run "
             "side by side where there are cores for them: "
             + ", ".join(f"{name} {value:.0f} s" for name, value in stages.items()) + ")."]
    if quick:
        lines += ["", "**Quick mode** (a pipeline check with few steps and samples): the rates mean nothing."]
    lines += ["", "| prompt | " + " | ".join(f"{m}: subject | {m}: context" for m in models) + " |",
              "|---|" + "---|---|" * len(models)]
    for prompt in PROMPTS:
        cells = [f"{percent(rates[m][prompt]['subject'])} | {percent(rates[m][prompt]['context'])}" for m in models]
        lines.append(f"| {prompt} | " + " | ".join(cells) + " |")
    if seeds:
        lines += ["", f"Over {len(seeds)} training seeds ({', '.join(map(str, seeds))}), the same class images, "
                  "prompts and sampling seeds:", "",
                  "| rate | mean | min | max | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                  "|---|---|---|---|" + "---|" * len(seeds)]
        lines += [f"| {r['rate']} | {percent(r['mean'])} | {percent(r['min'])} | {percent(r['max'])} | "
                  + " | ".join(percent(r["per_seed"][s]) for s in seeds) + " |" for r in report["spread"]]
    lines += ["", "| target | measured | goal | met |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {t['goal']} | {'yes' if t['met'] else 'no'} |"
              for t in report["targets"]]
    lines += ["", "![samples](report.png)", "", "Commands run:", "", "```"] + commands + ["```", ""]
    (folder / "report.md").write_text("\n".join(lines))
    return report


def draw_picture(path: Path, sample_folders: dict[str, Path], rates: dict, per_cell: int = 4,
                 zoom: int = 2) -> None:
    """Rows: the models; columns: the prompts; each cell a few samples and its measured rates."""
    images = {model: {prompt: [Image.open(folder / name) for name in rates[model][prompt]["files"][:per_cell]]
                      for prompt in PROMPTS} for model, folder in sample_folders.items()}
    captions = {}
    for model in sample_folders:
        for prompt in PROMPTS:
            rate = rates[model][prompt]
            captions[model, prompt] = f"subject {percent(rate['subject'])}" + (
                "" if rate["context"] is None else f"\n{CONTEXT_PROMPTS[prompt]} {percent(rate['context'])}")
    draw_comparison(images, PROMPTS, captions, zoom=zoom).save(path)
