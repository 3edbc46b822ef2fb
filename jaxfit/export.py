"""Export a training run: ``python -m jaxfit.export --workdir W --out DIR [--format hf]``.

``--format hf`` writes a Hugging Face directory (``config.json``, safetensors, tokenizer)
of the latest checkpoint (or ``--step N``) that ``transformers``' ``from_pretrained``
loads; LoRA adapters are merged into the base. ``--format peft`` writes a LoRA run's
adapters as ``adapter_config.json`` + ``adapter_model.safetensors`` for
``peft.PeftModel.from_pretrained`` (``base_model_name_or_path`` = the run's ``init_from``).

The checkpoints are only read (safe beside a run still training in WORKDIR); a damaged
one is named in a warning and never exported (exit 6 when none is usable).

examples:
  python -m jaxfit.export --workdir runs/ft --out runs/ft/hf
  python -m jaxfit.export --workdir runs/qlora --out runs/qlora/adapter --format peft
"""

from __future__ import annotations

import sys

from jaxfit import cli, trainer

PROG = "python -m jaxfit.export"

FORMATS = ("hf", "peft")


def export(workdir: str, out_dir: str, *, fmt: str = "hf", step: int | None = None):
    """Write the run's model in ``fmt`` to ``out_dir`` and return the path.

    The checkpoint (``step``, or the newest usable one) is read-only and verified
    (:func:`jaxfit.trainer.restore_params`): a damaged one is never exported.

    Raises:
      ValueError: unknown format. FileNotFoundError: no checkpoint in ``workdir``.
      jaxfit.checkpoint.NoUsableCheckpointError: none (or not ``step``) is usable.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {FORMATS}")
    _, task, params, _ = trainer.restore_params(workdir, step)
    return task.export_peft(params, out_dir) if fmt == "peft" else task.export(params, out_dir)


def parser() -> cli.ArgumentParser:
    """The command line's flags (``--help`` lists them)."""
    ap = cli.ArgumentParser(prog=PROG, description=__doc__)
    ap.add_argument("--workdir", required=True, help="run directory written by jaxfit.train")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--format", default="hf", choices=FORMATS, help="hf (default) or peft")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    return ap


def _main(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    latest = cli.checkpoint_step(args.workdir, args.step)  # before any data is read
    cli.check_output_dir("--out", args.out)  # a file, not writable, cannot be created
    which = f"step {args.step}" if args.step is not None else (
        f"the newest usable checkpoint (step {latest} is the newest now)"
    )  # fmt: skip
    print(f"exporting {which} of {args.workdir} as {args.format}", file=sys.stderr)
    # without --step the step is chosen when read: a run may add and remove checkpoints
    out = export(args.workdir, args.out, fmt=args.format, step=args.step)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv, prog=PROG, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
