"""A run's console is quiet by default: the run's own story (steps, resume, evaluation,
warnings), not the library's INFO lines (runtime settings, data and tokenizer
summaries), which ``--verbose`` adds; ``train.log`` keeps them either way."""

from __future__ import annotations

import pytest
from faultlib import train


@pytest.mark.slow
def test_library_info_lines_only_with_verbose(tmp_path):
    quiet = train(tmp_path / "quiet", total_steps=2, eval_every=2)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "INFO jaxfit.runtime" not in quiet.stderr
    assert "INFO jaxfit.data" not in quiet.stderr and "INFO jaxfit.tasks" not in quiet.stderr
    assert "compiled the train step in" in quiet.stderr  # the run's own lines stay
    # stderr is a pipe: the progress is plain lines, no bar redrawn after every message
    assert "\r" not in quiet.stderr and "%|" not in quiet.stderr
    assert "step 2/2 (100%): " in quiet.stderr
    log = (tmp_path / "quiet" / "train.log").read_text()
    assert "\r" not in log and "%|" not in log and "step 2/2" not in log
    assert "INFO jaxfit.data.text.tokenizer: trained byte-level BPE" in log

    verbose = train(tmp_path / "verbose", "--verbose", total_steps=2, eval_every=2)
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "INFO jaxfit.runtime: compilation cache" in verbose.stderr
    assert "INFO jaxfit.data.text.tokenizer: trained byte-level BPE" in verbose.stderr

    resumed = train(tmp_path / "quiet", total_steps=3, eval_every=3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "INFO jaxfit.trainer: resuming from checkpoint at step 2" in resumed.stderr
