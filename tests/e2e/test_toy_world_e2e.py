"""The toy world end to end: scripts/make_toy_subject.py makes the committed subject photos, pixel for pixel."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers.repo import REPO

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("subject, folder", [("ball", "subject"), ("box", "subject_box")])
def test_committed_subject_photos_are_what_the_script_makes(tmp_path, subject, folder):
    proc = subprocess.run([sys.executable, "scripts/make_toy_subject.py", "--output_dir", str(tmp_path), "--subject",
                           subject], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    made = sorted(tmp_path.glob("*.png"))
    committed = sorted((REPO / "data" / "toy" / folder).glob("*.png"))
    assert [p.name for p in made] == [p.name for p in committed] and 4 <= len(made) <= 6
    for new, old in zip(made, committed):
        assert np.array_equal(np.asarray(Image.open(new)), np.asarray(Image.open(old))), new.name
