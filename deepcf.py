"""deepcf command line: `python deepcf.py --mode=train|eval [--task=...] [flags]`.

Every `config.Config` field is a flag of the same name; only the flags given on the command line
(or in a `--flagfile`) override the defaults. Run `python deepcf.py --helpfull` for all flags.
"""

from __future__ import annotations

import dataclasses
import sys

from absl import app, flags, logging

import config as config_lib

_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "What to do.")


def _define(field: dataclasses.Field) -> flags.FlagHolder:
    """Defines the flag for one Config field, help text prefixed with its group."""
    help_text = f"[{field.metadata['group']}] {field.metadata['help']}"
    if "choices" in field.metadata:
        return flags.DEFINE_enum(
            field.name, field.default, list(field.metadata["choices"]), help_text
        )
    define = {
        bool: flags.DEFINE_boolean,
        int: flags.DEFINE_integer,
        float: flags.DEFINE_float,
        str: flags.DEFINE_string,
    }[type(field.default)]
    return define(field.name, field.default, help_text)


_CONFIG_FLAGS = {
    f.name: _define(f) for fields in config_lib.fields_by_group().values() for f in fields
}


def config_from_flags() -> config_lib.Config:
    """The Config of the defaults overridden by the flags that were given."""
    given = {name: holder.value for name, holder in _CONFIG_FLAGS.items() if holder.present}
    return config_lib.make_config(given)


def _error(e: Exception) -> int:
    """Reports bad input (flag, data file, saved model, disk) in one line; exit status 2."""
    logging.error("%s", e)
    print(f"deepcf: error: {e}", file=sys.stderr)
    return 2


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        config = config_from_flags()  # before the slow TensorFlow import: bad flags fail at once
    except config_lib.ConfigError as e:
        return _error(e)
    import tasks

    try:
        task = tasks.TASKS[config.task]
        if _MODE.value == "train":
            task.train(config)
        else:
            task.evaluate(config)
    except (
        config_lib.ConfigError,
        tasks.yes_reader.DataError,
        tasks.modeltrainer.ModelError,
        OSError,  # e.g. disk full or permission denied; the message names the path
    ) as e:
        return _error(e)
    except tasks.hooks.TrainingError as e:
        print(f"deepcf: training stopped: {e}", file=sys.stderr)
        return 3
    return 0


def run() -> None:
    """Console-script entry point (`deepcf` after `pip install -e .`)."""
    app.run(main)


if __name__ == "__main__":
    run()
