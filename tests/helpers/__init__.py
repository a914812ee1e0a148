"""What the tests share and are not fixtures: paths and scripts (repo), tiny models (models), the state-dict specs
(specs), runs of main.py (runs), other tools' file rules (other_tools), the README's text (readme_text), and config
targets for the subprocess tests (slow_callback, rank_probe)."""
