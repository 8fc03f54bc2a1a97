"""What a pretrained checkpoint is, before you write the config that uses it.

  python -m agriclip_jax.models.inspect PATH [--format hf_clip|hf_siglip|open_clip|...] [--json]

Prints the detected format, the towers and the `config.model` fields they map to, the
parameter count, the preprocessing (image size, mean, std), the tokenizer, and the
`config.init` lines that load it. Exit status 2 (one line on stderr) if it cannot be read.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def describe(path: str, format: str | None = None) -> dict:  # pylint: disable=redefined-builtin
  from agriclip_jax.models import importers  # pylint: disable=g-import-not-at-top
  checkpoint = importers.read(path, format)
  towers = {k: v for k, v in checkpoint.model.items() if k in ("img", "txt")}
  counts = {k: int(sum(v.size for p, v in checkpoint.params.items() if p.startswith(k + "/")))
            for k in towers}
  source = "model" if len(towers) == 2 else next(iter(towers))
  init = [f"--config.init.{source}.path={checkpoint.path}",
          f"--config.init.{source}.format={checkpoint.format}"]
  return {
      "path": checkpoint.path,
      "format": checkpoint.format,
      "parameters": checkpoint.num_params(),
      "parameters_per_tower": counts,
      "model": checkpoint.model,
      "image_size": checkpoint.image_size,
      "mean": list(checkpoint.mean),
      "std": list(checkpoint.std),
      "context_length": checkpoint.context_length if "txt" in towers else None,
      "tokenizer": ("included" if checkpoint.tokenizer is not None
                    else ("none: pass --tokenizer DIR" if "txt" in towers else None)),
      "optional": sorted(checkpoint.optional),
      "config_init": init,
  }


def _lines(info: dict) -> list[str]:
  lines = [f"{info['path']}: {info['format']}, {info['parameters']:,} parameters"]
  for tower, fields in info["model"].items():
    if isinstance(fields, dict):
      count = info["parameters_per_tower"].get(tower, 0)
      lines.append(f"  model.{tower} ({count:,}): "
                   + ", ".join(f"{k}={v!r}" for k, v in sorted(fields.items())))
    else:
      lines.append(f"  model.{tower} = {fields!r}")
  if info["image_size"]:
    lines.append(f"  input: image_size={info['image_size']}, mean={info['mean']}, "
                 f"std={info['std']}")
  if info["context_length"]:
    lines.append(f"  text: context {info['context_length']}, tokenizer {info['tokenizer']}")
  if info["optional"]:
    lines.append(f"  not loaded unless asked (init.img.classifier=True): "
                 f"{', '.join(info['optional'])}")
  lines.append("  load with: " + " ".join(info["config_init"]))
  return lines


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m agriclip_jax.models.inspect",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("path")
  parser.add_argument("--format", default=None, help="The format, if it is not detected.")
  parser.add_argument("--json", action="store_true", help="Print JSON instead of text.")
  args = parser.parse_args(argv)
  from agriclip_jax import config_lib  # pylint: disable=g-import-not-at-top
  try:
    info = describe(args.path, args.format)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(info, indent=1) if args.json else "\n".join(_lines(info)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
