"""``python -m jaxfit.train`` whose train step takes ``JAXFIT_TEST_SLOW_STEP`` seconds
more from the second step on, spent inside the compiled step (a ``pure_callback`` that
sleeps): the host waits for it in XLA, as it waits for a step that takes minutes, where
Python runs no signal handler until the step ends. For the signal tests."""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxfit import run, train

SLOW = float(os.environ.get("JAXFIT_TEST_SLOW_STEP", "20"))
_real = run.jit_train_step


def _sleep(step, loss):
    if int(step) >= 1:  # the first step stays fast
        time.sleep(SLOW)
    return np.asarray(loss, np.float32)


def slow_jit_train_step(*args, **kwargs):
    step_fn = _real(*args, **kwargs)

    def slow(state, batch, frozen):
        number = state.step
        state, metrics = step_fn(state, batch, frozen)
        loss = jax.pure_callback(
            _sleep, jax.ShapeDtypeStruct((), jnp.float32), number, metrics["loss"]
        )
        return state, {**metrics, "loss": loss}

    return jax.jit(slow, donate_argnums=0)


run.jit_train_step = slow_jit_train_step  # build_run's step

if __name__ == "__main__":
    sys.exit(train.main(["python -m jaxfit.train", *sys.argv[1:]]))
