"""Greedy generation in jaxfit and in transformers + PyTorch, side by side (CPU or GPU).

Run from the repository root::

    python -m experiments.bench.decode_cpu --small      # under a minute on 2 CPU cores
    python -m experiments.bench.decode_cpu --record     # adds rows to docs/BENCHMARKS.md

Both frameworks decode the SAME model from the SAME weights and prompts:

* weights: ``transformers.LlamaForCausalLM(LlamaConfig(...))`` with
  ``torch.manual_seed(seed)``, written with ``save_pretrained`` by the ``init`` worker and
  read by torch (``from_pretrained``, float32) and by jaxfit
  (``jaxfit.hf.load_pretrained``, float32 weights and compute);
* prompts: ``[batch, prompt]`` uniform random token ids (numpy, ``seed``), no padding;
* decoding: greedy, ``new`` tokens, no EOS. transformers: ``model.generate(do_sample=False,
  max_new_tokens=new, min_new_tokens=new)`` (its KV cache, eager); jaxfit:
  ``jaxfit.sampling.generate(temperature=0)`` (one jitted program: chunked prefill and a
  ``while`` loop of cached decoding steps), compiled by a first call (timed on its own).

The generated tokens must be identical, or the run fails and nothing is recorded. Rates:
``batch x new / t`` with ``t`` the median wall time of a whole call (prefill included)
over ``reps`` calls. Memory: each worker's peak RSS (:class:`~experiments.bench.procs.PeakRSS`).
The jaxfit worker also runs the two variants the user can pick, on the same prompts,
reported beside it (tokens and error against the float32 run): an int8 KV cache and NF4
weights (``quantize="nf4"``, bitsandbytes' format).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a file: make ``experiments.bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.bench import procs, report  # noqa: E402

NAME = "decode_cpu"
SECTION = "decode_cpu: greedy generation, jaxfit vs transformers"
COLUMNS = (
    *report.HEAD_COLUMNS, "config", "jax tok/s", "torch tok/s", "jax/torch", "jax compile s",
    "jax peak MiB", "torch peak MiB", "tokens equal", "jax int8-KV tok/s (tokens equal)",
    "jax NF4 tok/s", "notes",
)  # fmt: skip
# A Llama of ~40M parameters (Llama 2's vocabulary) at a CPU-sized batch.
DEFAULTS = dict(layers=4, hidden=512, heads=8, kv_heads=4, intermediate=1376, vocab=32000,
                batch=4, prompt=96, new=64, reps=3)  # fmt: skip
SMALL = dict(layers=2, hidden=128, heads=4, kv_heads=2, intermediate=344, vocab=4096,
             batch=2, prompt=24, new=16, reps=2)  # fmt: skip


def _ckpt(spec: dict) -> str:
    return str(Path(spec["workdir"]) / "ckpt")


def _prompts(spec: dict):
    import numpy as np

    rng = np.random.RandomState(spec["seed"])
    return rng.randint(0, spec["vocab"], (spec["batch"], spec["prompt"])).astype(np.int32)


def _timed(fn, reps: int) -> tuple[float, float, object]:
    """``(first call s, median of reps s, last output)``."""
    t = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return first, statistics.median(times), out


def _init_worker(spec: dict, peak, save) -> dict:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(spec["seed"])
    config = transformers.LlamaConfig(
        vocab_size=spec["vocab"], hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"], num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=4096, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(_ckpt(spec))
    return {}


def _jax_worker(spec: dict, peak, save) -> dict:
    import jax
    import numpy as np

    import jaxfit.hf as jhf
    from jaxfit import sampling

    prompts, new, reps = _prompts(spec), spec["new"], spec["reps"]
    out = {"backend": jax.default_backend(), "version": report.versions()}

    def run(model, params, **kw):
        return lambda: sampling.generate(
            model, params, prompts, max_new_tokens=new, temperature=0, **kw
        )

    model, params = jhf.load_pretrained(_ckpt(spec))
    first, median, tokens = _timed(run(model, params), reps)
    out.update(compile_s=first - median, median_s=median, tokens=np.asarray(tokens).tolist())
    out["peak_mib"] = peak.peak_kib() / procs.KIB_PER_MIB  # before the variants load
    _, median, int8 = _timed(run(model, params, kv_cache="int8"), reps)
    out.update(int8_kv_median_s=median, int8_kv_tokens=np.asarray(int8).tolist())
    qmodel, qparams = jhf.load_pretrained(_ckpt(spec), quantize="nf4")
    _, median, nf4 = _timed(run(qmodel, qparams), reps)
    out.update(nf4_median_s=median, nf4_tokens=np.asarray(nf4).tolist())
    return out


def _torch_worker(spec: dict, peak, save) -> dict:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(spec["threads"])
    model = transformers.LlamaForCausalLM.from_pretrained(_ckpt(spec), dtype=torch.float32)
    model.eval()
    ids = torch.from_numpy(_prompts(spec).astype("int64"))
    new = spec["new"]

    def run():
        with torch.no_grad():
            return model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                min_new_tokens=new, pad_token_id=0,
            )[:, ids.shape[1]:]  # fmt: skip

    _, median, tokens = _timed(run, spec["reps"])
    return {
        "median_s": median,
        "tokens": tokens.numpy().tolist(),
        "peak_mib": peak.peak_kib() / procs.KIB_PER_MIB,
        "attention": model.config._attn_implementation,
        "version": f"torch {torch.__version__}, transformers {transformers.__version__}",
    }


WORKERS = {"init": _init_worker, "jax": _jax_worker, "torch": _torch_worker}


def run(spec: dict) -> dict:
    """The three workers in turn, each in its own process; the summary."""
    with tempfile.TemporaryDirectory(prefix=f"{NAME}_") as tmp:
        spec = {**spec, "workdir": tmp}
        res = {}
        for kind in ("init", "jax", "torch"):
            procs.log(NAME, f"{kind} worker")
            res[kind] = procs.run_worker(NAME, kind, spec, Path(tmp) / "workers")
            if not res[kind]["ok"]:
                raise RuntimeError(f"{kind} worker failed: {res[kind]['error']}")
    jx, pt = res["jax"], res["torch"]
    generated = spec["batch"] * spec["new"]
    return {
        "spec": spec,
        "jax": jx,
        "torch": pt,
        "jax_tokens_per_s": generated / jx["median_s"],
        "torch_tokens_per_s": generated / pt["median_s"],
        "int8_kv_tokens_per_s": generated / jx["int8_kv_median_s"],
        "nf4_tokens_per_s": generated / jx["nf4_median_s"],
        "tokens_equal": jx["tokens"] == pt["tokens"],
        "int8_kv_tokens_equal": jx["int8_kv_tokens"] == jx["tokens"],
    }


def config_str(spec: dict) -> str:
    s = spec
    return (
        f"Llama L{s['layers']} D{s['hidden']} H{s['heads']}/{s['kv_heads']} V{s['vocab']}, "
        f"float32, batch {s['batch']} x prompt {s['prompt']} + {s['new']} greedy, "
        f"median of {s['reps']}, {s['threads']} threads"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, value in DEFAULTS.items():
        p.add_argument(f"--{name}", type=int, help=f"default {value} (--small: {SMALL[name]})")
    p.add_argument("--small", action="store_true", help="a preset of under a minute")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=report.cpu_count())
    p.add_argument("--record", action="store_true", help="append a row to docs/BENCHMARKS.md")
    p.add_argument("--note", default="")
    p.add_argument("--json", help="also write the result dict here")
    p.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        procs.worker_main(WORKERS, args.worker, args.spec, args.out)
        return 0
    spec = {**DEFAULTS, **(SMALL if args.small else {})}
    spec.update({k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None})
    spec.update(seed=args.seed, threads=min(args.threads, report.cpu_count()))
    res = run(spec)
    jx, pt = res["jax"], res["torch"]
    rows = [
        ("tokens/s", f"{res['jax_tokens_per_s']:.1f}", f"{res['torch_tokens_per_s']:.1f}",
         f"{res['jax_tokens_per_s'] / res['torch_tokens_per_s']:.2f}"),
        ("compile (s)", f"{jx['compile_s']:.1f}", "-", ""),
        ("peak RSS (MiB)", f"{jx['peak_mib']:.0f}", f"{pt['peak_mib']:.0f}",
         f"{jx['peak_mib'] / pt['peak_mib']:.2f}"),
        ("int8 KV cache tokens/s", f"{res['int8_kv_tokens_per_s']:.1f}", "-",
         f"tokens equal to float: {res['int8_kv_tokens_equal']}"),
        ("NF4 weights tokens/s", f"{res['nf4_tokens_per_s']:.1f}", "-", ""),
    ]  # fmt: skip
    print(f"{config_str(spec)}; backend {jx['backend']}; {jx['version']}; {pt['version']}")
    print(report.format_table(("", "jaxfit", "torch", "jaxfit/torch"), rows))
    print(f"greedy tokens equal: {'OK' if res['tokens_equal'] else 'MISMATCH'}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    if not res["tokens_equal"]:
        return 1
    if args.record:
        head = report.row_head(jx["backend"], (*report.JAX_PACKAGES, "torch", "transformers"))
        cells = [
            config_str(spec), f"{res['jax_tokens_per_s']:.1f}", f"{res['torch_tokens_per_s']:.1f}",
            f"{res['jax_tokens_per_s'] / res['torch_tokens_per_s']:.2f}",
            f"{jx['compile_s']:.1f}", f"{jx['peak_mib']:.0f}", f"{pt['peak_mib']:.0f}", "yes",
            f"{res['int8_kv_tokens_per_s']:.1f} ({'yes' if res['int8_kv_tokens_equal'] else 'no'})",
            f"{res['nf4_tokens_per_s']:.1f}", f"torch attention {pt['attention']}; {args.note}",
        ]  # fmt: skip
        report.record(SECTION, COLUMNS, [{**head, **dict(zip(COLUMNS[5:], cells))}])
        procs.log(NAME, f"recorded in {report.BENCHMARKS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
