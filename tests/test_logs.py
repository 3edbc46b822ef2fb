"""jaxfit's INFO messages reach the console and train.log whatever absl/orbax did first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import logging, sys
import orbax.checkpoint  # absl: a root handler at WARNING before jaxfit configures anything
from absl import logging as absl_logging
absl_logging.use_absl_handler()
logging.basicConfig(level=logging.WARNING)
from jaxfit import logs
logs.setup()
log = logging.getLogger("jaxfit.trainer")
log.info("resuming from checkpoint at step 7")
with logs.log_to_file(sys.argv[1]):
    log.info("into the file too")
    logging.getLogger("jax._src.xla_bridge").info("library chatter")
    logging.getLogger("orbax").warning("a library warning")
log.debug("not shown")
"""


def test_info_reaches_console_and_file_after_absl(tmp_path):
    log_file = tmp_path / "train.log"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(log_file)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "INFO jaxfit.trainer: resuming from checkpoint at step 7" in done.stderr
    assert "into the file too" in done.stderr and "not shown" not in done.stderr
    assert done.stderr.count("resuming from checkpoint") == 1  # no second (root) copy
    text = log_file.read_text()
    assert "INFO jaxfit.trainer: into the file too" in text
    assert "a library warning" in text and "library chatter" not in text
    assert "resuming from checkpoint" not in text  # logged before the file was attached
