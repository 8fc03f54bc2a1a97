"""Zero-shot classification: class names x prompt templates vs image embeddings.

Each class is embedded as the renormalised mean of its normalised prompt embeddings (prompt
ensembling). Reports top-1, top-5 and mean per-class recall over every example of the split:
the last batch is padded and masked, never dropped. Ties go to the lower class index.
"""

import functools

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from agriclip_jax import config_lib
from agriclip_jax import sharding
from agriclip_jax.input import datasets
from agriclip_jax.input import pipeline
from agriclip_jax.input import preprocess

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def default_config() -> dict:
  return dict(
      dataset="",  # "" = the training dataset
      split="test",
      classes="all",  # all | present (labels occurring in the split) | [names]
      templates=None,  # None = the dataset's metadata, else DEFAULT_TEMPLATES
      batch_size=0,  # 0 = the context's
      image_key="image",
      label_key="label",
  )


class Evaluator:

  def __init__(self, name: str, config, context):
    self.name = name
    self.context = context
    self.config = config
    builder = datasets.builder(config.dataset or context.dataset, context.data_dir)
    self.source = datasets.data_source(builder, config.split)
    label_feature = builder.info.features[config.label_key]
    self.class_names = self._select_classes(config.classes, list(label_feature.names))
    index_of = {n: i for i, n in enumerate(self.class_names)}
    self.label_map = np.array([index_of.get(n, -1) for n in label_feature.names], np.int32)
    metadata = builder.info.metadata or {}
    self.templates = tuple(config.templates or metadata.get("prompt_templates")
                           or DEFAULT_TEMPLATES)
    self.batch_size = config.batch_size or context.batch_size
    self.batch_sharding = sharding.batch_sharding(context.mesh)
    sharding.batch_size_per_shard(context.mesh, self.batch_size)
    self.rows = pipeline.rows_of_process(self.batch_sharding, self.batch_size)
    logging.info("%s: %d examples of %s/%s, %d classes x %d templates", name,
                 len(self.source), builder.info.full_name, config.split,
                 len(self.class_names), len(self.templates))

  def _select_classes(self, classes, all_names: list[str]) -> list[str]:
    if classes == "all":
      return all_names
    if classes == "present":
      present = sorted({int(self.source[i][self.config.label_key])
                        for i in range(len(self.source))})
      return [all_names[i] for i in present]
    names = list(classes)
    unknown = [n for n in names if n not in all_names]
    if unknown:
      raise config_lib.ConfigError(f"evals.{self.name}.classes names unknown classes {unknown}")
    return names

  def _transform(self, example):
    return {"image": preprocess.eval_image(example[self.config.image_key],
                                           self.context.image_size),
            "label": np.int32(example[self.config.label_key])}

  def class_embeddings(self, params) -> jax.Array:
    """[classes, d]: renormalised mean over templates, replicated on every device."""
    texts = [t.format(c) for c in self.class_names for t in self.templates]
    tokens = self.context.tokenizer.encode(texts)
    embeddings = embed_texts(self.context, params, tokens, self.batch_size)
    embeddings = embeddings.reshape(len(self.class_names), len(self.templates), -1).mean(1)
    embeddings /= np.linalg.norm(embeddings, axis=-1, keepdims=True)
    return jax.device_put(embeddings, sharding.replicated(self.context.mesh))

  def run(self, params) -> dict[str, float]:
    classes = self.class_embeddings(params)
    totals = None
    for local in pipeline.eval_batches(self.source, self._transform, self.rows):
      labels = self.label_map[local["label"]]
      if np.any((labels < 0) & local["mask"]):
        missing = sorted({int(l) for l, m in zip(local["label"], labels) if m < 0})
        raise ValueError(f"{self.name}: split has labels {missing} that are not among the "
                         "evaluated classes (set classes='all' or 'present')")
      batch = sharding.global_batch(
          {"image": local["image"], "label": labels, "mask": local["mask"]},
          self.batch_sharding)
      counts = self._step(params, classes, batch)
      totals = counts if totals is None else jax.tree.map(jnp.add, totals, counts)
    totals = jax.tree.map(np.asarray, totals)
    per_class_total = totals["per_class_total"]
    seen = per_class_total > 0
    recall = totals["per_class_correct"][seen] / per_class_total[seen]
    n = int(totals["count"])
    if n != len(self.source):
      raise AssertionError(f"{self.name}: evaluated {n} of {len(self.source)} examples")
    return {"top1": totals["correct1"] / n, "top5": totals["correct5"] / n,
            "mean_per_class_recall": float(recall.mean()), "num_examples": n,
            "num_classes": len(self.class_names)}

  @functools.cached_property
  def _step(self):
    num_classes = len(self.class_names)
    k = min(5, num_classes)

    def step(params, classes, batch):
      zimg = self.context.encode_images(params, batch["image"])
      logits = jnp.einsum("bd,cd->bc", zimg, classes,
                          precision=jax.lax.Precision.HIGHEST)
      return classification_counts(logits, batch["label"], batch["mask"], k)

    replicated = sharding.replicated(self.context.mesh)
    return jax.jit(step, in_shardings=(self.context.params_sharding, replicated,
                                       self.batch_sharding),
                   out_shardings=replicated)


def classification_counts(logits, labels, mask, k: int = 5):
  """Summed correct@1, correct@k, counts and per-class tallies of a masked batch."""
  num_classes = logits.shape[-1]
  _, top = jax.lax.top_k(logits, k)  # Stable: equal logits rank the lower index first.
  mask = mask.astype(jnp.int32)
  correct1 = (top[:, 0] == labels).astype(jnp.int32) * mask
  correctk = jnp.any(top == labels[:, None], axis=1).astype(jnp.int32) * mask
  labels = jnp.where(mask > 0, labels, 0)
  return {
      "correct1": correct1.sum(), "correct5": correctk.sum(), "count": mask.sum(),
      "per_class_correct": jnp.zeros(num_classes, jnp.int32).at[labels].add(correct1),
      "per_class_total": jnp.zeros(num_classes, jnp.int32).at[labels].add(mask),
  }


def embed_texts(context, params, tokens: np.ndarray, batch_size: int) -> np.ndarray:
  """Text embeddings of all rows of `tokens` (numpy, every process gets all rows)."""
  mesh = context.mesh
  batch_sharding = sharding.batch_sharding(mesh)
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
