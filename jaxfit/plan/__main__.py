"""Will it fit, and how long will it take? ``python -m jaxfit.plan --config CONFIG[:ARG]``.

  python -m jaxfit.plan --config configs/llama3_8b_qlora.py --device rtx4070ti
  python -m jaxfit.plan --config configs/llama3_8b_qlora.py --budget 12GiB --search \\
      --apply runs/llama3_8b          # then: python -m jaxfit.train ... --workdir runs/llama3_8b
  python -m jaxfit.plan --config configs/llama3_8b_qlora.py --search_seq_len
  python -m jaxfit.plan --config configs/nanochat_d32.py --device rtx4070 --tokens 38e9
  python -m jaxfit.plan --config configs/llama_finetune.py --device h100-sxm --devices 8 \\
      --mesh fsdp=8    # per-device memory and communication of an FSDP run on 8 cards
  python -m jaxfit.plan --config configs/llama3_8b_qlora.py --device rtx4070ti \\
      --compile_for gpu   # XLA:GPU's own peak for the card, on a machine without a GPU
  python -m jaxfit.plan --generate --model llama3-8b --quant nf4 --context 8192
      # generation: weights + KV cache + activations, decode / prefill tokens/s
      # (jaxfit.plan.generation; --generate --help lists its flags)

Builds the config's model and train step for abstract shapes (no data read, no weights
loaded, no device memory used), compiles the step on the local backend and prints the
parameter counts, the bytes by category, the compiled peak against the budget, and a time
estimate. ``--config.x=y`` overrides work as in ``jaxfit.train``. Flags:

* ``--device NAME``: the card to plan for (``jaxfit.perf.DEVICES``; default the config's
  ``device``): its memory is the default budget, its peak bf16 rate the time's basis.
* ``--budget 12GiB`` / ``--reserve 1GiB``: memory budget and what to keep free of it
  (default 512 MiB + 5%: CUDA context, library workspaces, fragmentation).
* ``--compile_for gpu``: compile for the CUDA card ``--device`` names as a deviceless
  XLA:GPU target (``jaxfit.plan.cuda_target``; needs ``pip install -r
  requirements-plan-gpu.txt``, no GPU): the planned peak is XLA:GPU's, with cuDNN
  attention and pinned-host offload as on the card. Not a measurement: cuDNN's workspace
  is not counted and GEMM backends are not autotuned. ``local`` (default): this machine's
  backend; on a CPU the GPU peak is estimated from XLA:CPU's program.
* ``--devices N`` / ``--mesh data=2,fsdp=4``: plan for a mesh of N devices (compiled as
  an SPMD program on N host CPU devices, or a ``1x1xN`` CUDA topology with
  ``--compile_for gpu``, so every byte is per device) and report the communication of
  one step; ``--mesh`` sets ``config.mesh``.
* ``--search``: try micro-batch x remat policy x CE chunk size (``--micro_batch_sizes``,
  ``--remat_policies``, ``--loss_chunk_sizes`` narrow it; ``--max_compiles`` bounds it)
  and print what fits, fastest first. ``--search_seq_len``: the longest ``seq_len`` that
  fits. ``--apply WORKDIR``: write the best to ``WORKDIR/plan.json`` for ``jaxfit.train``.
* ``--mfu 0.4``: assumed fraction of peak sustained on the executed FLOPs;
  ``--tokens N``: a token budget to time; ``--dataset_tokens`` / ``--dataset_examples``:
  an epoch to time. ``--json PATH``: everything as JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
import time

from jaxfit import cli, perf, sampling, target, validation
from jaxfit import config as config_lib
from jaxfit.errors import UsageError
from jaxfit.hf import architectures
from jaxfit.plan import apply, core, cuda_target, devices, estimate, generation, report, search

PROG = "python -m jaxfit.plan"

FLAGS = {
    "device": "Card to plan for (jaxfit.perf.DEVICES); default: the config's `device`.",
    "budget": "Device memory budget, e.g. 12GiB (default: the device's memory).",
    "reserve": "Memory kept free of the budget (default 512MiB + 5% of the budget).",
    "mfu": "Assumed fraction of peak on executed FLOPs (default 0.4).",
    "tokens": "Token budget to estimate the time of, e.g. 38e9.",
    "dataset_tokens": "Tokens in one epoch of the data (for the epoch time).",
    "dataset_examples": "Examples in one epoch of the data (for the epoch time).",
    "apply": "Write the best found configuration to WORKDIR/plan.json for jaxfit.train.",
    "json": "Write the plan (and search) as JSON to this path.",
    "micro_batch_sizes": "Comma-separated micro-batch sizes for --search.",
    "remat_policies": "Comma-separated remat policies for --search.",
    "loss_chunk_sizes": "Comma-separated CE chunk sizes for --search.",
    "max_compiles": "Stop a search after this many compilations (default 40).",
    "max_seq_len": "Upper bound of --search_seq_len.",
    "devices": "Plan for this many devices (compiled on as many host CPU devices).",
    "mesh": "Split of the devices, e.g. data=2,fsdp=4 (sets config.mesh).",
    "compile_for": "local (this machine's backend, default) or gpu (a deviceless CUDA "
    "target of --device; pip install -r requirements-plan-gpu.txt).",
}
COMPILE_FOR = ("local", "gpu")
BOOL_FLAGS = {
    "search": "Search micro-batch x remat policy x CE chunk size for what fits.",
    "search_seq_len": "Search the longest seq_len that fits.",
    "dry_run": "Check the config and flags, print the config, and stop (no compile).",
}


def _ints(text: str | None) -> list[int] | None:
    return [int(x) for x in text.split(",")] if text else None


def main(argv: list[str] | None = None) -> int:
    argv = argv or sys.argv
    if "--generate" in argv:
        return cli.run(_generate, argv, prog=PROG + " --generate", doc=generation.__doc__)
    return cli.run(_main, argv, prog=PROG, doc=__doc__)


def generate_parser() -> cli.ArgumentParser:
    """The flags of ``--generate`` (``--generate --help`` lists them)."""
    ap = cli.ArgumentParser(prog=PROG + " --generate", description=generation.__doc__)
    ap.add_argument("--generate", action="store_true", help="plan generation (this mode)")
    ap.add_argument(
        "--model",
        required=True,
        help=f"built-in ({', '.join(architectures.ARCHITECTURES)}) or an HF directory",
    )
    ap.add_argument(
        "--quant",
        choices=generation.weight_formats(),
        default="nf4",
        help="weight storage (default nf4)",
    )
    ap.add_argument("--context", type=int, default=2048, help="prompt + new tokens (2048)")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together (1)")
    ap.add_argument(
        "--kv_cache",
        choices=generation.KV_CACHE,
        default="bf16",
        help="KV cache storage (default bf16)",
    )
    ap.add_argument(
        "--new_tokens",
        type=int,
        default=None,
        help="tokens generated (default min(512, context / 2))",
    )
    ap.add_argument(
        "--prefill_chunk",
        type=int,
        default=sampling.DEFAULT_PREFILL_CHUNK,
        help=f"prompt tokens per prefill step ({sampling.DEFAULT_PREFILL_CHUNK}; 0: whole prompt)",
    )
    ap.add_argument(
        "--weights_on_host",
        action="store_true",
        help="the layer stack in pinned host memory, a layer at a time on the card",
    )
    ap.add_argument(
        "--search_context",
        action="store_true",
        help="find the longest context that fits (multiples of 1024)",
    )
    ap.add_argument("--device", default="rtx4070ti", help="card (jaxfit.perf.DEVICES)")
    ap.add_argument("--budget", default=None, help="memory budget (default: the card's)")
    ap.add_argument("--reserve", default=None, help="kept free (default 512MiB + 5%%)")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed MFU of the prefill (0.4)")
    ap.add_argument(
        "--compile_for",
        choices=COMPILE_FOR,
        default="local",
        help="local or gpu (deviceless XLA:GPU, requirements-plan-gpu.txt)",
    )
    ap.add_argument("--json", default=None, help="write the plan(s) as JSON here")
    ap.add_argument(
        "--dry_run",
        action="store_true",
        help="check the flags and the model, print them, and stop (no compile)",
    )
    return ap  # fmt: skip


def _generate(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = generate_parser().parse_args(argv[1:])
    try:  # before any compile
        perf.device(args.device)
        budget = estimate.parse_bytes(args.budget) if args.budget else None
        budget = budget or int(perf.device(args.device).memory_gib * 2**30)
        usable = apply.usable_bytes(
            budget, estimate.parse_bytes(args.reserve) if args.reserve else None
        )
        generation.resolve_model(args.model)
        gpu_target = cuda_target.cuda_target(args.device, 1) if args.compile_for == "gpu" else None
    except ValueError as e:
        raise UsageError(f"{e}, in the command line, see --generate --help") from None
    if args.dry_run:
        print(vars(args))
        return 0

    def plan_at(context: int):
        try:
            return generation.plan_generation(
                args.model, quant=args.quant, context=context, batch=args.batch,
                kv_cache_format=args.kv_cache, new_tokens=args.new_tokens,
                prefill_chunk=args.prefill_chunk, weights_on_host=args.weights_on_host,
            )  # fmt: skip
        except ValueError as e:
            raise UsageError(f"{e}, in the command line, see --generate --help") from None

    with target.compiling_for(gpu_target) if gpu_target else contextlib.nullcontext():
        plan = plan_at(args.context)
        print(generation.report(plan, args.device, budget, usable, args.mfu))
        out = generation.to_json(plan, args.device, usable, args.mfu)
        if args.search_context:
            print("\nsearch: longest context")
            longest, tried = generation.search_context(plan_at, usable)
            out["search"] = [
                generation.to_json(p, args.device, usable, args.mfu) for p in tried.values()
            ]
            if longest is None:
                print("nothing tried fits (1,024 tokens do not)")
            else:
                print(f"longest: context={longest.context:,} (peak "
                      f"{estimate.format_bytes(longest.peak_bytes)})")  # fmt: skip
                out["longest_context"] = longest.context
    if args.json:
        generation.dump(args.json, out)
    return 0


def _main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config, fl = config_lib.parse_argv(argv, extra_flags=FLAGS, bool_flags=BOOL_FLAGS)
    validation.validate_values(config)
    compile_for = fl["compile_for"] or "local"
    device = fl["device"] or config.get("device") or "rtx4070ti"
    gpu_target = None
    try:  # before anything touches a device
        if compile_for not in COMPILE_FOR:
            raise ValueError(f"--compile_for {compile_for!r}: one of {list(COMPILE_FOR)}")
        if fl["devices"] and int(fl["devices"]) < 1:
            raise ValueError(f"--devices {fl['devices']}: at least 1")
        if compile_for == "gpu" and not fl["dry_run"]:  # a dry run touches no device
            gpu_target = cuda_target.cuda_target(device, int(fl["devices"] or 1))
        elif fl["devices"] and not fl["dry_run"]:
            devices.use_devices(int(fl["devices"]))
        if fl["mesh"]:
            config = core.set_fields(config, devices.parse_mesh(fl["mesh"]))
    except ValueError as e:
        raise UsageError(f"{e}, in the command line, see --help") from None
    if fl["apply"] and not (fl["search"] or fl["search_seq_len"]):
        raise UsageError("--apply needs --search or --search_seq_len, in the command line")
    try:
        budget = estimate.parse_bytes(fl["budget"]) if fl["budget"] else None
        if budget is None:
            budget = int(estimate.perf.device(device).memory_gib * 2**30)
        reserve = estimate.parse_bytes(fl["reserve"]) if fl["reserve"] else None
        mfu = float(fl["mfu"] or estimate.DEFAULT_UTILISATION)
    except ValueError as e:
        raise UsageError(f"{e}, in the command line, see --help") from None
    if fl["dry_run"]:
        print(config)
        return 0
    usable = apply.usable_bytes(budget, reserve)
    timing = dict(
        utilisation=mfu,
        total_steps=int(config.total_steps),
        tokens=float(fl["tokens"]) if fl["tokens"] else None,
        dataset_tokens=float(fl["dataset_tokens"]) if fl["dataset_tokens"] else None,
        dataset_examples=float(fl["dataset_examples"]) if fl["dataset_examples"] else None,
    )
    with target.compiling_for(gpu_target) if gpu_target else contextlib.nullcontext():
        return _plan(config, fl, device, budget, usable, timing)


def _plan(config, fl, device, budget, usable, timing) -> int:
    """Plan, search and apply (``_main`` after the flags; inside the compile target)."""
    t0 = time.perf_counter()
    plan = core.plan_config(config)
    est = estimate.estimate_time(plan, device, **timing)
    print(f"jaxfit plan ({plan.backend}, compiled in {plan.compile_seconds:.0f} s)")
    if plan.caveats:
        print(f"caveats: {plan.caveats}")
    print(report.memory_report(plan, budget, usable, device))
    print(report.time_report(plan, est, int(config.total_steps)))
    out = {"plan": plan.to_dict(), "estimate": est.__dict__, "budget": budget, "usable": usable}

    found, best = [], None

    def table(rows: list) -> str:
        ests = [estimate.estimate_time(c.plan, device, **timing) if c.plan else None for c in rows]
        return report.search_table(rows, ests)

    if fl["search"]:
        print("\nsearch: micro-batch x remat policy x CE chunk size")
        rows = []  # every data x fsdp split of the devices unless --mesh names one
        for split in [{}] if fl["mesh"] else devices.mesh_splits(plan.devices):
            found_here = search.search_batch(
                core.set_fields(config, split),
                usable,
                micro_batch_sizes=_ints(fl["micro_batch_sizes"]),
                remat_policies=(fl["remat_policies"] or ",".join(search.REMAT_POLICIES)).split(","),
                loss_chunk_sizes=_ints(fl["loss_chunk_sizes"]),
                max_compiles=int(fl["max_compiles"] or 40),
                progress=print,
            )
            rows += [dataclasses.replace(c, overrides={**split, **c.overrides}) for c in found_here]

        # fitting, then the estimated step time (FLOPs, and on several devices the
        # collectives on the card's link); stable: ties keep the least sharded split first
        def step_time(c) -> float:
            return estimate.estimate_time(c.plan, device, **timing).step_seconds

        rows.sort(key=lambda c: (not c.fits, step_time(c) if c.plan else float("inf")))
        print("\nwhat fits, fastest first (then what does not):")
        print(table(rows))
        found += rows
        best = next((c for c in rows if c.fits), None)
    if fl["search_seq_len"]:
        print("\nsearch: longest seq_len")
        rows = search.search_seq_len(
            config, usable, max_seq_len=_ints(fl["max_seq_len"] or "0")[0] or None, progress=print
        )
        chunk = search.seq_len_step(config)
        valid = f" (above {chunk}: multiples of the {chunk}-query attention chunk)" if chunk else ""
        print(f"\nseq_len tried{valid}, shortest first:")
        print(table(rows))
        found += rows
        fitting = [c for c in rows if c.fits]
        longest = max(fitting, key=lambda c: c.overrides["seq_len"], default=None)
        if longest is not None:
            levers = {k: v for k, v in longest.overrides.items() if k != "seq_len"}
            pulled = ", ".join(f"{k}={v}" for k, v in levers.items()) or "the config as it is"
            print(f"longest: seq_len={longest.overrides['seq_len']:,} with {pulled}")
        best = best or longest
    if found:
        out["search"] = [
            {"overrides": c.overrides, "fits": c.fits, "error": c.error,
             "plan": c.plan.to_dict() if c.plan else None} for c in found
        ]  # fmt: skip
        if best is None:
            print(f"nothing tried fits {estimate.format_bytes(usable)}")
        else:
            flags_text = " ".join(f"--config.{k}={v}" for k, v in best.overrides.items())
            print(f"best: {flags_text}")
            if fl["apply"]:
                path = apply.write_plan(
                    fl["apply"], best.overrides, {"budget": budget, "plan": best.plan.to_dict()}
                )
                print(f"wrote {path}: `python -m jaxfit.train --workdir {fl['apply']}` uses it")
    if fl["json"]:
        with open(fl["json"], "w") as f:
            json.dump(out, f, indent=2, default=str)
    print(f"(planned in {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
