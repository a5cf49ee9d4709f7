"""tf.distribute set-up for `--strategy`: the strategy, the chief, and where each worker writes.

`multi_worker` follows the TensorFlow multi-worker guide: every worker runs the same command with
its own `TF_CONFIG`; all take part in every collective (training steps, validation, checkpoint and
model saves), but only the chief writes to `--model_dir`. The others write to a temporary
directory inside it and delete it at the end. See docs/scaling.md.
"""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf

import yes_reader
from errors import ConfigError

DISTRIBUTED = (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The strategy named by `--strategy`; create it before any other TensorFlow op.

    Raises:
      ConfigError naming the flag if `multi_worker` has no usable `TF_CONFIG`.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    raw = os.environ.get("TF_CONFIG", "")
    try:
        task = json.loads(raw)["task"] if raw else None
        ok = task is not None and task["type"] in ("chief", "worker") and task["index"] >= 0
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise ConfigError(
            f"--strategy={name}: the TF_CONFIG environment variable must hold the cluster and "
            f'this task, e.g. {{"cluster": {{"worker": ["host:port", ...]}}, '
            f'"task": {{"type": "worker", "index": 0}}}}; got {raw!r}'
        )
    return MultiWorkerStrategy()


class MultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """`MultiWorkerMirroredStrategy` whose `reduce` takes what Keras 3 gives it across workers.

    Keras 3 `fit`/`evaluate` average a first (nested) batch over the replicas to build the model,
    and average each step's scalar logs with `axis=0`; across workers TensorFlow's `reduce` takes
    neither nests nor `axis=0` on scalars (keras-team/keras#20585, tensorflow/tensorflow#72388).
    Here nests are reduced leaf by leaf (variables read first) and scalars over the replicas only.
    """

    def reduce(self, reduce_op, value, axis):
        parent = super()

        def one(v):
            if not isinstance(v, tf.distribute.DistributedValues):
                v = tf.convert_to_tensor(v)  # e.g. a metric's variable, returned as a log
            local = v.values[0] if isinstance(v, tf.distribute.DistributedValues) else v
            return parent.reduce(reduce_op, v, None if local.shape.rank == 0 else axis)

        return tf.nest.map_structure(one, value)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's outputs: the `chief` task, else worker 0."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().jobs
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def write_dir(strategy: tf.distribute.Strategy, model_dir: str) -> str:
    """`model_dir` for the chief; `model_dir/.workertemp_<type>_<index>` for the other workers."""
    if is_chief(strategy):
        return model_dir
    resolver = strategy.cluster_resolver
    return os.path.join(model_dir, f".workertemp_{resolver.task_type}_{resolver.task_id}")


def check_batch_size(strategy: tf.distribute.Strategy, batch_size: int) -> int:
    """The per-replica batch size; raises ConfigError naming --batch_size if it does not divide."""
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise ConfigError(
            f"--batch_size={batch_size}: the global batch must split evenly over the "
            f"{replicas} replicas of --strategy"
        )
    return batch_size // replicas


def distribute(
    strategy: tf.distribute.Strategy,
    windows: yes_reader.Windows,
    order: np.ndarray | None = None,
) -> tf.data.Dataset | tf.distribute.DistributedDataset:
    """The windows in `order`, each replica getting its own rows (see `yes_reader.to_dataset`).

    Under the default strategy this is the plain `yes_reader.to_dataset` pipeline.
    """
    if not isinstance(strategy, DISTRIBUTED):
        return yes_reader.to_dataset(windows, order)
    return strategy.distribute_datasets_from_function(
        lambda context: yes_reader.to_dataset(windows, order, context)
    )
