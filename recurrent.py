"""The recurrent stack the models share (LSTM|GRU layers that carry their state) and
`compile_model`: Adam with clipping by global norm (and `learning_rate`, its schedule), for
`musicmodel` and `audiomodel`; `stack_args`, the stack's settings of a `Config`."""

from __future__ import annotations

import keras
from keras import layers

import kernels


def recurrent_stack(
    cell: str, num_layers: int, hidden_size: int, dropout: float, fixed_length: bool = False
) -> list:
    """`num_layers` LSTM or GRU layers that return sequences and their final states.

    `fixed_length` is for short inputs of a length known when the model is built: GRU layers are
    then `FixedLengthGRU`s and LSTM layers unrolled Keras LSTMs.
    """
    if fixed_length and cell == "gru":
        return [
            kernels.FixedLengthGRU(hidden_size, dropout, name=f"gru_{i}") for i in range(num_layers)
        ]
    layer_class = {"lstm": layers.LSTM, "gru": layers.GRU}[cell]
    options = dict(return_sequences=True, return_state=True, dropout=dropout, unroll=fixed_length)
    return [layer_class(hidden_size, name=f"{cell}_{i}", **options) for i in range(num_layers)]


def saved_config(model: keras.Model, base: dict) -> dict:
    """`base` (Keras' own config) plus the constructor arguments `model.SAVED`, as attributes of
    the same names: what `keras.saving.load_model` rebuilds the model from."""
    return {**base, **{name: getattr(model, name) for name in model.SAVED}}


def run_stack(rnns: list, x, states: list, training: bool = False):
    """Runs the stacked layers. `states` has one list of state tensors per layer."""
    finals = []
    for rnn, initial in zip(rnns, states, strict=True):
        x, *final = rnn(x, initial_state=initial, training=training)
        finals.append(final)
    return x, finals


def compile_model(
    model: keras.Model,
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule,
    max_grad_norm: float,
    loss: keras.losses.Loss | None = None,
    jit_compile: bool = False,
) -> None:
    """Adam with global-norm clipping; builds the optimizer so checkpoints can restore into it.

    `loss` is for models trained by Keras' own `train_step` (`MusicModel` computes its own);
    `jit_compile` XLA-compiles the train step.
    """
    model.compile(
        optimizer=kernels.FusedAdam(learning_rate, global_clipnorm=max_grad_norm),
        loss=loss,
        jit_compile=jit_compile,
    )
    model.optimizer.build(model.trainable_variables)


def stack_args(config) -> dict:
    """The settings of the shared recurrent stack (`recurrent_stack`), as both models take them."""
    return dict(
        cell=config.cell,
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        dropout=config.dropout,
    )


def learning_rate(
    config, train_steps: int
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """--learning_rate, or with --lr_decay=linear Keras' `PolynomialDecay` of it to 0 over the
    run's `train_steps` optimizer steps: step i (from 0) of T trains at rate x (T - i) / T. The
    schedule reads the optimizer's step count, so a resumed run goes on where it stopped."""
    if config.lr_decay == "none":
        return config.learning_rate
    if train_steps < 1:
        raise ValueError(f"--lr_decay={config.lr_decay} needs the run's number of steps")
    return keras.optimizers.schedules.PolynomialDecay(config.learning_rate, train_steps, 0.0)
