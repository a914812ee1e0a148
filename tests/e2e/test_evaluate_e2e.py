"""The paper's evaluation end to end: scripts/evaluate.py on two DreamBench subjects with tiny models saved to local
folders by the test."""
import csv
import json

import pytest

from tests.eval.test_evaluate import evaluate_script, folders, photos  # folders: a fixture
from tests.helpers.repo import TINY_CONFIG

pytestmark = pytest.mark.e2e


def test_evaluate_two_dreambench_subjects_end_to_end(tmp_path, tiny_ckpt, folders) -> None:
    clip_dir, dino_dir = folders
    for name, seed in (("dog", 5), ("can", 6)):
        (tmp_path / "dataset" / name).mkdir(parents=True)
        (tmp_path / "models" / name).mkdir(parents=True)
        for k, image in enumerate(photos(seed)[:3]):
            image.save(tmp_path / "dataset" / name / f"{k:02}.jpg")
        (tmp_path / "models" / name / "model.ckpt").symlink_to(tiny_ckpt)
    outdir = tmp_path / "eval"
    args = ["--subjects_root", str(tmp_path / "dataset"), "--model", str(tmp_path / "models" / "{subject}" / "*.ckpt"),
            "--clip", str(clip_dir), "--dino", str(dino_dir), "--config", str(TINY_CONFIG), "--device", "cpu",
            "--n", "2", "--steps", "2", "--outdir", str(outdir)]
    assert evaluate_script.main(args) == 0
    dog = json.loads((outdir / "dog" / "summary.json").read_text())
    assert dog["kind"] == "live" and dog["class_word"] == "dog" and dog["images"] == 50
    assert set(dog["groups"]) == {"recontextualization", "accessorization", "property"}
    assert set(dog["real_images"]) == {"dino", "clip_i"}
    with open(outdir / "can" / "images.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 50 and rows[0]["prompt"] == "a sks can in the jungle"
    assert all(-1 <= float(r["clip_t"]) <= 1 for r in rows)
    assert (outdir / "can" / "grid-property.png").is_file() and (outdir / "can" / rows[0]["file"]).is_file()
    table = (outdir / "table.md").read_text()
    assert "| mean of 2 subjects |" in table and "DreamBooth, Stable Diffusion (paper) | 0.668 | 0.803 | 0.305" in table
