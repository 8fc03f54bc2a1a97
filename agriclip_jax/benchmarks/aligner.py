"""Aligner fits at ALive scale, printed as JSON:

  python -m agriclip_jax.benchmarks.aligner [--rows=600000 --d_in=2048 --d_out=512]

Random features y = x W + b + noise (x with uneven feature scales and offsets, like real
backbone features), written to memory-mapped .npy files and streamed in batches. Times and
scores (R^2, MSE on 10% held-out rows) the closed-form ridge fit against the published SGD
recipe (`--sgd_epochs=70 --sgd_batch_size=100`, Adam).
"""

import json
import os
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

from agriclip_jax.models import aligner

FLAGS = flags.FLAGS


def make_features(directory: str, rows: int, d_in: int, d_out: int, noise: float,
                  chunk: int = 50_000):
  """Memory-mapped x [rows, d_in] and y [rows, d_out] float32, written chunk by chunk."""
  rng = np.random.default_rng(0)
  scales = rng.uniform(0.05, 5.0, d_in).astype(np.float32)
  offsets = rng.normal(size=d_in).astype(np.float32)
  weights = (rng.normal(size=(d_in, d_out)) / np.sqrt(d_in)).astype(np.float32)
  bias = rng.normal(size=d_out).astype(np.float32)
  x = np.lib.format.open_memmap(os.path.join(directory, "x.npy"), "w+", np.float32,
                                (rows, d_in))
  y = np.lib.format.open_memmap(os.path.join(directory, "y.npy"), "w+", np.float32,
                                (rows, d_out))
  for start in range(0, rows, chunk):
    n = min(chunk, rows - start)
    xs = rng.standard_normal((n, d_in), dtype=np.float32) * scales + offsets
    x[start:start + n] = xs
    y[start:start + n] = (xs / scales - offsets / scales) @ weights + bias + noise * \
        rng.standard_normal((n, d_out), dtype=np.float32)
  x.flush(), y.flush()
  return x, y


def main(argv):
  del argv
  directory = FLAGS.workdir or tempfile.mkdtemp(prefix="agriclip_align_bench_")
  start = time.time()
  x, y = make_features(directory, FLAGS.rows, FLAGS.d_in, FLAGS.d_out, FLAGS.noise)
  fit_rows = int(0.9 * len(x))
  train = aligner.in_batches(x[:fit_rows], y[:fit_rows], 20_000)
  test = aligner.in_batches(x[fit_rows:], y[fit_rows:], 20_000)
  result = {"rows": FLAGS.rows, "fit_rows": fit_rows, "d_in": FLAGS.d_in,
            "d_out": FLAGS.d_out, "data_seconds": time.time() - start}
  start = time.time()
  weights, bias = aligner.fit_closed_form(train, ridge=1e-6)
  result["closed_form"] = {"seconds": time.time() - start,
                           **{f"heldout_{k}": v for k, v in
                              aligner.evaluate(test, weights, bias).items()}}
  print(json.dumps(result), flush=True)
  if FLAGS.sgd_epochs:
    start = time.time()
    weights, bias = aligner.fit_sgd(np.asarray(x[:fit_rows]), np.asarray(y[:fit_rows]),
                                    FLAGS.sgd_epochs, FLAGS.sgd_batch_size, FLAGS.sgd_lr)
    result["sgd"] = {"seconds": time.time() - start, "epochs": FLAGS.sgd_epochs,
                     "batch_size": FLAGS.sgd_batch_size,
                     **{f"heldout_{k}": v for k, v in
                        aligner.evaluate(test, weights, bias).items()}}
  print(json.dumps(result, indent=1))


def define_flags() -> None:
  """The command's flags, defined when it runs (not on import: commands' flags would
  collide in one process)."""
  flags.DEFINE_integer("rows", 600_000, "Feature rows.")
  flags.DEFINE_integer("d_in", 2048, "DINO feature width.")
  flags.DEFINE_integer("d_out", 512, "CLIP embedding width.")
  flags.DEFINE_float("noise", 0.5, "Target noise, relative to the signal's scale "
                     "(R^2 <= 1 / (1 + noise^2)).")
  flags.DEFINE_integer("sgd_epochs", 70, "SGD epochs (0 skips it).")
  flags.DEFINE_integer("sgd_batch_size", 100, "SGD batch size.")
  flags.DEFINE_float("sgd_lr", 1e-3, "Adam learning rate for the SGD recipe.")
  flags.DEFINE_string("workdir", None, "Where the feature files go (default: tmp).")


if __name__ == "__main__":
  define_flags()
  app.run(main)
