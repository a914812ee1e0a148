"""The step sweep's report (scripts/toy_sweep.py): validation rounds read from a run's CSV logs, averaged over seeds
with their min and max, the step where each setting peaks, and the report files."""
import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from ldm.toy.sweep import mean_curves, peak_rows, read_rounds, replayed_choices, with_context, write_sweep_report
from tests.helpers.repo import load_script


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True)
    keys = sorted({key for row in rows for key in row})
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, keys)
        writer.writeheader()
        writer.writerows(rows)


def result(method: str, lr: float, seed: int, fidelity: dict[int, float]) -> dict:
    rounds = {str(step): {"fidelity": value, "binding": value, "recontext_subject": 0.5, "recontext_context": 0.5,
                          "leakage": 0.0} for step, value in fidelity.items()}
    return {"method": method, "lr": lr, "seed": seed, "rounds": rounds}


def test_rounds_are_read_from_every_session_and_a_later_session_wins(tmp_path):
    write_csv(tmp_path / "csv" / "version_0" / "metrics.csv",
              [{"step": 99, "train/loss": 0.1}, {"step": 99, "val/binding": 0.25, "val/fidelity": 0.5},
               {"step": 199, "val/binding": 0.5, "val/fidelity": 0.6}])
    write_csv(tmp_path / "csv" / "version_1" / "metrics.csv", [{"step": 199, "val/binding": 0.75}])
    assert read_rounds(tmp_path) == {99: {"binding": 0.25, "fidelity": 0.5}, 199: {"binding": 0.75, "fidelity": 0.6}}


def test_curves_are_means_over_seeds_on_the_steps_every_seed_reached():
    results = [result("full", 2e-4, 23, {100: 0.2, 200: 0.6, 300: 0.4}), result("full", 2e-4, 24, {100: 0.4, 200: 0.8}),
               result("lora16", 1e-3, 23, {100: 0.9})]
    curves = mean_curves(results)
    assert set(curves) == {"full lr 0.0002", "lora16 lr 0.001"}
    assert list(curves["full lr 0.0002"]) == [100, 200]  # step 300: one seed only
    cell = curves["full lr 0.0002"][200]["fidelity"]
    assert (cell["mean"], cell["min"], cell["max"], cell["n"]) == (pytest.approx(0.7), 0.6, 0.8, 2)


def test_the_peak_is_the_best_mean_fidelity_and_the_earliest_of_equals():
    curves = mean_curves([result("full", 1e-4, 23, {100: 0.2, 200: 0.7, 300: 0.7, 400: 0.5})])
    (row,) = peak_rows(curves)
    assert (row["best_step"], row["last_step"]) == (200, 400)
    assert row["at_best"]["fidelity"] == 0.7 and row["at_last"]["fidelity"] == 0.5


def test_the_steps_the_runs_chose_are_measured_on_the_mean_curve():
    runs = [result("full", 1e-4, seed, values) for seed, values in
            ((23, {100: 0.2, 200: 0.9, 300: 0.4}), (24, {100: 0.6, 200: 0.5, 300: 0.8}))]
    runs[0]["best"], runs[1]["best"] = {"best": {"step": 200}}, {"best": {"step": 300}}
    (row,) = peak_rows(mean_curves(runs), runs)
    assert row["best_step"] == 200 and row["auto_steps"] == [200, 300]
    assert row["auto_gap"] == pytest.approx(0.7 - 0.6)  # seed 24 chose 300, whose mean is 0.6 against 0.7 at 200


def test_the_report_holds_the_table_the_curves_and_every_run(tmp_path):
    results = [result(method, lr, seed, {100: 0.1 * seed % 1, 200: 0.5}) for method, lr in
               (("full", 1e-4), ("lora16", 1e-3)) for seed in (23, 24)]
    rows = write_sweep_report(tmp_path, results, ["full", "lora16"], ["python scripts/toy_sweep.py"])
    assert [row["setting"] for row in rows] == ["full lr 0.0001", "lora16 lr 0.001"]
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert len(saved["runs"]) == 4 and saved["peaks"] == rows
    row = "| full lr 0.0001 | 2 | 200 | 50 | 50 | 50 | 50 | 0 | 200 | 50 | 50 | 50 | 50 | 0 | - | - |"
    assert row in (tmp_path / "sweep.md").read_text()
    assert "| full lr 0.0001 | 2 | 200 | 62 | 50 | 50 | 50 | 0 | - | - |" in (tmp_path / "sweep.md").read_text()
    assert saved["peaks_with_context"][0]["at_best"]["with_context"] == pytest.approx(0.625)
    with Image.open(tmp_path / "sweep.png") as picture:
        assert picture.size == (2 * 720, 6 * 300)  # the six metrics down, the two methods across


def test_the_fidelity_with_context_sees_the_overfitting_that_the_default_fidelity_misses():
    run = result("full", 4e-4, 23, {500: 0.8, 1000: 1.0})
    run["rounds"]["500"]["recontext_context"], run["rounds"]["1000"]["recontext_context"] = 0.9, 0.1
    curves = mean_curves([run])
    assert peak_rows(curves)[0]["best_step"] == 1000
    (row,) = peak_rows(curves, key="with_context")
    assert row["best_step"] == 500 and row["at_best"]["with_context"] == pytest.approx((0.8 + 0.5 + 0.9 + 1) / 4)
    assert with_context({"binding": 1.0}) is None


def test_a_replayed_choice_by_one_round_or_a_trailing_mean():
    def run(seed: int, binding: dict[int, float]) -> dict:  # with context: (binding + 0.5 + 0.5 + 1) / 4
        return result("full", 1e-4, seed, binding)
    runs = [run(23, {100: 0.2, 200: 1.0, 300: 0.2, 400: 0.8, 500: 0.8}),
            run(24, {100: 0.2, 200: 0.6, 300: 0.6, 400: 0.6, 500: 0.6})]
    (row,) = replayed_choices(mean_curves(runs), runs)
    one, two = row["windows"][1], row["windows"][2]
    assert one["steps"] == [200, 200] and one["gap"] == 0  # the mean curve peaks at 200 (binding 0.8)
    assert two["steps"] == [500, 300]  # seed 23: (0.8 + 0.8) / 2 beats (1.0 + 0.2) / 2; seed 24: its first pair
    assert two["gap"] == pytest.approx((0.8 - 0.4) / 4)  # the mean binding: 0.8 at step 200, 0.4 at 300


def test_a_missing_subject_folder_is_one_line(tmp_path, capsys):
    missing = tmp_path / "no-photos"
    assert load_script("toy_sweep").main(["--subject", str(missing), "--outdir", str(tmp_path / "sweep")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {missing} is missing")


def test_runs_of_other_settings_in_the_folder_are_refused_before_anything_runs(tmp_path, capsys):
    sweep = load_script("toy_sweep")
    outdir, subject = tmp_path / "sweep", tmp_path / "masked"
    subject.mkdir()
    kept = sweep.run_settings(sweep.parse_args(["--outdir", str(outdir)]))
    (outdir / "results").mkdir(parents=True)
    (outdir / "results" / "full-lr0.0002-seed23.json").write_text(json.dumps({"settings": kept}))
    assert sweep.main(["--outdir", str(outdir), "--subject", str(subject), "--max_steps", "700"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: {outdir / 'results' / 'full-lr0.0002-seed23.json'} was made with other subject, "
                           "max_steps (subject ") and line.endswith("give another --outdir, or the same settings")
    assert not (outdir / "class_images").exists()
    sweep.check_settings(outdir / "results", kept)  # the same settings pass
