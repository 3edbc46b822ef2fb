"""The machine a program is compiled for, which need not be the machine compiling it.

jaxfit makes a few choices by the machine that will RUN a step: the attention
implementation (cuDNN needs a GPU of compute capability >= 8.0), the ``offload`` remat
policy (pinned host memory exists on a GPU/TPU), and the devices a mesh is built on. By
default that machine is this one (``jax.default_backend()``, ``jax.devices()``). The
planner can compile for another one, e.g. an RTX 4070 Ti as a deviceless XLA:GPU target
on a CPU-only machine (``python -m jaxfit.plan --compile_for gpu``): inside
:func:`compiling_for`, every such choice reads the :class:`Target` instead. Code that
asks about the machine that runs a program calls :func:`backend`,
:func:`compute_capability` and :func:`devices` here, never ``jax.default_backend()``.

The setting is a ``contextvars.ContextVar``: it holds for the thread (and task) that
entered it, which is the one tracing and compiling.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Sequence

import jax


@dataclasses.dataclass(frozen=True)
class Target:
    """A machine to compile for.

    Attributes:
      backend: jax's name of its platform: ``"gpu"``, ``"cpu"`` or ``"tpu"``.
      devices: the target's devices (e.g. ``jax.experimental.topologies`` devices of a
        deviceless CUDA topology); meshes are built on them.
      compute_capability: a GPU's, ``"8.9"`` for an RTX 4070 Ti; ``None`` otherwise.
      description: how reports name it, e.g. ``"cuda (deviceless, rtx4070ti)"``.
      caveats: what a compile for it does not see, one sentence (reports print it).
    """

    backend: str
    devices: tuple = ()
    compute_capability: str | None = None
    description: str = ""
    caveats: str = ""


_TARGET: contextvars.ContextVar[Target | None] = contextvars.ContextVar(
    "jaxfit_target", default=None
)


@contextlib.contextmanager
def compiling_for(target: Target) -> Iterator[Target]:
    """Inside, :func:`backend`, :func:`compute_capability` and :func:`devices` answer for
    ``target`` instead of this machine."""
    token = _TARGET.set(target)
    try:
        yield target
    finally:
        _TARGET.reset(token)


def current() -> Target | None:
    """The target set by :func:`compiling_for`, or ``None`` (this machine)."""
    return _TARGET.get()


def backend() -> str:
    """The backend of the machine that will run what is compiled now: the target's, else
    ``jax.default_backend()`` (``"cpu"``, ``"gpu"``, ``"tpu"``)."""
    t = _TARGET.get()
    return t.backend if t is not None else jax.default_backend()


def compute_capability() -> str | None:
    """The compute capability of the GPU that will run it (``"8.9"`` for an RTX 4070 Ti):
    the target's, else this machine's first GPU's; ``None`` without a GPU."""
    t = _TARGET.get()
    if t is not None:
        return t.compute_capability
    try:
        found = jax.devices("gpu")
    except RuntimeError:
        return None
    return getattr(found[0], "compute_capability", None) if found else None


def devices() -> Sequence[jax.Device]:
    """The devices a mesh is built on: the target's, else ``jax.devices()`` (every
    process's)."""
    t = _TARGET.get()
    return list(t.devices) if t is not None and t.devices else jax.devices()


def device_count() -> int:
    """``len(devices())``."""
    return len(devices())


def description() -> str:
    """How a report names the backend: the target's description, else
    ``jax.default_backend()``."""
    t = _TARGET.get()
    return (t.description or t.backend) if t is not None else jax.default_backend()
