"""Fixtures shared by the model tests."""

import functools

import pytest


@pytest.fixture(scope="module")
def run(jit_fast):
    """``run(model, params, *args, method=None)``: jitted ``model.apply``, one compile per
    (model, method, shapes) for the whole module (``jit_fast`` from ``tests/conftest.py``)."""

    @functools.partial(jit_fast, static_argnums=0, static_argnames="method")
    def apply(model, params, *args, method=None):
        return model.apply({"params": params}, *args, method=method)

    return apply
