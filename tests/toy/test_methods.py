"""The methods' comparison on the toy world (scripts/toy_methods.py): every method's rates and costs over the
training seeds (mean, min and max), in METHODS' order with the base model first, and the report's table."""
import json

import pytest

from ldm.toy.demo import CLASS_PROMPT, CONTEXT_PROMPTS, INSTANCE_PROMPT, summary_rates
from ldm.toy.methods import BY_SLUG, METHODS, cell, kilobytes, method_rows, write_methods_report
from tests.helpers.repo import load_script
from tests.toy.test_demo_report import model_rates


def result(method: str, seed, binding: float, seconds: float = 0.5) -> dict:
    rates = model_rates(binding, 0.5)
    return {"method": method, "seed": seed, "rates": rates, **summary_rates(rates), "file_bytes": 2_000_000,
            "trainable_parameters": 1000, "seconds_per_step": seconds, "peak_memory_bytes": 600_000_000}


def test_the_summary_rates_are_read_as_the_demo_reads_them():
    rates = model_rates(0.75, 0.5)
    rates[CLASS_PROMPT]["subject"] = 0.125
    assert summary_rates(rates) == {"binding": 0.75, "leakage": 0.125, "recontext_subject": 0.75,
                                    "recontext_context": 0.5}
    assert rates[INSTANCE_PROMPT]["context"] is None and len(CONTEXT_PROMPTS) == 5


def test_rows_follow_the_methods_order_with_the_base_first_and_spread_over_seeds():
    results = [result("lora16", 24, 1.0, 0.3), result("full", 23, 0.5), result("lora16", 23, 0.5, 0.1),
               result("base", None, 0.0)]
    base, full, lora = method_rows(results)
    assert [base["method"], full["method"], lora["method"]] == ["base", "full", "lora16"]
    assert base["seeds"] == [] and lora["seeds"] == [23, 24]
    assert lora["binding"] == {"mean": 0.75, "min": 0.5, "max": 1.0, "n": 2}
    assert lora["seconds_per_step"]["mean"] == pytest.approx(0.2)
    assert cell(lora["binding"]) == "75 (50-100)" and cell(full["binding"]) == "50" and cell(None) == "-"
    assert cell(lora["trainable_parameters"], 1) == "1000"  # seeds that agree show the value once


def test_file_sizes_in_kilobytes_keep_a_decimal_below_ten():
    assert kilobytes({"mean": 24_369_000, "min": 24_369_000, "max": 24_369_000, "n": 2}) == "24369"
    assert kilobytes({"mean": 480, "min": 480, "max": 480, "n": 1}) == "0.5" and kilobytes(None) == "-"


def test_every_method_has_a_unique_slug_and_the_extracted_one_names_a_trained_source():
    assert len(BY_SLUG) == len(METHODS)
    for method in METHODS:
        assert method.extracted_from is None or (BY_SLUG[method.extracted_from].extracted_from is None)


def test_the_report_table_has_a_row_per_method(tmp_path):
    results = [result("base", None, 0.0), result("full", 23, 0.75), result("ti", 23, 0.25)]
    write_methods_report(tmp_path, results, "2 CPU cores", ["python scripts/toy_methods.py"])
    table = (tmp_path / "methods.md").read_text()
    assert "| full fine-tune | 1 | 75 | 75 | 50 | 0 | 2000 | 1000 | 0.500 | 600 |" in table
    assert "| textual inversion | 1 | 25 |" in table and "| base model (no training) | - | 0 |" in table
    assert len(json.loads((tmp_path / "methods.json").read_text())["rows"]) == 3


def test_results_of_other_settings_in_the_folder_are_refused_before_anything_runs(tmp_path, capsys):
    methods = load_script("toy_methods")
    outdir = tmp_path / "methods"
    kept = methods.run_settings(methods.parse_args(["--outdir", str(outdir)]))
    (outdir / "results").mkdir(parents=True)
    (outdir / "results" / "base.json").write_text(json.dumps({"settings": kept}))
    assert methods.main(["--outdir", str(outdir), "--max_steps", "700", "--samples", "4"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (f"error: {outdir / 'results' / 'base.json'} was made with other max_steps, samples (max_steps "
                    "500, samples 16); give another --outdir, or the same settings")
    assert not (outdir / "class_images").exists() and not (outdir / "prompts.txt").exists()
