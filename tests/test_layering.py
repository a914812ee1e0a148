"""The package's layering (docs/architecture.md): `lint-imports` keeps pyproject.toml's contracts (layers, the data,
modules and scripts rules, no cycles) and catches an import that breaks one; and no module of ldm/, scripts/ or
main.py imports our own code inside a function, where such an import would hide a cycle (nor does a test); the CompVis
import paths that users and configs name, and every config's `target:`, still resolve."""
import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from ldm.util import get_obj_from_str
from tests.helpers.repo import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
OUR_PACKAGES = ("ldm", "main", "scripts", "benchmarks", "dreambooth_scripts", "tests", "conftest")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """lint-imports with the repository's contracts, run on the `ldm` package found in `root`."""
    config = REPO / "pyproject.toml"
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(config), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_import_contracts_are_kept():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    shutil.copytree(REPO / "ldm", tmp_path / "ldm", ignore=shutil.ignore_patterns("__pycache__"))
    util = tmp_path / "ldm" / "util.py"
    util.write_text(util.read_text() + "\nfrom ldm.inference import flags  # noqa: E402,F401\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0 and "ldm.util -> ldm.inference.flags" in result.stdout, result.stdout


def function_level_imports(path: Path) -> list[str]:
    """`file:line module` for each import of our own code inside a function or method of `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                names = ([alias.name for alias in inner.names] if isinstance(inner, ast.Import) else
                         [inner.module or ""] if isinstance(inner, ast.ImportFrom) else [])
                found += [f"{path.name}:{inner.lineno} {name}" for name in names
                          if name.split(".")[0] in OUR_PACKAGES]
    return found


def test_a_function_level_import_is_found(tmp_path):
    source = tmp_path / "late.py"
    source.write_text("import json\n\n\ndef f():\n    import torch\n    from ldm.util import UserError\n")
    assert function_level_imports(source) == ["late.py:6 ldm.util"]


def test_no_function_imports_our_own_modules():
    files = [REPO / "main.py", *(REPO / "ldm").rglob("*.py"), *(REPO / "scripts").rglob("*.py"),
             *(REPO / "tests").rglob("*.py")]
    assert [line for path in files for line in function_level_imports(path)] == []


def test_the_ldm_root_holds_leaves_only():
    assert sorted(p.name for p in (REPO / "ldm").glob("*.py")) == [
        "__init__.py", "cli.py", "config.py", "images.py", "lr_scheduler.py", "util.py"]


COMPVIS_PATHS = ("ldm.models.diffusion.ddpm.LatentDiffusion", "ldm.models.autoencoder.AutoencoderKL",
                 "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                 "ldm.modules.encoders.modules.FrozenCLIPEmbedder", "ldm.util.instantiate_from_config",
                 "ldm.data.personalized.PersonalizedBase",
                 "ldm.models.diffusion.ddim.DDIMSampler", "ldm.models.diffusion.plms.PLMSSampler",
                 "ldm.lr_scheduler.LambdaLinearScheduler")


def test_the_compvis_paths_and_every_config_target_resolve():
    targets = {target for path in (REPO / "configs").rglob("*.yaml")
               for target in re.findall(r"^\s*target:\s*(ldm\.[\w.]+)", path.read_text(), re.M)}
    assert len(targets) > 10, targets
    for name in sorted(set(COMPVIS_PATHS) | targets):
        assert callable(get_obj_from_str(name)), name
