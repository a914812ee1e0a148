"""The repository's paths as the tests use them, and scripts loaded as modules."""
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "tiny" / "v1-inference.yaml"
FULL_CONFIG = REPO / "configs" / "stable-diffusion" / "v1-inference.yaml"


def load_script(name: str, path: Path | None = None):
    """scripts/<name>.py (or the file at `path`) as a module named `name`, for testing its functions."""
    spec = importlib.util.spec_from_file_location(name, path or REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
