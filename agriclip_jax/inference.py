"""Running a finished model on the user's files: the shared part of `predict` and `embed`."""

import dataclasses
import os

import jax
import numpy as np

from agriclip_jax import config_lib
from agriclip_jax import files
from agriclip_jax import runs
from agriclip_jax import sharding
from agriclip_jax.evaluators import base as evaluators
from agriclip_jax.evaluators import embeddings
from agriclip_jax.evaluators import templates as template_sets
from agriclip_jax.evaluators import zeroshot
from agriclip_jax.input import preprocess
from data import builder_utils



def find_images(paths: list[str]) -> list[str]:
  """Files given, and image files under directories given (sorted), in argument order."""
  out = []
  for path in paths:
    if files.path(path).is_dir():  # Local paths are listed as given (./photos/a.jpg).
      walk = os.walk(path) if files.is_local(path) else files.path(path).walk()
      for root, dirs, names in walk:
        dirs.sort()
        out += [os.path.join(root, f) for f in sorted(names)
                if builder_utils.is_image(f) and not f.startswith(".")]
    else:
      out.append(path)
  return out


def decode_images(paths: list[str], size: int):
  """(uint8 arrays, their files, [(file, reason)] for files that could not be read).

  Photos are turned upright by their EXIF orientation, as the dataset builders do.
  """
  arrays, kept, skipped = [], [], []
  for path in paths:
    try:
      arrays.append(preprocess.eval_image(files.path(path).read_bytes(), size, upright=True))
      kept.append(path)
    except (OSError, preprocess.CorruptImageError) as e:
      skipped.append((path, str(e)))
  return arrays, kept, skipped


@dataclasses.dataclass
class Model:
  """A run on this host's devices, ready to embed images and texts."""
  run: runs.Run
  context: evaluators.Context

  @classmethod
  def load(cls, checkpoint: str, batch_size: int = 64, format: str | None = None,  # pylint: disable=redefined-builtin
           tokenizer: str | None = None) -> "Model":
    """A run's workdir or an imported checkpoint (see `runs.load`)."""
    if not files.path(checkpoint).exists():
      raise config_lib.ConfigError(f"--checkpoint {checkpoint} does not exist")
    mesh = sharding.make_mesh([("data", -1), ("fsdp", 1)], jax.local_devices())
    run = runs.load(checkpoint, mesh, format, tokenizer)
    batch_size = -(-batch_size // mesh.size) * mesh.size  # A whole number of shards.
    context = evaluators.Context(
        mesh=mesh, params_sharding=run.params_sharding,
        params_abstract=jax.eval_shape(lambda p: p, run.params),
        encode_images=run.encode_images, encode_texts=run.encode_texts,
        tokenizer=run.tokenizer, dataset="", data_dir=None, image_size=run.image_size,
        batch_size=batch_size, num_threads=4)
    return cls(run, context)

  def images(self, arrays: list[np.ndarray]) -> np.ndarray:
    """[n, d] embeddings of decoded images (L2-normalised for image-text runs)."""
    source = [{"image": a} for a in arrays]
    return embeddings.embed_split(self.context, self.run.params, source,
                                  lambda example: {"image": example["image"]},
                                  self.context.batch_size)["embedding"]

  def texts(self, texts: list[str]) -> np.ndarray:
    if not self.run.has_text:
      what = (f"an imported image tower ({self.run.config.format})"
              if self.run.config.trainer == "imported" else f"a {self.run.config.trainer} run")
      raise config_lib.ConfigError(f"{self.run.workdir} is {what}: it has no text tower")
    out = zeroshot.embed_texts(self.context, self.run.params, self.run.tokenizer.encode(texts),
                               self.context.batch_size)
    return out / np.linalg.norm(out, axis=1, keepdims=True)

  def classes(self, names: list[str], templates) -> np.ndarray:
    """[classes, d]: each class the renormalised mean of its prompt embeddings."""
    if not names:
      raise config_lib.ConfigError("the class list is empty")
    templates = template_sets.resolve(templates) or zeroshot.DEFAULT_TEMPLATES
    return zeroshot.ensemble(self.texts([t.format(n) for n in names for t in templates]),
                             len(names), len(templates))


def image_files_or_error(paths: list[str]) -> list[str]:
  files = find_images(paths)
  if not files:
    raise config_lib.ConfigError(f"no images in {paths}")
  return files

