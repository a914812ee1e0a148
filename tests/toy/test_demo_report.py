"""The demo's report over several training seeds (scripts/toy_demo.py --seeds N): each rate's value per seed, mean,
min and max, in report.json and report.md; --seeds 0 is one line before anything runs."""
import json

import pytest

from ldm.toy.demo import CLASS_PROMPT, CONTEXT_PROMPTS, INSTANCE_PROMPT, PROMPTS, seed_spread, write_report
from tests.helpers.repo import load_script


def model_rates(subject: float, context: float) -> dict:
    """A model's rates: `subject` for every prompt but the class prompt (0), `context` for the context prompts."""
    return {p: {"samples": 4, "subject": 0.0 if p == CLASS_PROMPT else subject, "ball": 1.0,
                "context": context if p in CONTEXT_PROMPTS else None, "files": []} for p in PROMPTS}


RATES = {"base": model_rates(0.0, 1.0), "fine-tuned": model_rates(0.75, 0.5),
         "fine-tuned seed 24": model_rates(1.0, 0.25), "fine-tuned seed 25": model_rates(0.5, 1.0)}
SEEDS = {23: "fine-tuned", 24: "fine-tuned seed 24", 25: "fine-tuned seed 25"}


def test_the_spread_is_each_rates_mean_min_and_max_over_the_seeds():
    binding, prior, subject, context = seed_spread(RATES, SEEDS)
    assert binding["per_seed"] == {23: 0.75, 24: 1.0, 25: 0.5} and binding["mean"] == pytest.approx(0.75)
    assert (binding["min"], binding["max"]) == (0.5, 1.0)
    assert prior["per_seed"] == {23: 0.0, 24: 0.0, 25: 0.0}
    assert subject["mean"] == pytest.approx(0.75) and context["per_seed"] == {23: 0.5, 24: 0.25, 25: 1.0}
    assert RATES["fine-tuned"][INSTANCE_PROMPT]["subject"] == binding["per_seed"][23]


def test_the_report_holds_the_spread(tmp_path):
    report = write_report(tmp_path, RATES, {"fine-tune": 10.0}, 12.0, ["python main.py"], "2 CPU cores", False, SEEDS)
    assert [row["rate"] for row in json.loads((tmp_path / "report.json").read_text())["spread"]] == [
        row["rate"] for row in report["spread"]]
    text = (tmp_path / "report.md").read_text()
    assert "Over 3 training seeds (23, 24, 25)" in text
    binding = "| identifier binding (subject in 'photo of a sks ball') | 75 % | 50 % | 100 % | 75 % | 100 % | 50 % |"
    assert binding in text
    assert all(t["target"] != "the whole demo, in seconds" for t in report["targets"])  # one run's time only


def test_no_seed_is_one_line(tmp_path, capsys):
    assert load_script("toy_demo").main(["--seeds", "0", "--outdir", str(tmp_path / "demo")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: --seeds 0: give at least 1"
    assert not (tmp_path / "demo").exists()
