"""Training: optimizer and schedule, the sharded TrainState, and the functional train step."""
from meteor_jax.train.optim import FROZEN, TRAINED, make_optimizer, make_schedule, trainable_labels
from meteor_jax.train.state import (
    TrainState, abstract_train_state, create_train_state, opt_state_shardings, train_state_from_params, with_shardings,
)
from meteor_jax.train.step import make_eval_step, make_train_step

__all__ = [
    "FROZEN", "TRAINED", "TrainState", "abstract_train_state", "create_train_state", "make_eval_step",
    "make_optimizer", "make_schedule", "make_train_step", "opt_state_shardings", "train_state_from_params",
    "trainable_labels", "with_shardings",
]
