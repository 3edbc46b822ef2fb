"""Export a training run: ``python -m jaxfit.export --workdir W --out DIR [--format hf]``.

``--format hf`` writes a Hugging Face directory (``config.json``, safetensors, tokenizer)
of the latest checkpoint (or ``--step N``) that ``transformers``' ``from_pretrained``
loads; LoRA adapters are merged into the base. ``--format peft`` writes a LoRA run's
adapters as ``adapter_config.json`` + ``adapter_model.safetensors`` for
``peft.PeftModel.from_pretrained`` (``base_model_name_or_path`` = the run's ``init_from``).
"""

from __future__ import annotations

import argparse
import sys

from jaxfit import trainer

FORMATS = ("hf", "peft")


def export(workdir: str, out_dir: str, *, fmt: str = "hf", step: int | None = None):
    """Write the run's model in ``fmt`` to ``out_dir`` and return the path.

    Raises:
      ValueError: unknown format. FileNotFoundError: no checkpoint in ``workdir``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {FORMATS}")
    _, task, params, _ = trainer.restore_params(workdir, step)
    return task.export_peft(params, out_dir) if fmt == "peft" else task.export(params, out_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxfit.export", description=__doc__)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--format", default="hf", choices=FORMATS)
    ap.add_argument("--step", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        out = export(args.workdir, args.out, fmt=args.format, step=args.step)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
