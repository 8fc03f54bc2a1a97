"""Zero-shot classification: class names x prompt templates vs image embeddings.

Each class is embedded as the renormalised mean of its normalised prompt embeddings (prompt
ensembling), and images are scored by cosine similarity. The loop, padding and metrics are
those of `classification.Evaluator`.
"""

import functools

import jax
import numpy as np

from agriclip_jax import config_lib
from agriclip_jax import sharding
from agriclip_jax.evaluators import classification
from agriclip_jax.evaluators import templates
from agriclip_jax.input import pipeline

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def default_config() -> dict:
  return dict(
      classification.default_config(),
      # A list, a set's name from templates.py, or "": the dataset's metadata, else
      # DEFAULT_TEMPLATES.
      templates="",
      # "" = prompt with the label names; else the dataset metadata's class_texts[kind]
      # (e.g. "lit_species" for iNaturalist: "<common name> <supercategory> <genus>").
      class_texts="",
  )


class Evaluator(classification.Evaluator):

  def __init__(self, name: str, config, context):
    if context.encode_texts is None or context.tokenizer is None:
      raise config_lib.ConfigError(f"evals.{name}: zero-shot evaluation needs a text tower; "
                                   "this trainer's model has none (use type='classification')")
    super().__init__(name, config, context)
    metadata = self.builder.info.metadata or {}
    self.templates = (templates.resolve(config.templates)
                      or tuple(metadata.get("prompt_templates") or DEFAULT_TEMPLATES))
    self.prompt_names = self.class_names
    if config.class_texts:
      kinds = metadata.get("class_texts") or {}
      if config.class_texts not in kinds:
        raise config_lib.ConfigError(
            f"evals.{name}.class_texts={config.class_texts!r}: {self.builder.info.full_name} "
            f"has class texts {sorted(kinds)}")
      texts = kinds[config.class_texts]
      self.prompt_names = [texts[i] for i in self.class_ids]

  def check_model(self, num_dataset_classes: int) -> None:
    del num_dataset_classes  # Any embedding width works: classes come from text.

  def prepare(self, params) -> jax.Array:
    """[classes, d] class embeddings: renormalised mean over templates, replicated."""
    texts = [t.format(c) for c in self.prompt_names for t in self.templates]
    tokens = self.context.tokenizer.encode(texts)
    embeddings = ensemble(embed_texts(self.context, params, tokens, self.batch_size),
                          len(self.class_names), len(self.templates))
    return jax.device_put(embeddings, sharding.replicated(self.context.mesh))

  def scores(self, params, prepared, images):
    zimg = self.context.encode_images(params, images)
    return jax.numpy.einsum("bd,cd->bc", zimg, prepared, precision=jax.lax.Precision.HIGHEST)


def ensemble(embeddings: np.ndarray, num_classes: int, num_templates: int) -> np.ndarray:
  """[classes * templates, d] prompt embeddings (class-major) -> [classes, d]: each class the
  renormalised mean of its normalised prompt embeddings."""
  embeddings = embeddings / np.linalg.norm(embeddings, axis=-1, keepdims=True)
  embeddings = embeddings.reshape(num_classes, num_templates, -1).mean(1)
  return embeddings / np.linalg.norm(embeddings, axis=-1, keepdims=True)


def embed_texts(context, params, tokens: np.ndarray, batch_size: int) -> np.ndarray:
  """Text embeddings of all rows of `tokens` (numpy; every process gets every row)."""
  batch_sharding = sharding.batch_sharding(context.mesh)
  fn = _text_fn(context, batch_sharding)
  rows = pipeline.rows_of_process(batch_sharding, batch_size)
  n = len(tokens)
  padded = np.zeros((-(-n // batch_size) * batch_size, tokens.shape[1]), np.int32)
  padded[:n] = tokens
  out = []
  for start in range(0, len(padded), batch_size):
    local = padded[start + rows.start:start + rows.stop]
    out.append(np.asarray(fn(params, sharding.global_batch(local, batch_sharding))))
  return np.concatenate(out)[:n]


@functools.lru_cache(maxsize=8)
def _text_fn(context, batch_sharding):
  return jax.jit(context.encode_texts,
                 in_shardings=(context.params_sharding, batch_sharding),
                 out_shardings=sharding.replicated(context.mesh))
