"""Every command the README and its chapters in docs/ give, pasted as a user would paste it, parses against the code:
the command lines of their bash and plain ``` blocks and their inline `python ...`, `make ...`, `sd-...`,
`torchrun ...` and `pip ...` spans are split as bash splits them (a shell operator such as an unintended `|` fails),
each goes to its entry (main.py, scripts/X.py, a console command's module from pyproject.toml) and that entry's own
argparse parser reads the arguments; main.py's `a.b=c` overrides must be dotted keys under a known top-level key;
every configs/*.yaml and scripts/*.py they name exists. Nothing is run: the three workflow steps run for real in
test_readme_workflow.py. SKIPPED and SUBSTITUTIONS list every exception."""
import ast
import contextlib
import importlib.util
import io
import re
import shlex
import tomllib
from functools import cache
from types import ModuleType

from ldm.config import TOP_LEVEL_KEYS
from tests.helpers.readme_text import documentation, fenced_blocks, inline_spans, join_continuations
from tests.helpers.repo import REPO, load_script

# (what a skipped command starts with, why it is not parsed)
SKIPPED = [
    ("pip ", "installs packages (the names are the project's extras or other projects' packages)"),
    ("git clone", "downloads DreamBench's photos"),
    ("export ", "sets a variable of the multi-machine examples"),
    ("for ", "the DreamBench loop's head; the main.py line inside it is parsed"),
    ("c=$(python -c", "the loop's class lookup: a command substitution that reads the shipped JSON"),
    ("done", "the loop's end"),
    ("python scripts/*.py", "prose: the scripts as a group"),
    (".venv/bin/lint-imports", "import-linter's command, a test dependency; tests/test_layering.py runs it"),
]
# the first line of each plain ``` block that holds no commands
NOT_COMMANDS = [("main.py, scripts/*.py", "the Layout chapter's map of the files (docs/architecture.md)")]
# (as written, as parsed): placeholders the README writes for "the rest of the command" and optional flags
SUBSTITUTIONS = [
    ("...", "dropped: stands for the flags of the command given before it"),
    ("<run>", "any <name> (a placeholder, a redirect when pasted) becomes one word"),
    ("`sd-img2img`, `python`", "an inline span of one word is a name, not a command"),
    ("[--flag]", "the brackets dropped: an optional flag"),
    ("torchrun/srun OPTIONS", "the launcher and its options dropped; the script after them is parsed"),
]
OPERATORS = set("();<>|&")
PYTHONS = ("python", ".venv/bin/python")


def console_commands() -> dict[str, str]:
    """Console command -> the script it runs (main.py or scripts/X.py), from pyproject.toml."""
    scripts = tomllib.loads(REPO.joinpath("pyproject.toml").read_text())["project"]["scripts"]
    return {name: "main.py" if target == "main:main" else f"scripts/{target.split(':')[0].split('.')[-1]}.py"
            for name, target in scripts.items()}


def commands_in_block(block: str) -> list[str]:
    """The commands of a fenced block: continuations joined; a line that leaves a quote open goes on with the next."""
    commands, pending = [], ""
    for line in join_continuations(block).splitlines():
        pending = f"{pending}\n{line}" if pending else line
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:
            continue
        if words:
            commands.append(pending.strip())
        pending = ""
    assert not pending, f"unclosed quote in a README block: {pending!r}"
    return commands


def readme_commands(text: str) -> list[str]:
    """Every command of the README: its bash and plain blocks' lines, and the inline spans that start like one."""
    starts = (*PYTHONS, "make", "torchrun", "pip", *console_commands())
    inline = [span for span in inline_spans(text) if " " in span and span.split()[0] in starts]
    blocks = [block for block in fenced_blocks(text)
              if not any(block.lstrip().startswith(first) for first, _ in NOT_COMMANDS)]
    return [command for block in blocks for command in commands_in_block(block)] + inline


def split(command: str) -> list[str]:
    """The words of `command` as bash splits them, shell operators as words of their own."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    return list(lexer)


@cache
def entry_module(script: str) -> ModuleType:
    if script == "main.py":
        spec = importlib.util.spec_from_file_location("readme_main", REPO / "main.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load_script(script.removeprefix("scripts/").removesuffix(".py"))


def parse_error(script: str, args: list[str]) -> str:
    """What the script's own parser says of `args` ("" when it takes them)."""
    module, stderr = entry_module(script), io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            if script != "main.py":
                module.parse_args(args)
                return ""
            _, overrides = module.get_parser().parse_known_args(args)
    except SystemExit as exit_:
        return "" if exit_.code == 0 else stderr.getvalue().strip().splitlines()[-1]
    for override in overrides:
        key = override.split("=", 1)[0]
        if "=" not in override or not re.fullmatch(r"[A-Za-z_]\w*(\.\w+)+", key):
            return f"{override!r} is neither a flag of main.py nor an a.b=c override"
        if key.split(".")[0] not in TOP_LEVEL_KEYS:
            return f"override {override!r}: {key.split('.')[0]!r} is not one of {TOP_LEVEL_KEYS}"
    return ""


