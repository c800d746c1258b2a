"""T5X-style gin flags for the absl entry points.

`--gin_file=PATH` (repeatable) parses a gin file; `--gin.NAME=VALUE`
(repeatable) becomes the binding `NAME = VALUE`, applied after the files,
e.g. `--gin.TRAIN_STEPS=100` or `--gin.sft.train_sft.batch_size=8`. Gin file
paths are looked up as given, then relative to the repository root.

`run(main)` parses them, then starts multi-host JAX when the gin config says
so (`partitioning.initialize_distributed.enabled = True`), then calls main.
An error the user caused (a `ValueError` such as a bad setting, a damaged
checkpoint or changed settings on resume; a missing file; a non-finite loss)
ends the program with one line on stderr, `error: <message>`, and exit
status 1; `--traceback` (or `DERA_T5X_TRACEBACK=1`) shows the Python
traceback instead. Other exceptions (bugs) keep their traceback.

`operative_bindings()` and `bindings_of(selector)` give gin settings as plain
data: the trainer compares the former on resume, the pipeline keys its
stages by the latter.
"""

from __future__ import annotations

import os
import pathlib
import sys
from typing import Any, Callable, Sequence

from absl import app
from absl import logging
import gin

from dera_t5x import partitioning

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def split_gin_args(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """Separates (gin files, gin bindings, other args) from a command line."""
    files, bindings, rest = [], [], []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--gin_file="):
            files.append(arg.split("=", 1)[1])
        elif arg == "--gin_file" and i + 1 < len(args):
            files.append(args[i + 1])
            i += 1
        elif arg.startswith("--gin.") and "=" in arg:
            name, value = arg[len("--gin."):].split("=", 1)
            bindings.append(f"{name} = {value}")
        else:
            rest.append(arg)
        i += 1
    return files, bindings, rest


def parse(files: Sequence[str], bindings: Sequence[str]) -> None:
    """Parses gin files and bindings; a missing file is a clear error."""
    gin.add_config_file_search_path(str(REPO_ROOT))
    for path in files:
        if not pathlib.Path(path).exists() and not (REPO_ROOT / path).exists():
            raise FileNotFoundError(f"gin file {path!r} does not exist (looked in the current "
                                    f"directory and the repository root).")
    gin.parse_config_files_and_bindings(list(files), list(bindings), finalize_config=False)


# Errors a user causes: one line on stderr, no traceback (unless asked for).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError,
               NotADirectoryError, PermissionError, NotImplementedError, FloatingPointError)
TRACEBACK_ENV = "DERA_T5X_TRACEBACK"


def user_error_line(error: BaseException) -> str:
    """The one line printed for a user error: its message without the lines gin
    adds ("In call to configurable ..."), joined."""
    lines = [line.strip() for line in str(error).splitlines()
             if line.strip() and not line.strip().startswith("In call to configurable")
             and not line.strip().startswith("In file ")]
    return "error: " + (" ".join(lines) or type(error).__name__)


def run(main: Callable[[Sequence[str]], None]) -> None:
    """`absl.app.run(main)` after taking the gin flags out of sys.argv.

    absl cannot define dotted flags, so `--gin.NAME=VALUE`, `--gin_file` and
    `--traceback` are taken out of argv before absl parses the rest. A
    `USER_ERRORS` exception ends the program with one line on stderr and exit
    status 1 (the traceback with `--traceback` or `DERA_T5X_TRACEBACK=1`).
    """
    argv = list(sys.argv)
    show_traceback = "--traceback" in argv or os.environ.get(TRACEBACK_ENV) == "1"
    argv = [arg for arg in argv if arg != "--traceback"]
    files, bindings, rest = split_gin_args(argv)

    def main_with_gin(argv: Sequence[str]) -> None:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes
        try:
            parse(files, bindings)
            partitioning.initialize_distributed()
            main(argv)
        except USER_ERRORS as e:
            if show_traceback:
                raise
            print(user_error_line(e) + " (rerun with --traceback for the traceback)",
                  file=sys.stderr, flush=True)
            sys.exit(1)

    app.run(main_with_gin, argv=rest)


# ------------------------------------------------------------------ settings


def operative_bindings() -> dict[str, str]:
    """The operative gin config (what the process has used so far) as
    {'scope/module.fn.param' or 'MACRO': value text, whitespace normalized}."""
    bindings: dict[str, str] = {}
    key = None
    for line in gin.operative_config_str().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line[0].isspace() and key is not None:  # a continuation line
            bindings[key] += " " + line.strip()
            continue
        if line.startswith(("import ", "from ")) or " = " not in line:
            key = None
            continue
        key, _, value = line.partition(" = ")
        key = key.strip()
        bindings[key] = value.strip()
    return {_full_key(k): " ".join(v.rstrip("\\").replace("\\ ", " ").split())
            for k, v in bindings.items()}


def _full_key(key: str) -> str:
    """'scope/fn.param' with the configurable's full name ('dera_t5x.training.
    trainer.make_schedule.learning_rate'): gin prints the shortest unambiguous
    name, which depends on what else the process imported. Macros stay."""
    scope, _, selector = key.rpartition("/")
    name, _, param = selector.rpartition(".")
    if not name:
        return key
    try:
        configurable = gin.get_configurable(name)
    except ValueError:
        return key
    full = f"{configurable.__module__}.{configurable.__name__}.{param}"
    return f"{scope}/{full}" if scope else full


def _resolve(value: Any, depth: int) -> Any:
    """Gin references in a binding's value, replaced by what they stand for."""
    if isinstance(value, gin.config.ConfigurableReference):
        text = str(value)
        if text.startswith("%"):  # a macro: its value
            return _resolve(gin.query_parameter(text), depth + 1)
        if depth > 8:
            return text
        return {"@": text, **bindings_of(value.scoped_selector, depth + 1)}
    if isinstance(value, dict):
        return {k: _resolve(v, depth) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_resolve(v, depth) for v in value]
    return value


def bindings_of(selector: str, depth: int = 0) -> dict[str, Any]:
    """The gin bindings of one configurable (e.g. 'rl.train_rl'), references and
    macros resolved recursively, as plain data; {} when it is not registered.
    Parameters left at their defaults are not bindings and do not appear."""
    try:
        bindings = gin.get_bindings(selector, resolve_references=False)
    except ValueError:
        return {}
    return {name: _resolve(value, depth) for name, value in sorted(bindings.items())}


def model_config(required: bool = True) -> Any:
    """The model config bound to the `MODEL_CONFIG` macro of the gin files.

    Args:
      required: without a binding, raise (True) or return None (False).
    """
    try:
        value = gin.query_parameter("%MODEL_CONFIG")
    except ValueError:
        if not required:
            return None
        raise ValueError("No MODEL_CONFIG in the gin config: add a gin file from gin/models/ "
                         "with --gin_file.") from None
    if isinstance(value, gin.config.ConfigurableReference):
        value = value.scoped_configurable_fn()
    return value
