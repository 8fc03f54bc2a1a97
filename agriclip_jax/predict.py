"""Zero-shot classification of your own photos with a trained image-text run.

  python -m agriclip_jax.predict --checkpoint workdirs/lit_demo --labels "red spotted leaf,..." \\
      photos/ more.jpg [--top-k 5] [--format table|csv|json] [--templates "a photo of a {}."]
  python -m agriclip_jax.predict --checkpoint DIR --classes classes.txt photos/
  python -m agriclip_jax.predict --checkpoint DIR --taxonomy taxonomy.csv --rank genus photos/

`--classes`: one class name per line. `--taxonomy`: a CSV whose header names ranks from the
finest (e.g. species) to the coarsest, a row per species; prompts name the species and
`--rank` sums their probabilities per taxon. Unreadable images are reported on stderr and
skipped; the exit status is 1 if any were, 2 on a usage error, else 0.
"""

import argparse
import csv
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


CHECKPOINT_HELP = ("A run's workdir, or a pretrained checkpoint: a Hugging Face CLIP / SigLIP "
                   "directory, an open_clip directory or file (embed also takes image towers: "
                   "timm, big_vision, DINO, DINOv2, DINO ResNet-50).")


def add_checkpoint_options(parser) -> None:
  """--checkpoint-format and --tokenizer, for checkpoints that are not this project's runs."""
  parser.add_argument("--checkpoint-format", dest="checkpoint_format", default=None,
                      help="Format of --checkpoint when it cannot be detected (see "
                      "`python -m agriclip_jax.models.inspect`).")
  parser.add_argument("--tokenizer", default=None,
                      help="A tokenizer directory, for checkpoints that ship none.")


def parse(argv):
  parser = argparse.ArgumentParser(prog="python -m agriclip_jax.predict",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("images", nargs="+", help="Image files or directories.")
  parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
  add_checkpoint_options(parser)
  group = parser.add_mutually_exclusive_group(required=True)
  group.add_argument("--classes", help="File with one class name per line.")
  group.add_argument("--labels", help="Comma-separated class names.")
  group.add_argument("--taxonomy", help="CSV: ranks as columns, finest first; a row per species.")
  parser.add_argument("--rank", help="With --taxonomy: the rank to predict (a column name).")
  parser.add_argument("--top-k", type=int, default=5, dest="top_k")
  parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
  parser.add_argument("--templates", default="",
                      help='A template set (photo, species) or templates joined by "|".')
  return parser.parse_args(argv)


def _read_text(path: str) -> str:
  from agriclip_jax import config_lib  # pylint: disable=g-import-not-at-top
  try:
    with open(path, encoding="utf-8-sig", newline="") as f:  # Drops Excel's byte-order mark.
      return f.read()
  except UnicodeDecodeError as e:
    raise config_lib.ConfigError(f"{path} is not UTF-8 text ({e.reason})") from None


def read_classes(args):
  """(prompted class names, names to report, index of each prompted class's reported one).

  With a taxonomy, a taxon is told apart by its lineage (its rank and the coarser columns),
  so equal genus names in different families stay apart; it is reported by its name.
  """
  from agriclip_jax import config_lib  # pylint: disable=g-import-not-at-top
  if args.labels is not None:
    names = [n.strip() for n in args.labels.split(",") if n.strip()]
  elif args.classes:
    names = [line.strip() for line in _read_text(args.classes).splitlines()
             if line.strip() and not line.startswith("#")]
  else:
    rows = list(csv.DictReader(_read_text(args.taxonomy).splitlines()))
    if not rows:
      raise config_lib.ConfigError(f"{args.taxonomy} lists no species")
    columns = list(rows[0])
    rank = args.rank or columns[0]
    if rank not in columns:
      raise config_lib.ConfigError(f"--rank {rank!r} is not a column of {args.taxonomy} "
                                   f"({columns})")
    lineage = columns[columns.index(rank):]
    for line, row in enumerate(rows, start=2):
      if any(not (row.get(c) or "").strip() for c in [columns[0]] + lineage):
        raise config_lib.ConfigError(f"{args.taxonomy}:{line}: an empty name in columns "
                                     f"{[columns[0]] + lineage}")
    paths = [tuple(row[c] for c in lineage) for row in rows]
    taxa = sorted(set(paths))
    index = {path: i for i, path in enumerate(taxa)}
    return [row[columns[0]] for row in rows], [t[0] for t in taxa], [index[p] for p in paths]
  if not names:
    raise config_lib.ConfigError("the class list is empty")
  return names, names, list(range(len(names)))


def predict(args):
  """(rows of (image, rank, class, probability), skipped [(image, reason)])."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from agriclip_jax import inference  # pylint: disable=g-import-not-at-top
  from agriclip_jax.evaluators import metrics  # pylint: disable=g-import-not-at-top
  from agriclip_jax import config_lib  # pylint: disable=g-import-not-at-top
  if args.top_k < 1:
    raise config_lib.ConfigError(f"--top-k must be at least 1; got {args.top_k}")
  prompted, reported, index = read_classes(args)
  files = inference.image_files_or_error(args.images)
  model = inference.Model.load(args.checkpoint, format=args.checkpoint_format,
                               tokenizer=args.tokenizer)
  templates = args.templates.split("|") if "{}" in args.templates else args.templates
  classes = model.classes(prompted, templates)
  arrays, kept, skipped = inference.decode_images(files, model.run.image_size)
  rows = []
  if arrays:
    probs = metrics.softmax(model.run.logit_scale * model.images(arrays) @ classes.T)
    probs = metrics.rank_probabilities(probs, np.asarray(index), len(reported))
    for path, p in zip(kept, probs):
      for rank, c in enumerate(metrics.ranking(p[None])[0][:args.top_k]):
        rows.append((path, rank + 1, reported[c], float(p[c])))
  return rows, skipped


def main(argv=None) -> int:
  args = parse(argv)
  from agriclip_jax import errors  # pylint: disable=g-import-not-at-top
  try:
    rows, skipped = predict(args)
  except errors.USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for path, reason in skipped:
    print(f"skipped {path}: {reason}", file=sys.stderr)
  if args.format == "json":
    grouped = {}
    for path, _, name, p in rows:
      grouped.setdefault(path, []).append({"class": name, "probability": p})
    print(json.dumps({"predictions": [{"image": k, "top": v} for k, v in grouped.items()],
                      "skipped": [{"image": p, "error": r} for p, r in skipped]}, indent=1))
  elif args.format == "csv":
    writer = csv.writer(sys.stdout)
    writer.writerow(["image", "rank", "class", "probability"])
    writer.writerows([(p, r, c, f"{q:.6f}") for p, r, c, q in rows])
  else:
    width = max([len(p) for p, *_ in rows] + [5])
    print(f"{'image':<{width}}  rank  probability  class")
    for path, rank, name, p in rows:
      print(f"{path:<{width}}  {rank:>4}  {p:>11.4f}  {name}")
  return 1 if skipped else 0


if __name__ == "__main__":
  sys.exit(main())
