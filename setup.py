"""The package list for pyproject.toml: the ldm library, main.py, scripts/ as `dreambooth_scripts` (with its
benchmarks/), and the project's own configs/ and data/ (YAML configs, toy weights, toy photos) as
`dreambooth_configs` and `dreambooth_data`, which ldm.util.project_path finds."""
from setuptools import find_packages, setup

FOLDERS = {"dreambooth_scripts": "scripts", "dreambooth_configs": "configs", "dreambooth_data": "data"}
setup(packages=find_packages(include=["ldm", "ldm.*"]) + list(FOLDERS) + ["dreambooth_scripts.benchmarks"],
      package_dir=FOLDERS, py_modules=["main"])
