"""The one entry of main.py and every script: logging, one `error:` line for what the user can fix, the exit status."""
import json
import logging
import sys
from typing import Callable, Optional

import yaml

from ldm.util import UserError

USER_STATUS = 1  # a user error, as main.py has always exited
INTERRUPTED_STATUS = 130  # Ctrl-C, as the shell reports it


def one_line(text: str) -> str:
    """`text` with its line breaks and runs of spaces folded, so that an error stays on its `error:` line."""
    return " ".join(text.split())


def describe(err: BaseException) -> Optional[str]:
    """The user-facing sentence of an error the user can fix (bad input, a path they gave, a malformed file they
    wrote); None for anything else, which is a bug and keeps its traceback."""
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, OSError):  # a path the user gave: missing, not writable, a full disk, a folder without weights
        if err.filename is not None and err.strerror:
            return f"{err.filename}: {err.strerror}"
        return str(err) or type(err).__name__
    if isinstance(err, json.JSONDecodeError):
        return f"malformed JSON ({err})"
    if isinstance(err, yaml.YAMLError):
        return f"malformed YAML ({err})"
    return None


def run_command(work: Callable[[], str | int | None], level: int = logging.INFO) -> int:
    """Run a command line's body with logging at `level`. A string it returns is printed (exit status 0), a number
    is the exit status; a user error is one `error:` line on stderr and exit status 1, Ctrl-C exit status 130."""
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s")
    try:
        result = work()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED_STATUS
    except Exception as err:
        message = describe(err)
        if message is None:
            raise
        print(f"error: {one_line(message)}", file=sys.stderr)
        return USER_STATUS
    if isinstance(result, int):
        return result
    if result is not None:
        print(result)
    return 0
