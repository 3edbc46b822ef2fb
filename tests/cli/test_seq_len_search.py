"""``jaxfit.plan --search_seq_len`` probes only lengths where its estimate is valid (the CPU
stand-in's chunked attention falls back to full attention off multiples of its chunk) and
reports them sorted."""

from pathlib import Path

import jax
import ml_collections
import pytest

from jaxfit.models.attention import ATTENTION_CHUNK
from jaxfit.plan import search

REPO = Path(__file__).resolve().parents[2]


class _Plan:
    def __init__(self, peak):
        self.peak_bytes = peak


def _fake_try(peak_of):
    tried = []

    def fake(config, overrides, usable, progress):
        n = overrides["seq_len"]
        tried.append(n)
        plan = _Plan(peak_of(n))
        return search.Candidate(dict(overrides), plan, plan.peak_bytes <= usable)

    return fake, tried


@pytest.mark.parametrize("start", [1024, 1536, 2048, 3000])
def test_only_valid_lengths_are_probed(monkeypatch, start):
    monkeypatch.setattr(search, "seq_len_step", lambda config: ATTENTION_CHUNK)
    fake, tried = _fake_try(lambda n: n)  # peak grows with the length
    monkeypatch.setattr(search, "_try", fake)
    config = ml_collections.ConfigDict({"task": "lm", "seq_len": start})
    rows = search.search_seq_len(config, usable_bytes=5000, max_seq_len=16384, progress=print)
    assert all(n % ATTENTION_CHUNK == 0 for n in tried), tried
    lengths = [r.overrides["seq_len"] for r in rows]
    assert lengths == sorted(lengths)
    assert max(r.overrides["seq_len"] for r in rows if r.fits) == 4608  # 9 x 512 <= 5000
    assert 5120 in lengths  # the shortest valid length that does not fit was tried


def test_short_lengths_step_by_128_below_one_chunk(monkeypatch):
    monkeypatch.setattr(search, "seq_len_step", lambda config: ATTENTION_CHUNK)
    fake, tried = _fake_try(lambda n: n)
    monkeypatch.setattr(search, "_try", fake)
    config = ml_collections.ConfigDict({"task": "lm", "seq_len": 256})
    rows = search.search_seq_len(config, usable_bytes=400, progress=print)
    assert max(r.overrides["seq_len"] for r in rows if r.fits) == 384
    assert all(search.valid_seq_len(n, ATTENTION_CHUNK) for n in tried)


def test_valid_lengths():
    assert search.valid_seq_len(384, 512) and search.valid_seq_len(2048, 512)
    assert not search.valid_seq_len(2688, 512) and not search.valid_seq_len(768, 512)
    assert search.valid_seq_len(2688, None)


def test_the_stand_in_decides_the_chunk():
    from jaxfit import config as config_lib

    gpt2 = config_lib.load_config(str(REPO / "configs" / "gpt2_scratch.py"))
    on_cpu = jax.default_backend() == "cpu"  # a GPU plans its own attention: any length
    assert search.seq_len_step(gpt2) == (ATTENTION_CHUNK if on_cpu else None)
    xla = config_lib.load_config(str(REPO / "configs" / "gpt2_scratch.py"))
    with xla.unlocked():
        xla.model.attention_impl = "xla"
    assert search.seq_len_step(xla) is None
