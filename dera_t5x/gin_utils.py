"""T5X-style gin flags for the absl entry points.

`--gin_file=PATH` (repeatable) parses a gin file; `--gin.NAME=VALUE`
(repeatable) becomes the binding `NAME = VALUE`, applied after the files,
e.g. `--gin.TRAIN_STEPS=100` or `--gin.sft.train_sft.batch_size=8`. Gin file
paths are looked up as given, then relative to the repository root.

`run(main)` parses them, then starts multi-host JAX when the gin config says
so (`partitioning.initialize_distributed.enabled = True`), then calls main.
"""

from __future__ import annotations

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


def run(main: Callable[[Sequence[str]], None]) -> None:
    """`absl.app.run(main)` after taking the gin flags out of sys.argv.

    absl cannot define dotted flags, so `--gin.NAME=VALUE` and `--gin_file`
    are taken out of argv before absl parses the rest.
    """
    files, bindings, rest = split_gin_args(sys.argv)

    def main_with_gin(argv: Sequence[str]) -> None:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes
        parse(files, bindings)
        partitioning.initialize_distributed()
        main(argv)

    app.run(main_with_gin, argv=rest)


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
