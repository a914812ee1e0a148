"""The step sweep on the toy world: how identifier binding, recontextualisation and leakage move with the training
steps, per method and learning rate, over training seeds. Each run's validation rounds are read from its CSV logs
(`val/<metric>` at every round), averaged over the seeds, and drawn as curves; the table says where each setting
peaks and whether it overfits (recontextualisation falling while binding holds or rises)."""
import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

from PIL import Image

from ldm.eval.fidelity import fidelity, parse_recipe
from ldm.images import line_chart
from ldm.toy.metrics import ToySampleScorer
from ldm.util import atomic_write_text, mean

CONTEXT_RECIPE = parse_recipe(ToySampleScorer.default_recipe)
METRICS = ("fidelity", "with_context", "binding", "recontext_subject", "recontext_context", "leakage")
LABELS = {"fidelity": "fidelity (val/fidelity as the runs logged it)",
          "with_context": "with context (mean of binding, recontext subject and context, 1 - leakage)",
          "binding": "identifier binding",
          "recontext_subject": "recontextualisation: subject", "recontext_context": "recontextualisation: context",
          "leakage": "leakage into the class prompt (lower is better)"}
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
PANEL = (720, 300)
REPLAY_WINDOWS = (1, 2, 3, 4)  # rounds in the trailing mean of a replayed best-step choice


def setting_name(method: str, lr: float) -> str:
    return f"{method} lr {lr:g}"


def with_context(scores: dict[str, float]) -> Optional[float]:
    """The fidelity that also counts the asked context (which falls as a run overfits): the toy scorer's recipe,
    the mean of binding, recontextualisation subject and context, and 1 - leakage; None when one is missing."""
    return fidelity(CONTEXT_RECIPE, scores)


def read_rounds(run: Path) -> dict[int, dict[str, float]]:
    """step -> {metric: value} of every validation round in the run's `csv/*/metrics.csv` (a later session's row for
    a step wins, as after a resume)."""
    rounds: dict[int, dict[str, float]] = defaultdict(dict)
    for path in sorted(run.glob("csv/*/metrics.csv")):
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                for metric in METRICS:
                    value = row.get(f"val/{metric}")
                    if value not in (None, "") and row.get("step") not in (None, ""):
                        rounds[int(float(row["step"]))][metric] = float(value)
    return {step: rounds[step] for step in sorted(rounds)}


def mean_curves(results: Sequence[dict[str, Any]]) -> dict[str, dict[int, dict[str, dict[str, float]]]]:
    """Per setting ("full lr 0.0002"), per step, per metric: the mean, min and max over the runs' seeds (steps that
    every seed of the setting reached)."""
    by_setting: dict[str, list[dict]] = defaultdict(list)
    for result in results:
        by_setting[setting_name(result["method"], result["lr"])].append(result)
    curves = {}
    for name, runs in by_setting.items():
        steps = sorted(set.intersection(*(set(map(int, run["rounds"])) for run in runs)))
        curves[name] = {}
        for step in steps:
            cell = {}
            scores = [{**run["rounds"][str(step)], "with_context": with_context(run["rounds"][str(step)])}
                      for run in runs]
            for metric in METRICS:
                values = [score[metric] for score in scores if score.get(metric) is not None]
                if values:
                    cell[metric] = {"mean": mean(values), "min": min(values), "max": max(values), "n": len(values)}
            curves[name][step] = cell
    return curves


def peak_rows(curves: dict[str, dict[int, dict[str, dict[str, float]]]],
              results: Sequence[dict[str, Any]] = (), key: str = "fidelity") -> list[dict[str, Any]]:
    """Per setting: the step of its best mean `key` (fidelity, or with_context) with every metric there, and the same
    at its last step; with `results`, the steps each run's best-step callback chose (`best.json`, by the fidelity it
    monitored) and how far below the best mean `key` the mean curve is at them (`auto_gap`: the largest such gap over
    the runs)."""
    rows = []
    for name, steps in curves.items():
        scored = [step for step, cell in steps.items() if key in cell]
        if not scored:
            continue
        best = max(scored, key=lambda step: (steps[step][key]["mean"], -step))
        last = max(scored)
        chosen = [run["best"]["best"]["step"] for run in results if setting_name(run["method"], run["lr"]) == name
                  and (run.get("best") or {}).get("best") and run["best"]["best"]["step"] in steps]
        gaps = [steps[best][key]["mean"] - steps[step][key]["mean"] for step in chosen]
        rows.append({"setting": name, "seeds": steps[best][key]["n"], "best_step": best, "last_step": last,
                     "at_best": {m: steps[best][m]["mean"] for m in METRICS if m in steps[best]},
                     "at_last": {m: steps[last][m]["mean"] for m in METRICS if m in steps[last]},
                     "auto_steps": chosen, "auto_gap": max(gaps) if gaps else None})
    return rows


def replayed_choices(curves: dict[str, dict[int, dict[str, dict[str, float]]]], results: Sequence[dict[str, Any]],
                     windows: Sequence[int] = REPLAY_WINDOWS) -> list[dict[str, Any]]:
    """Per setting: the step a best-step callback monitoring the fidelity with context would choose from each run's
    own rounds, by one round's value (window 1) or by the trailing mean of the last `window` rounds (keeping the
    weights of the window's last round), and the most that the mean curve there falls short of its best (`gap`)."""
    rows = []
    for name, steps in curves.items():
        scored = [step for step, cell in steps.items() if "with_context" in cell]
        if not scored:
            continue
        best = max(steps[step]["with_context"]["mean"] for step in scored)
        runs = [run for run in results if setting_name(run["method"], run["lr"]) == name]
        choices = {}
        for window in windows:
            chosen = [replay(run, scored, window) for run in runs]
            gaps = [best - steps[step]["with_context"]["mean"] for step in chosen]
            choices[window] = {"steps": chosen, "gap": max(gaps) if gaps else None}
        rows.append({"setting": name, "windows": choices})
    return rows


