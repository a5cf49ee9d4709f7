"""deepcf: sequential music recommendation with recurrent networks.

Usage: deepcf --mode=train|eval|recommend|export|search|serve|import [flags] (or python deepcf.py)

Every `config.Config` field is a flag of the same name; only the flags given on the command line
(or in a `--flagfile`) override the defaults. `--help` lists them by group; `--helpfull` adds
absl's own flags.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import TYPE_CHECKING

from absl import app, flags, logging

import config as config_lib
import errors

if TYPE_CHECKING:  # tasks imports TensorFlow: only after the flags are checked
    import tasks

_MODE = flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "eval", "recommend", "export", "search", "serve", "import"],
    "train: fit and save model_dir/model.keras; eval: test-set metrics to metrics.json; "
    "recommend: the --top_k next songs after --history or --history_file; export: a SavedModel "
    "for TensorFlow Serving in model_dir/export/<version>/; search: catalog songs by name "
    "(--query); serve: HTTP on --host:--port (TF Serving's REST predict, /recommend, a page); "
    "import: a file of plays (--input) into a new --data_dir.",
    module_name="deepcf",
)
flags.FLAGS.register_key_flag_for_module("deepcf", flags.FLAGS["verbosity"])


def _define(field: dataclasses.Field) -> flags.FlagHolder:
    """Defines the flag for one Config field, listed in --help under `deepcf.<group>`."""
    module = f"deepcf.{field.metadata['group']}"
    help_text = config_lib.flag_help(field)
    if field.metadata["choices"]:
        choices = list(field.metadata["choices"])
        return flags.DEFINE_enum(field.name, field.default, choices, help_text, module_name=module)
    define = {
        bool: flags.DEFINE_boolean,
        int: flags.DEFINE_integer,
        float: flags.DEFINE_float,
        str: flags.DEFINE_string,
    }[type(field.default)]
    return define(field.name, field.default, help_text, module_name=module)


_CONFIG_FLAGS = {
    f.name: _define(f) for fields in config_lib.fields_by_group().values() for f in fields
}


def usage() -> str:
    """The module docstring, then the flags of each group (data, model, training, ...)."""
    modules = ["deepcf"] + [f"deepcf.{group}" for group in config_lib.fields_by_group()]
    return "\n".join([__doc__, *(flags.FLAGS.module_help(m) for m in modules)])


class _GroupedHelpFlag(flags.BooleanFlag):
    """Replaces absl's --help/-? (which lists only the main module's flags) with `usage()`."""

    def __init__(self):
        super().__init__(
            "help", False, "Show the flags by group and exit.", short_name="?", allow_override=True
        )

    def parse(self, argument) -> None:
        super().parse(argument)
        if self.value:
            try:
                print(usage(), flush=True)
            except BrokenPipeError:  # `deepcf --help | head`: see the Python docs on SIGPIPE
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)


app.define_help_flags()
flags.DEFINE_flag(_GroupedHelpFlag(), module_name="deepcf")


def config_from_flags() -> config_lib.Config:
    """The Config of the defaults overridden by the flags that were given."""
    given = {name: holder.value for name, holder in _CONFIG_FLAGS.items() if holder.present}
    return config_lib.make_config(given, _MODE.value)


def _error(e: Exception) -> int:
    """Reports bad input (flag, data file, saved model, disk) in one line; exit status 2."""
    logging.error("%s", e)
    print(f"deepcf: error: {e}", file=sys.stderr)
    return 2


def run_mode(task: tasks.Task, mode: str, config: config_lib.Config) -> None:
    """Runs the Task method of `--mode` (train, eval, recommend, ...) with `config`."""
    methods = {
        "train": task.train,
        "eval": task.evaluate,
        "recommend": task.recommend,
        "export": task.export,
        "search": task.search,
        "serve": task.serve,
    }
    methods[mode](config)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        config = config_from_flags()  # before the slow TensorFlow import: bad flags fail at once
    except errors.ConfigError as e:
        return _error(e)
    try:
        if _MODE.value == "import":  # no TensorFlow needed
            import importer

            importer.run(config)
        else:
            import tasks

            run_mode(tasks.TASKS[config.task], _MODE.value, config)
    except (
        errors.ConfigError,
        errors.DataError,
        errors.ModelError,
        OSError,  # e.g. disk full or permission denied; the message names the path
    ) as e:
        return _error(e)
    except errors.TrainingError as e:
        print(f"deepcf: training stopped: {e}", file=sys.stderr)
        return 3
    except errors.Interrupted as e:
        print(f"deepcf: {e}", file=sys.stderr)
        return 128 + e.signum  # 130 for SIGINT, 143 for SIGTERM, as the shell reports
    return 0


def run() -> None:
    """Console-script entry point (`deepcf` after `pip install -e .`)."""
    app.run(main)


if __name__ == "__main__":
    run()
