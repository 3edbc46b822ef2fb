"""The planned peaks jaxfit publishes (docs/memory_records.json) hold: each headline
config re-planned here lands within 2% of its record, and the record is what
docs/BENCHMARKS.md quotes (the README and the guides of docs/ link there). A change that
costs (or saves) memory fails until the record says why (``python -m
experiments.memory_records --write``)."""

from __future__ import annotations

from pathlib import Path

import jax
import pytest

from experiments import memory_records

REPO = Path(__file__).resolve().parents[2]
RECORDS = memory_records.load()


def test_every_record_names_a_config_a_value_and_a_reason():
    names = [r["name"] for r in RECORDS]
    assert len(names) == len(set(names))
    assert {"llama3_8b_qlora_2048", "llama3_8b_qlora_32k", "gpt2_124m_b16x1024",
            "clip_coco"} <= set(names)  # fmt: skip
    for r in RECORDS:
        assert (REPO / r["config"]).is_file(), r["config"]
        assert r["peak_bytes"] > 2**30 and len(r["reason"]) > 80, r["name"]
        assert r["peak_gib"] == round(r["peak_bytes"] / 2**30, 2)
        assert r["commit"] and r["date"] and r["backend"] == "cpu"


def test_the_published_figures_are_the_records():
    benchmarks = (REPO / "docs" / "BENCHMARKS.md").read_text()
    for r in RECORDS:
        assert f"{r['peak_gib']:.2f} GiB" in benchmarks, (r["name"], r["peak_gib"])


def test_compare_flags_a_move_past_the_tolerance_either_way():
    entry = {"peak_bytes": 1000}
    change, ok = memory_records.compare(entry, 1019)
    assert change == pytest.approx(0.019) and ok
    assert not memory_records.compare(entry, 1021)[1]
    assert not memory_records.compare(entry, 979)[1]


@pytest.mark.slow
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the records are CPU estimates")
@pytest.mark.parametrize("entry", RECORDS, ids=[r["name"] for r in RECORDS])
def test_the_planned_peak_matches_its_record(entry):
    planned = memory_records.plan_peak(entry)
    change, ok = memory_records.compare(entry, planned)
    assert ok, (
        f"{entry['name']}: planned {planned / 2**30:.2f} GiB, recorded "
        f"{entry['peak_bytes'] / 2**30:.2f} GiB ({change:+.1%}; recorded because: "
        f"{entry['reason']}). If the change is deliberate, run `python -m "
        "experiments.memory_records --write`, say why in the entry's reason and update "
        "the docs/BENCHMARKS.md figures."
    )
