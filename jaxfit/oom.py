"""Out-of-memory errors: recognising XLA's, and saying which levers are left to pull.

Low in the package so the trainer (which catches the error in the first step) and the
planner (which names the same levers) both use it without importing each other.
"""

from __future__ import annotations

from jaxfit.config import Precision, get_field
from jaxfit.errors import Error


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is XLA's out-of-memory (``RESOURCE_EXHAUSTED``)."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text


def oom_advice(config, precision: Precision) -> list[str]:
    """What to change after an out-of-memory error, cheapest in speed first: the levers
    the resolved ``config`` (with its :class:`~jaxfit.config.Precision`, from the run's
    ``jaxfit.tasks.RunSpec``) does not already pull."""
    out = []
    mb = get_field(config, "micro_batch_size")
    if mb and mb > 1:
        out.append(
            f"--config.micro_batch_size={max(mb // 2, 1)} (accumulation keeps the "
            f"effective batch of {config.batch_size})"
        )
    if get_field(config, "model.remat_policy") not in (None, "full"):
        out.append("--config.model.remat_policy=full (recompute activations)")
    if get_field(config, "loss_chunk_size") == 0:
        out.append("--config.loss_chunk_size=1024 (LM head + loss in chunks of tokens)")
    if not precision.quantised:
        out.append("--config.precision=nf4 (QLoRA: a frozen NF4 base + LoRA adapters)")
    if get_field(config, "optim.name") == "adamw":
        out.append("--config.optim.name=adamw8bit (8-bit optimizer moments)")
    return out


class OutOfMemoryError(Error, RuntimeError):
    """The device ran out of memory compiling or running the first step; the message
    says what to change. No checkpoint was written by the failed step (exit status 3)."""

    exit_code = 3

    @classmethod
    def from_config(
        cls, config, precision: Precision, error: BaseException, where: str
    ) -> OutOfMemoryError:
        """The error for ``error`` raised during ``where`` ("the first step") of the run
        of the resolved ``config`` and its ``precision``, with :func:`oom_advice`."""
        device = get_field(config, "device") or "rtx4070ti"
        first = str(error).strip().splitlines()[0][:300]
        advice = "\n".join(f"  - {a}" for a in oom_advice(config, precision)) or "  (none left)"
        return cls(
            f"out of device memory during {where}: {first}\n"
            f"Options (each alone may suffice):\n{advice}\n"
            f"Or let the planner choose: python -m jaxfit.plan --config <this config> "
            f"--device {device} --search --apply <workdir>, or "
            f"--config.fit_budget=<card memory, e.g. 12GiB>."
        )
