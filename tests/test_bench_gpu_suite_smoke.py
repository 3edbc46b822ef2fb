"""Smoke test of ``experiments/bench/gpu_suite.py`` at its ``--small`` size on a CPU, and unit
tests of its pieces that a GPU run depends on but a CPU cannot exercise (the search for the
longest sequence, the recorded rows) and of the memory-light random quantised init.

Not a timing test: the suite's numbers on a CPU mean nothing; they must only be there.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from xla_env import fast_subprocess_env

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # ``experiments`` is not installed (plain ``pytest``)
    sys.path.insert(0, str(REPO))

from experiments.bench import gpu_common, gpu_suite, report, seq_search  # noqa: E402
from jaxfit import perf, quant  # noqa: E402
from jaxfit.hf.families import DEFAULT_QUANT_RULES as RULES  # noqa: E402
from jaxfit.models import llama  # noqa: E402
from jaxfit.quant import random_init  # noqa: E402


def _positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_gpu_suite_small(tmp_path):
    out = tmp_path / "result.json"
    before = (REPO / "docs" / "BENCHMARKS.md").read_text()
    env = fast_subprocess_env()
    # Runs longer than 64 tokens "run out of memory" (before compiling): the search then
    # re-tries the first failure in a fresh process, as it would on a GPU.
    cmd = [sys.executable, "-m", "experiments.bench.gpu_suite", "--small", "--json", str(out)]
    proc = subprocess.run(
        [*cmd, "--simulate_oom_seq", "64", "--record"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    parts = res["parts"]
    assert set(parts) == set(gpu_suite.PARTS)
    assert all(p["ok"] for p in parts.values()), {k: p.get("error") for k, p in parts.items()}
    rows = {}
    for r in res["rows"]:
        rows.setdefault(r["benchmark"], []).append(r["raw"])
    assert set(rows) == {"matmul", "gpt2", "clip", "decode", "qlora", "qlora longest B1"}
    assert all(r["step_s"] is not None for rs in rows.values() for r in rs), rows

    assert _positive(parts["matmul"]["tflops"])
    (gpt2,) = parts["gpt2"]["measurements"]
    for key in ("tokens_per_s", "step_s", "peak_mib", "model_tflops", "compile_s",
                "planned_peak_mib"):  # fmt: skip
        assert _positive(gpt2[key]), (key, gpt2[key])
    assert gpt2["mfu"] is None  # a CPU is not in jaxfit.perf.DEVICES
    assert all(math.isfinite(x) for x in gpt2["losses"])
    # CLIP: the config's micro-batch (4), then the planner's best (the whole batch of 8)
    clip = rows["clip"]
    assert len(clip) == 2 and parts["clip"]["search"]["best"] == 8
    for r in clip:
        for key in ("throughput", "step_s", "peak_mib", "planned_mib", "compile_s"):
            assert _positive(r[key]), (key, r[key])
    (decode,) = parts["decode"]["measurements"]
    assert _positive(decode["tokens_per_s"]) and decode["read_bytes"] > 0

    q = parts["qlora"]["ranks"]
    assert set(q) == {"4", "8"}
    first, micro, longer = q["4"]["items"]
    assert (first["batch"], first["seq"], first["timed"], first["fit"]) == (1, 64, True, True)
    assert micro["batch"] == 8 and micro["fit"]  # configs/llama_qlora.py:demo micro-batch
    for it in (first, micro):
        for key in ("tokens_per_s", "step_s", "peak_mib", "model_tflops", "planned_peak_mib"):
            assert _positive(it[key]), (key, it[key])
        assert all(math.isfinite(x) for x in it["losses"])
    assert (longer["seq"], longer["fit"]) == (128, False)
    assert "RESOURCE_EXHAUSTED" in longer["error"]
    for rank in ("4", "8"):
        s = q[rank]["search"]
        assert (s["longest"], s["first_failure"], s["failure_confirmed"]) == (64, 128, True)
        assert s["fresh_processes"] == [[128]]  # the re-try, in a fresh process
        assert q[rank]["fresh"][0]["items"][0]["first_in_process"]
    assert "nf4" in q["4"]["frozen_mib"]

    for title in ("matmul ", "gpt2 ", "clip ", "decode ", "qlora "):
        assert title in proc.stdout
    assert "longest sequence at batch 1: 64; 128 did not fit" in proc.stdout
    assert "not recorded" in proc.stderr
    assert (REPO / "docs" / "BENCHMARKS.md").read_text() == before  # nothing recorded


def _tiny_llama(param_dtype=jnp.float32):
    cfg = llama.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        param_dtype=param_dtype,
    )
    return llama.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_random_quantized_params_matches_quantize_params(method, monkeypatch):
    model = _tiny_llama()
    ids = jnp.zeros((1, 8), jnp.int32)
    key = jax.random.key(0)
    ref = quant.quantize_params(model.init(key, ids)["params"], RULES, method)
    abstract = jax.eval_shape(model.init, key, ids)["params"]

    drawn = []
    draw = random_init._draw_layer

    def watch(k, shape, dtype, stddev):
        drawn.append(tuple(shape))
        return draw(k, shape, dtype, stddev)

    monkeypatch.setattr(random_init, "_draw_layer", watch)
    got = random_init.random_quantized_params(abstract, jax.random.key(1), RULES, method)

    shapes = lambda t: jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), t)
    assert jax.tree.structure(got) == jax.tree.structure(ref)  # static fields included
    assert shapes(got) == shapes(ref)
    # One layer at a time: every float kernel drawn is 2-D, one per layer of each of the 7
    # stacked kernels, plus the embedding and the LM head; never a stacked [L, in, out].
    assert all(len(s) == 2 for s in drawn)
    assert len(drawn) == 7 * 3 + 2
    assert (64, 128) in drawn and (3, 64, 128) not in drawn
    qleaves = [x for x in jax.tree.leaves(got, is_leaf=quant.is_quantized)]
    assert sum(quant.is_quantized(x) for x in qleaves) == 7
    assert jnp.all(got["layers"]["input_layernorm"]["scale"] == 1)  # norm gains: ones
    logits = model.apply({"params": got}, ids)
    assert logits.shape == (1, 8, 256) and bool(jnp.isfinite(logits).all())


def test_random_quantized_params_chunked_float_leaves():
    """A float leaf larger than ``chunk_bytes`` is filled a few rows at a time."""
    model = _tiny_llama(param_dtype=jnp.bfloat16)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    got = random_init.random_quantized_params(
        abstract["params"], jax.random.key(0), RULES, chunk_bytes=10 * 64 * 4
    )
    emb = got["embed_tokens"]["embedding"]
    assert emb.shape == (256, 64) and emb.dtype == jnp.bfloat16
    rows = jnp.std(emb.astype(jnp.float32), axis=1)
    assert bool(jnp.all(rows > 0.01)) and bool(jnp.all(rows < 0.04))  # every row drawn
    assert got["layers"]["mlp"]["up_proj"]["kernel"].dtype == "bfloat16"


class FakeDevice:
    """A device for the search: ``seq <= capacity`` fits in a fresh process, only ``seq <=
    fragmented`` after earlier runs of the same process; XLA foresees (``predicted``) the
    failure of ``seq > foreseen`` from its buffer sizes without running it."""

    def __init__(self, capacity, fragmented=None, foreseen=10**9):
        self.capacity, self.fragmented, self.foreseen = capacity, fragmented, foreseen

    def process(self, prior, timed=(2048,), *, max_seq=131072, step=1024, budget=10**9):
        """A worker: the timed batch-1 runs, then its own in-process search."""
        items, n = [], [0]

        def attempt(seq):
            first = n[0] == 0
            n[0] += 1
            rec = {"batch": 1, "seq": seq, "first_in_process": first}
            if seq > self.foreseen:
                rec.update(fit=False, predicted=True)
            else:
                limit = self.capacity if first or self.fragmented is None else self.fragmented
                rec["fit"] = seq <= limit
            rec["trusted"] = rec["fit"] is False and (first or "predicted" in rec)
            items.append(rec)
            return rec

        for seq in timed:
            if attempt(seq)["fit"] is False and not items[-1].get("predicted"):
                return items, "out of memory"
        left = iter(range(budget, -1, -1))
        stopped = seq_search.inprocess_search(
            prior, items, attempt, lambda: next(left) > 0, max_seq=max_seq, step=step
        )
        return items, stopped


def _search(dev, *, fresh_budget=10**9, max_seq=131072, step=1024, timed=(2048,)):
    first, _ = dev.process([], timed, max_seq=max_seq, step=step)
    budget = iter(range(fresh_budget, -1, -1))

    def run_fresh(prior):
        return dev.process(prior, (), max_seq=max_seq, step=step)[0]

    return first, seq_search.continue_search(
        first, run_fresh, lambda: next(budget) > 0, max_seq=max_seq, step=step
    )


def test_search_foreseen_failures_stay_in_process():
    # XLA foresees 8192 and up; 6144 really runs out of memory (after other runs, so it
    # is re-tried alone in a fresh process); 5120 fits.
    first, s = _search(FakeDevice(capacity=6000, foreseen=7000))
    assert [(r["seq"], r["fit"]) for r in first] == [
        (2048, True), (4096, True), (8192, False), (6144, False)
    ]  # fmt: skip
    assert first[2]["trusted"] and not first[3]["trusted"]
    assert s["fresh_processes"] == [[6144], [5120]]
    assert (s["longest"], s["first_failure"], s["failure_confirmed"]) == (5120, 6144, True)
    assert s["stopped"] is None


def test_search_fragmentation_and_budget():
    # 8192 failed in the first process only because of earlier runs: fresh, it fits.
    _, s = _search(FakeDevice(capacity=12000, fragmented=4096), fresh_budget=2)
    assert s["fresh_processes"] == [[8192, 16384], [16384]]
    assert (s["longest"], s["first_failure"], s["failure_confirmed"]) == (8192, 16384, True)
    assert s["stopped"] == "time budget"


def test_search_everything_fits_and_nothing_fits():
    first, s = _search(FakeDevice(capacity=10**9), max_seq=8192)
    assert [r["seq"] for r in first] == [2048, 4096, 8192] and s["fresh_processes"] == []
    assert (s["longest"], s["first_failure"], s["stopped"]) == (8192, None, None)
    # Even the first length is foreseen not to fit: bisect below it, in the same process.
    first, s = _search(FakeDevice(capacity=1500, foreseen=1500), step=256)
    assert [r["seq"] for r in first] == [2048, 1024, 1536, 1280]
    assert (s["longest"], s["first_failure"], s["fresh_processes"]) == (1280, 1536, [])


def test_next_seqs():
    state = lambda lo, hi, trusted=True: dict(longest=lo, first_failure=hi, trusted=trusted)
    assert seq_search.next_seqs(state(2048, None), max_seq=10000, step=1024) == [4096, 8192]
    assert seq_search.next_seqs(state(8192, None), max_seq=10000, step=1024) is None
    assert seq_search.next_seqs(state(2048, 8192, False), max_seq=10**5, step=1024) == [8192]
    assert seq_search.next_seqs(state(2048, 8192), max_seq=10**5, step=1024) == [5120]
    assert seq_search.next_seqs(state(4096, 5120), max_seq=10**5, step=1024) is None


def test_bandwidth_table_covers_the_devices():
    """Every device has its memory bandwidth (the decode bound of gpu_decode and of
    ``jaxfit.plan --generate``); GeForce: data rate x bus width / 8."""
    assert all(d.memory_gbs > 100 for d in perf.DEVICES.values())
    assert perf.device("rtx4070ti").memory_gbs == pytest.approx(21 * 192 / 8, rel=0.001)
    assert perf.device("rtx4090").memory_gbs == pytest.approx(21 * 384 / 8)


def test_record_rows(tmp_path):
    """The rows a GPU run would append (a fabricated result: a CPU cannot make one)."""
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n")
    gpu = dict(backend="gpu", device="NVIDIA H200", device_label="h200", ok=True)
    mm = dict(
        config="bf16 8192^3",
        step_s=0.0016,
        examples_per_s=690.0,
        model_tflops=690.0,
        mfu=0.697,
        compile_s=0.5,
        peak_mib=300.0,
    )
    gpt2 = dict(
        config="GPT-2 ...",
        step_s=0.05,
        tokens_per_s=327680.0,
        model_tflops=250.0,
        mfu=0.25,
        peak_mib=10000.0,
        planned_peak_mib=9000.0,
        compile_s=20.0,
    )
    oom = dict(config="Llama ...", fit=False, error="RESOURCE_EXHAUSTED: out of memory")
    res = {"cap_note": "cap 12 GiB", "parts": {
        "matmul": dict(gpu, tflops=690.0, rows=[gpu_common.raw_row("matmul", mm, "TFLOP/s")]),
        "gpt2": dict(gpu, rows=[gpu_common.raw_row("gpt2", gpt2)]),
        "qlora": dict(ok=False, rows=[gpu_common.raw_row("qlora", oom, notes="r16")]),
        "clip": dict(ok=False, rows=[gpu_common.error_row("clip", "exit status 1")]),
    }}  # fmt: skip
    rows = gpu_suite.formatted_rows(res)
    assert report.record(gpu_suite.SECTION, gpu_common.COLUMNS, rows, path=md) == 4
    text = md.read_text()
    assert f"## {gpu_suite.SECTION}" in text
    lines = [line for line in text.splitlines() if "| gpu (NVIDIA H200) |" in line]
    assert len(lines) == 4
    assert all(r.count(" | ") == len(gpu_common.COLUMNS) - 1 for r in lines)
    assert "690.0 TFLOP/s" in lines[0] and "69.7% of h200" in lines[0]
    assert "327,680.0 tok/s" in lines[1] and "36.2%" in lines[1]  # 250 / 690
    assert "10,000 (9,000)" in lines[1] and "cap 12 GiB" in lines[1]
    assert "RESOURCE_EXHAUSTED" in lines[2] and "exit status 1" in lines[3]
