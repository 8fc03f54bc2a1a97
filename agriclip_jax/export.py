"""Exports a trained model for PyTorch: a directory transformers or open_clip loads in one line.

  python -m agriclip_jax.export --workdir RUN --out DIR [--format hf|open_clip|native] [--step N]

  transformers.CLIPModel.from_pretrained(DIR)   # SiglipModel for SigLIP-form runs
  open_clip.create_model_and_transforms("local-dir:DIR")

--workdir is a run's workdir or any checkpoint `predict` takes (a Hugging Face or open_clip
checkpoint), so the command also converts between formats. A model the requested format
cannot express is written in the native format (safetensors + agriclip_model.json) instead,
and one line names what does not fit. An AgriCLIP alignment run exports its aligner (a
PyTorch nn.Linear's weight and bias). `--wise-base BASE --alpha a` exports the WiSE-FT mix
(1 - a) * BASE + a * run of a run fine-tuned from BASE. Prints JSON: what was written and
how to load it.
Exit status: 0 written as asked, 3 written in the native format instead, 2 on bad input.
"""

import argparse
import json
import os
import sys

from agriclip_jax import files
from agriclip_jax import predict

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

FALLBACK_STATUS = 3


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m agriclip_jax.export",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help=predict.CHECKPOINT_HELP)
  parser.add_argument("--out", required=True, help="The directory to write (created).")
  parser.add_argument("--format", default="hf", choices=("hf", "open_clip", "native"))
  parser.add_argument("--step", type=int, default=None,
                      help="The run's checkpoint to export (default: its latest).")
  parser.add_argument("--wise-base", dest="wise_base", default=None,
                      help="WiSE-FT: the run or checkpoint --workdir was fine-tuned from; the "
                      "export is (1 - alpha) * base + alpha * fine-tuned.")
  parser.add_argument("--alpha", type=float, default=None,
                      help="WiSE-FT mixing weight of the fine-tuned run (with --wise-base).")
  predict.add_checkpoint_options(parser)
  args = parser.parse_args(argv)
  if (args.wise_base is None) != (args.alpha is None):
    parser.error("--wise-base and --alpha go together")
  import jax  # pylint: disable=g-import-not-at-top
  from agriclip_jax import config_lib  # pylint: disable=g-import-not-at-top
  from agriclip_jax import errors  # pylint: disable=g-import-not-at-top
  from agriclip_jax import runs  # pylint: disable=g-import-not-at-top
  from agriclip_jax import sharding  # pylint: disable=g-import-not-at-top
  from agriclip_jax.models import exporters  # pylint: disable=g-import-not-at-top
  from agriclip_jax.models.exporters import common, native  # pylint: disable=g-import-not-at-top
  status = 0
  try:
    if not files.path(args.workdir).exists():
      raise config_lib.ConfigError(f"--workdir {args.workdir} does not exist")
    if os.path.exists(args.out) and os.listdir(args.out):
      raise config_lib.ConfigError(f"--out {args.out} exists and is not empty")
    mesh = sharding.make_mesh([("data", -1), ("fsdp", 1)], jax.local_devices())
    run = runs.load(args.workdir, mesh, args.checkpoint_format, args.tokenizer, args.step)
    if args.wise_base is not None:
      run = runs.interpolate(runs.load(args.wise_base, mesh), run, args.alpha)
    if run.config.trainer == "align":
      weights, bias, _ = runs.load_aligner(run.config, run.workdir)
      result = native.export_aligner(weights, bias, args.out, run.workdir)
    else:
      model = exporters.from_run(run)
      try:
        result = exporters.export(model, args.out, args.format)
      except common.Unexpressible as e:
        result = exporters.export(model, args.out, "native")
        result.update(requested=args.format, unexpressible=e.reasons)
        print(f"note: {e}; wrote the native format (safetensors + {native.CONFIG}) to "
              f"{args.out}", file=sys.stderr)
        status = FALLBACK_STATUS
  except errors.USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  result["source"] = run.workdir
  result["step"] = run.step
  if args.wise_base is not None:
    result.update(wise_base=args.wise_base, alpha=args.alpha)
  print(json.dumps(result, indent=1))
  return status


if __name__ == "__main__":
  sys.exit(main())
