"""The command lines (`python scripts/<name>.py`), installed as `dreambooth_scripts` for the console commands."""