def missing_configs(words: list[str]) -> list[str]:
    """The configs/ files that --config, --base or -b name and that the repository lacks."""
    missing, taking = [], False
    for word in words:
        if word.startswith("-"):
            taking = word in ("--config", "--base", "-b")
        elif taking and word.startswith("configs/") and not (REPO / word).is_file():
            missing.append(word)
    return missing


def check(command: str) -> str:
    """Why `command` would not work as written ("" when it parses, or is skipped for a listed reason)."""
    if any(command.startswith(prefix) for prefix, _ in SKIPPED):
        return ""
    words = [word for word in split(re.sub(r"<([\w-]+)>", r"\1", command)) if word != "..."]
    if OPERATORS.intersection("".join(w for w in words if set(w) <= OPERATORS)):
        return "a shell operator (pipe, redirect, ; or &&) splits it into other commands"
    words = [word.strip("[]") if word.startswith("[-") or word.endswith("]") else word for word in words]
    if words[0] in ("torchrun", "srun"):
        words = words[next(i for i, word in enumerate(words) if word.endswith(".py") or word in PYTHONS):]
    if words[0] == "make":
        targets = re.findall(r"^([\w-]+):", REPO.joinpath("Makefile").read_text(), re.M)
        return "" if set(words[1:]) <= set(targets) else f"no such make target: {words[1:]} (Makefile: {targets})"
    if words[0] in PYTHONS and words[1] == "-c":
        ast.parse(words[2])
        return ""
    if words[0] in PYTHONS and words[1:3] == ["-m", "pytest"]:
        absent = [word for word in words[3:] if word.startswith("tests/") and not (REPO / word).exists()]
        return f"no such test file: {absent}" if absent else ""
    if words[0] in PYTHONS:
        words = words[1:]
    script = console_commands().get(words[0], words[0])
    if script != "main.py" and not re.fullmatch(r"scripts/(benchmarks/)?\w+\.py", script):
        return f"not a command this test knows: {words[0]!r} (add it to SKIPPED with a reason, or map it)"
    if not (REPO / script).is_file():
        return f"{script} does not exist"
    if missing := missing_configs(words):
        return f"no such config: {missing}"
    return parse_error(script, words[1:])


def test_every_readme_command_parses_against_the_code():
    commands = readme_commands(documentation())
    assert len(commands) > 60, commands  # the blocks and spans were found
    failures = [f"{command}\n    -> {why}" for command in commands if (why := check(command))]
    assert not failures, "README commands that do not work as written:\n" + "\n".join(failures)


def test_every_config_and_script_the_readme_names_exists():
    text = documentation()
    names = set(re.findall(r"\b(?:configs/[\w./-]+\.yaml|scripts/(?:benchmarks/)?\w+\.py)\b", text))
    assert len(names) > 20, names
    assert [name for name in sorted(names) if not (REPO / name).is_file()] == []


def test_each_skip_matches_a_readme_command():
    commands, blocks = readme_commands(documentation()), fenced_blocks(documentation())
    assert [prefix for prefix, _ in SKIPPED if not any(c.startswith(prefix) for c in commands)] == []
    assert [first for first, _ in NOT_COMMANDS if not any(b.lstrip().startswith(first) for b in blocks)] == []


def test_the_check_fails_on_broken_readme_lines():
    """The README lines this test exists for: a pipe in a flag's value, a flag the script lacks, a misspelled
    override, a config that is not there, a make target that is not there, a script that is not there."""
    broken = """
```bash
python scripts/benchmarks/optimizers.py --million 200 --dtype fp32|bf16 --steps 3
python scripts/evaluate.py --model last.ckpt --ckpt last.ckpt
sd-dreambooth-train -t -n dog modle..base_learning_rate=1e-3
python main.py --base configs/stable-diffusion/v1-finetune_nothing.yaml -t
```
`make demo-nothing`, and `python scripts/no_such_script.py --help`.
"""
    commands = readme_commands(broken)
    assert len(commands) == 6, commands
    assert all(check(command) for command in commands), [(c, check(c)) for c in commands]
    assert "shell operator" in check(commands[0]) and "--ckpt" in check(commands[1])
    assert "'modle..base_learning_rate=1e-3' is neither" in check(commands[2])
    assert "no such config" in check(commands[3])
    fixed = "python scripts/benchmarks/optimizers.py --million 200 --dtype fp32 --steps 3"
    assert check(fixed) == "" and check("sd-dreambooth-train -t -n dog model.base_learning_rate=1e-3") == ""