def replay(run: dict[str, Any], steps: Sequence[int], window: int) -> int:
    """The step of `steps` (ascending) whose trailing mean of `window` rounds of the fidelity with context is the
    highest in `run`, the earliest of equals (a callback keeps a round only when it beats the best strictly)."""
    values = [with_context(run["rounds"][str(step)]) for step in steps]
    trailing = [mean(values[max(0, k - window + 1):k + 1]) for k in range(len(values))]
    return steps[max(range(len(steps)), key=lambda k: (trailing[k], -k))]


def draw_sweep(curves: dict[str, dict[int, dict[str, dict[str, float]]]], methods: Sequence[str]) -> Image.Image:
    """Rows: the metrics; columns: the methods; in each panel one line per learning rate (the mean over seeds)."""
    panels, last = [], max(max(steps, default=0) for steps in curves.values())
    for metric in METRICS:
        row = []
        for method in methods:
            settings = [name for name in curves if name.split(" lr ")[0] == method]
            series = {name: [(step, cell[metric]["mean"]) for step, cell in curves[name].items() if metric in cell]
                      for name in settings}
            series = {name: points for name, points in series.items() if points}
            if not series:
                continue
            styles = {name: (name, COLOURS[k % len(COLOURS)]) for k, name in enumerate(series)}
            row.append(line_chart(series, styles, f"{method}: {LABELS[metric]}", (0, last), size=PANEL,
                                  value_range=(0, 1), value_format="{:.0%}"))
        if row:
            panels.append(row)
    columns = max(len(row) for row in panels)
    picture = Image.new("RGB", (columns * PANEL[0], len(panels) * PANEL[1]), "white")
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            picture.paste(panel, (c * PANEL[0], r * PANEL[1]))
    return picture


def percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.0f}"


def write_sweep_report(folder: Path, results: Sequence[dict[str, Any]], methods: Sequence[str],
                       commands: Sequence[str]) -> list[dict[str, Any]]:
    """sweep.json (every run's rounds, the curves, the peaks), sweep.md (the table) and sweep.png (the curves)."""
    curves = mean_curves(results)
    rows, context_rows = peak_rows(curves, results), peak_rows(curves, results, "with_context")
    replayed = replayed_choices(curves, results)
    report = {"runs": list(results), "curves": curves, "peaks": rows, "peaks_with_context": context_rows,
              "replayed": replayed}
    atomic_write_text(folder / "sweep.json", json.dumps(report, indent=1) + "\n")
    lines = ["# The step sweep on the toy world", "",
             "Mean over training seeds; every rate in percent (fidelity: `val/fidelity` as the runs logged it, by the "
             "recipe of their config; before 2026-12-07 the toy configs' was the mean of binding, recontextualisation "
             "subject and 1 - leakage). `best`: the step of the best mean fidelity; `last`: the last step; `chosen`: "
             "the steps each run's best-step callback chose, and the most that the mean fidelity there falls short of "
             "the best (in points).", "",
             "| setting | seeds | best step | fidelity | binding | recontext subject | recontext context | leakage "
             "| last step | fidelity | binding | recontext subject | recontext context | leakage | chosen | short by |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [percent(row["at_best"].get(m)) for m in METRICS if m != "with_context"]
        later = [percent(row["at_last"].get(m)) for m in METRICS if m != "with_context"]
        lines.append(f"| {row['setting']} | {row['seeds']} | {row['best_step']} | " + " | ".join(cells)
                     + f" | {row['last_step']} | " + " | ".join(later)
                     + f" | {', '.join(map(str, row['auto_steps'])) or '-'} | {percent(row['auto_gap'])} |")
    lines += ["", "The same, the best step chosen by the fidelity with the asked context (`with context`: the mean of "
              "binding, recontextualisation subject and context, and 1 - leakage), which falls as a run overfits:", "",
              "| setting | seeds | best step | with context | binding | recontext subject | recontext context "
              "| leakage | chosen | short by |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in context_rows:
        cells = [percent(row["at_best"].get(m)) for m in METRICS if m != "fidelity"]
        lines.append(f"| {row['setting']} | {row['seeds']} | {row['best_step']} | " + " | ".join(cells)
                     + f" | {', '.join(map(str, row['auto_steps'])) or '-'} | {percent(row['auto_gap'])} |")
    lines += ["", "A best-step callback replayed on each run's own rounds, choosing by the fidelity with context, by "
              "one round or by the trailing mean of the last 2 to 4 rounds: the steps it chooses and the most that the "
              "mean curve there falls short of the best (in points):", "",
              "| setting | " + " | ".join(f"{w} round{'s' if w > 1 else ''} | short by" for w in REPLAY_WINDOWS) + " |",
              "|---|" + "---|---|" * len(REPLAY_WINDOWS)]
    for row in replayed:
        lines.append(f"| {row['setting']} | " + " | ".join(
            f"{', '.join(map(str, row['windows'][w]['steps']))} | {percent(row['windows'][w]['gap'])}"
            for w in REPLAY_WINDOWS) + " |")
    lines += ["", "![curves](sweep.png)", "", "Commands run:", "", "```", *commands, "```", ""]
    atomic_write_text(folder / "sweep.md", "\n".join(lines))
    if rows:
        draw_sweep(curves, methods).save(folder / "sweep.png")
    return rows
