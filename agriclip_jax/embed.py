"""Writes embeddings of images or texts from a trained run to a .npy file.

  python -m agriclip_jax.embed --checkpoint DIR --out photos.npy photos/ more.jpg
  python -m agriclip_jax.embed --checkpoint DIR --out texts.npy --texts prompts.txt

The .npy holds float32 [n, d], L2-normalised; beside it, `<out>.txt`
lists the images (or texts) in row order. Unreadable images are reported on stderr and
skipped; the exit status is 1 if any were, 2 on a usage error, else 0.
"""

import argparse
import os
import sys

from agriclip_jax import predict

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m agriclip_jax.embed",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("images", nargs="*", help="Image files or directories.")
  parser.add_argument("--checkpoint", required=True, help=predict.CHECKPOINT_HELP)
  predict.add_checkpoint_options(parser)
  parser.add_argument("--out", required=True, help="Output .npy file.")
  parser.add_argument("--texts", help="File with one text per line (instead of images).")
  args = parser.parse_args(argv)
  if bool(args.images) == bool(args.texts):
    parser.error("give images or --texts, not both or neither")
  import numpy as np  # pylint: disable=g-import-not-at-top
  from agriclip_jax import config_lib  # pylint: disable=g-import-not-at-top
  from agriclip_jax import errors  # pylint: disable=g-import-not-at-top
  from agriclip_jax import inference  # pylint: disable=g-import-not-at-top
  skipped = []
  try:
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
      raise config_lib.ConfigError(f"--out {args.out}: its directory does not exist")
    model = inference.Model.load(args.checkpoint, format=args.checkpoint_format,
                                 tokenizer=args.tokenizer)
    if args.texts:
      try:
        with open(args.texts, encoding="utf-8-sig") as f:  # A leading BOM is not text.
          names = [line.rstrip("\n") for line in f if line.strip()]
      except UnicodeDecodeError as e:
        raise config_lib.ConfigError(f"{args.texts} is not UTF-8 text ({e.reason})") from None
      if not names:
        raise config_lib.ConfigError(f"{args.texts} holds no text")
      vectors = model.texts(names)
    else:
      arrays, names, skipped = inference.decode_images(
          inference.image_files_or_error(args.images), model.run.image_size)
      vectors = model.images(arrays) if arrays else np.zeros((0, 0), np.float32)
  except errors.USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for path, reason in skipped:
    print(f"skipped {path}: {reason}", file=sys.stderr)
  np.save(args.out, np.asarray(vectors, np.float32))
  with open(os.path.splitext(args.out)[0] + ".txt", "w", encoding="utf-8") as f:
    f.writelines(f"{n}\n" for n in names)
  print(f"{len(names)} embeddings of width {np.shape(vectors)[-1]} -> {args.out}")
  return 1 if skipped else 0


if __name__ == "__main__":
  sys.exit(main())
