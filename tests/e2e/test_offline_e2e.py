"""Optional packages offline, in a fresh process: bitsandbytes imports without the hub warning about the kernel it did
not fetch."""
import os
import subprocess
import sys

import pytest

from tests.helpers.repo import REPO

pytestmark = pytest.mark.e2e


def test_bitsandbytes_imports_without_the_hub_warning():
    """On a CPU with AVX-512 bf16 a plain `import bitsandbytes` asks the hub for a kernel and warns without it."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes)")
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    code = ("from ldm.util import import_offline; import_offline('bitsandbytes.optim'); "
            "from bitsandbytes.functional import has_avx512bf16; print(has_avx512bf16())")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    if result.stdout.split()[-1] != "True":
        pytest.skip("this CPU has no AVX-512 bf16, so bitsandbytes asks the hub for no kernel here")
    assert "gemm_4bit" not in result.stderr
