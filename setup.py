"""The package list for pyproject.toml: the ldm library, main.py, and scripts/ as `dreambooth_scripts`."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["ldm", "ldm.*"]) + ["dreambooth_scripts"],
      package_dir={"dreambooth_scripts": "scripts"}, py_modules=["main"])
