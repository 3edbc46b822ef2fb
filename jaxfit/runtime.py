"""Process-wide settings jaxfit applies before its first compilation: the persistent
compilation cache and XLA flag defaults. :func:`configure_runtime` is called first thing
by the CLIs (``jaxfit.train``); library users may call it themselves.

Compilation cache (on by default): jax writes each compiled program to
``jax_compilation_cache_dir`` and reads it back in a later process that compiles the
same program (same HLO, jax/jaxlib version, device and flags), so a resumed or repeated
run skips the compilation (50-60 s for the Llama-3-8B QLoRA step on a GPU, issue 11). jax
stores only programs whose compilation took at least ``jax_persistent_cache_min_compile_
time_secs`` (jax's default, 1 s). The directory is, first match wins:

1. ``JAXFIT_COMPILATION_CACHE``: a directory, or empty to turn the cache off;
2. jax's own ``JAX_COMPILATION_CACHE_DIR`` (or a directory already set in
   ``jax.config`` by the program), kept as it is;
3. ``~/.cache/jaxfit/xla``.

XLA flags (:data:`XLA_FLAG_DEFAULTS`) are added to ``XLA_FLAGS`` unless the user's
``XLA_FLAGS`` already names the flag; XLA reads them when the backend starts, so they
apply only if set before jaxfit's first computation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from pathlib import Path

import jax

log = logging.getLogger(__name__)

ENV_CACHE = "JAXFIT_COMPILATION_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/jaxfit/xla")

# XLA flags jaxfit sets, with why; each documented in jax's "GPU performance tips"
# (docs.jax.dev/en/latest/gpu_performance_tips.html) and NVIDIA's JAX-Toolbox, which sets
# the same default in its containers (docs.nvidia.com/jax-toolbox/environment-variables).
XLA_FLAG_DEFAULTS = {
    # Schedule collectives (all-reduce, all-gather, reduce-scatter) to overlap compute:
    # helps data/FSDP-sharded steps on several GPUs; no effect on one GPU or a CPU.
    "--xla_gpu_enable_latency_hiding_scheduler": "true",
}


def xla_flags(user_flags: str) -> str:
    """``user_flags`` (``XLA_FLAGS``) with every :data:`XLA_FLAG_DEFAULTS` entry the user
    did not set appended (the user's value of a flag always wins)."""
    named = {f.split("=", 1)[0] for f in user_flags.split()}
    extra = [f"{k}={v}" for k, v in XLA_FLAG_DEFAULTS.items() if k not in named]
    return " ".join([user_flags.strip(), *extra]).strip()


def compilation_cache_dir(environ: MutableMapping[str, str] | None = None) -> str | None:
    """The persistent compilation cache directory :func:`configure_runtime` uses (see the
    module docstring for the order), ``None`` when it is off."""
    environ = os.environ if environ is None else environ
    if ENV_CACHE in environ:
        value = environ[ENV_CACHE].strip()
        return str(Path(value).expanduser()) if value else None
    current = jax.config.jax_compilation_cache_dir or environ.get("JAX_COMPILATION_CACHE_DIR")
    return current or str(DEFAULT_CACHE_DIR.expanduser())


def configure_runtime(environ: MutableMapping[str, str] | None = None) -> dict[str, str | None]:
    """Turn on the persistent compilation cache and set jaxfit's XLA flag defaults.

    Idempotent; call it before the first jax computation of the process.

    Args:
      environ: the environment to read and update (default ``os.environ``).

    Returns:
      ``{"compilation_cache": directory or None, "xla_flags": XLA_FLAGS}`` as set.
    """
    environ = os.environ if environ is None else environ
    flags = xla_flags(environ.get("XLA_FLAGS", ""))
    if flags:
        environ["XLA_FLAGS"] = flags
    cache = compilation_cache_dir(environ)
    if cache != jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache)
    if cache:
        Path(cache).mkdir(parents=True, exist_ok=True)
    log.info("compilation cache: %s; XLA_FLAGS: %s", cache or "off", flags or "(none)")
    return {"compilation_cache": cache, "xla_flags": flags}
