"""Every way to personalise the model, side by side on the toy world: the methods (how each trains and what it
samples with), their rates over training seeds (mean, min and max), their costs, and the report."""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ldm.toy.demo import SUMMARY_RATES
from ldm.util import atomic_write_text, mean

FULL, LORA = "configs/toy/v1-finetune_unfrozen.yaml", "configs/toy/v1-finetune_lora.yaml"


@dataclass(frozen=True)
class Method:
    """A row of the comparison: `slug` names its runs and files, `config` and `flags` its main.py command line;
    an extracted method trains nothing: it factors the `extracted_from` method's run into a LoRA of `rank`, with
    `extract_flags` (scripts/extract_lora.py's, e.g. --conv)."""

    slug: str
    label: str
    config: str = FULL
    flags: tuple[str, ...] = ()
    extracted_from: Optional[str] = None
    rank: int = 16
    extract_flags: tuple[str, ...] = ()


METHODS = (
    Method("full", "full fine-tune"),
    Method("full-frozen-prior", "full fine-tune, frozen-model prior", flags=("--prior", "frozen_model")),
    Method("lora4", "LoRA r4", LORA, ("--rank", "4")),
    Method("lora8", "LoRA r8", LORA, ("--rank", "8")),  # what DoRA, LoHa, LoKr and pivotal tuning add to
    Method("lora16", "LoRA r16", LORA, ("--rank", "16")),
    Method("dora8", "DoRA r8", LORA, ("--network", "dora", "--rank", "8")),
    Method("loha8", "LoHa r8", LORA, ("--network", "loha", "--rank", "8")),
    Method("lokr8", "LoKr r8", LORA, ("--network", "lokr", "--rank", "8")),
    Method("extracted16", "LoRA r16 extracted from the full fine-tune", extracted_from="full", rank=16),
    Method("extracted16conv", "LoRA r16 + LoCon convs extracted from the full fine-tune", extracted_from="full",
           rank=16, extract_flags=("--conv",)),
    Method("ti", "textual inversion", FULL, ("--train_embedding",)),
    Method("pivotal8", "pivotal tuning (embedding + LoRA r8)", LORA, ("--rank", "8", "--train_embedding")),
)
BY_SLUG = {method.slug: method for method in METHODS}
COSTS = ("file_bytes", "trainable_parameters", "seconds_per_step", "peak_memory_bytes")


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"mean": mean(values), "min": min(values), "max": max(values), "n": len(values)}


def method_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method (in METHODS' order; the base model first when measured): each summary rate and cost over the
    seeds that finished."""
    rows = []
    for slug in ["base", *BY_SLUG]:
        runs = [result for result in results if result["method"] == slug]
        if not runs:
            continue
        row = {"method": slug, "label": BY_SLUG[slug].label if slug in BY_SLUG else "base model (no training)",
               "seeds": sorted(run["seed"] for run in runs if run["seed"] is not None)}
        for key in (*SUMMARY_RATES, *COSTS):
            values = [run[key] for run in runs if run.get(key) is not None]
            row[key] = spread(values) if values else None
        rows.append(row)
    return rows


def cell(value: Optional[dict[str, float]], scale: float = 100, digits: int = 0) -> str:
    """`mean (min-max)` of a spread, scaled (percent by default); a single seed, or seeds that agree, show the value
    only."""
    if value is None:
        return "-"
    text = f"{value['mean'] * scale:.{digits}f}"
    if value["n"] == 1 or value["min"] == value["max"]:
        return text
    return f"{text} ({value['min'] * scale:.{digits}f}-{value['max'] * scale:.{digits}f})"


def kilobytes(value: Optional[dict[str, float]]) -> str:
    """A file size cell in kB, with a decimal below 10 kB (an embedding's file is under 1 kB)."""
    return cell(value, 1e-3, 1 if value is not None and value["mean"] < 1e4 else 0)


def write_methods_report(folder: Path, results: Sequence[dict[str, Any]], machine: str,
                         commands: Sequence[str]) -> list[dict[str, Any]]:
    """methods.json (every run and the rows) and methods.md (the table: mean and min-max over the seeds)."""
    rows = method_rows(results)
    atomic_write_text(folder / "methods.json", json.dumps({"machine": machine, "runs": list(results), "rows": rows},
                                                          indent=1) + "\n")
    lines = ["# Every method on the toy world", "",
             f"Machine: {machine}. Rates in percent, each the mean over the training seeds with its min-max; the "
             "demo's prompts and sampling seeds; s/step and peak RSS from each run's summary.json.", "",
             "| method | seeds | binding | recontext subject | recontext context | leakage (lower is better) | file kB "
             "| trained parameters | s/step | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['label']} | {len(row['seeds']) or '-'} | {cell(row['binding'])} | "
                     f"{cell(row['recontext_subject'])} | {cell(row['recontext_context'])} | {cell(row['leakage'])} | "
                     f"{kilobytes(row['file_bytes'])} | {cell(row['trainable_parameters'], 1)} | "
                     f"{cell(row['seconds_per_step'], 1, 3)} | {cell(row['peak_memory_bytes'], 1e-6)} |")
    lines += ["", "![samples of the first seed](methods.png)", "", "Commands run:", "", "```", *commands, "```", ""]
    atomic_write_text(folder / "methods.md", "\n".join(lines))
    return rows

