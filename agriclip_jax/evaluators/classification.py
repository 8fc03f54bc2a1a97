"""Classification accuracy over a labelled split: `type="classification"`.

Scores images against the classes with the model's own output (a classifier's logits); the
zero-shot evaluator reuses this loop with text-derived class embeddings instead. Reports top-1,
top-5 and mean per-class recall over every example of the split: the last batch is padded and
masked, never dropped. Ties go to the lower class index.
"""

import functools
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from agriclip_jax import config_lib
from agriclip_jax import sharding
from agriclip_jax.input import datasets
from agriclip_jax.input import pipeline


def default_config() -> dict:
  return dict(
      dataset="",  # "" = the training dataset
      split="test",
      classes="all",  # all | present (labels occurring in the split) | [names]
      batch_size=0,  # 0 = the context's
      image_key="image",
      label_key="label",
  )


class Evaluator:
  """Top-1 / top-5 / mean per-class recall of `scores` over one split."""

  def __init__(self, name: str, config, context):
    self.name = name
    self.context = context
    self.config = config
    self.builder = datasets.builder(config.dataset or context.dataset, context.data_dir)
    self.source = datasets.data_source(self.builder, config.split)
    all_names = list(self.builder.info.features[config.label_key].names)
    self.class_names = self._select_classes(config.classes, all_names)
    index_of = {n: i for i, n in enumerate(self.class_names)}
    # Dataset label id -> position in class_names (-1: not evaluated), and back.
    self.label_map = np.array([index_of.get(n, -1) for n in all_names], np.int32)
    self.class_ids = np.array([all_names.index(n) for n in self.class_names], np.int32)
    self.batch_size = config.batch_size or context.batch_size
    self.batch_sharding = sharding.batch_sharding(context.mesh)
    sharding.batch_size_per_shard(context.mesh, self.batch_size)
    self.rows = pipeline.rows_of_process(self.batch_sharding, self.batch_size)
    self.check_model(len(all_names))
    logging.info("%s: %d examples of %s/%s, %d classes", name, len(self.source),
                 self.builder.info.full_name, config.split, len(self.class_names))

  def check_model(self, num_dataset_classes: int) -> None:
    """A classifier must output one score per class of the dataset."""
    images = jax.ShapeDtypeStruct((1, self.context.image_size, self.context.image_size, 3),
                                  np.uint8)
    out = jax.eval_shape(self.context.encode_images, self.context.params_abstract, images)
    if out.shape[-1] != num_dataset_classes:
      raise config_lib.ConfigError(
          f"evals.{self.name}: the model gives {out.shape[-1]} values per image, not one per "
          f"class of {self.builder.info.full_name} ({num_dataset_classes}); an image-text "
          "model is evaluated with type='zeroshot'")

  def _select_classes(self, classes, all_names: list[str]) -> list[str]:
    if isinstance(classes, str) and classes not in ("all", "present"):
      try:  # "name,name" or label ids "0-19,25".
        return [all_names[i] for i in datasets.class_ids(classes, all_names,
                                                          f"evals.{self.name}.classes")]
      except datasets.DatasetError as e:
        raise config_lib.ConfigError(f"{e}; classes is 'all', 'present', a list of names or "
                                     "a comma-separated string of names or label ids") from None
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

  def prepare(self, params) -> Any:
    """Inputs of `scores` computed once per run, not per batch (replicated)."""
    del params

  def scores(self, params, prepared, images):
    """[batch, len(class_names)] scores of uint8 `images`: the model's logits."""
    del prepared
    return self.context.encode_images(params, images)[:, self.class_ids]

  @property
  def _transform(self):
    return pipeline.EvalTransform(self.context.image_size, self.config.image_key,
                                  self.config.label_key)

  def run(self, params) -> dict[str, float]:
    prepared = self.prepare(params)
    totals = None
    for local in pipeline.eval_batches(self.source, self._transform, self.rows,
                                       self.context.num_threads):
      labels = self.label_map[local["label"]]
      if np.any((labels < 0) & local["mask"]):
        missing = sorted({int(l) for l, m in zip(local["label"], labels) if m < 0})
        raise config_lib.ConfigError(
            f"evals.{self.name}: split has labels {missing} that are not among the evaluated "
            "classes (set classes='all' or 'present')")
      batch = sharding.global_batch(
          {"image": local["image"], "label": labels, "mask": local["mask"]},
          self.batch_sharding)
      counts = self._step(params, prepared, batch)
      totals = counts if totals is None else jax.tree.map(jnp.add, totals, counts)
    return summarize(jax.tree.map(np.asarray, totals), len(self.source), self.name)

  @functools.cached_property
  def _step(self):
    k = min(5, len(self.class_names))

    def step(params, prepared, batch):
      logits = self.scores(params, prepared, batch["image"])
      return classification_counts(logits, batch["label"], batch["mask"], k)

    replicated = sharding.replicated(self.context.mesh)
    return jax.jit(step, in_shardings=(self.context.params_sharding, replicated,
                                       self.batch_sharding),
                   out_shardings=replicated)


def classification_counts(logits, labels, mask, k: int = 5):
  """Summed correct@1, correct@k, counts and per-class tallies of a masked batch."""
  num_classes = logits.shape[-1]
  _, top = jax.lax.top_k(logits, k)  # Equal logits rank the lower index first.
  mask = mask.astype(jnp.int32)
  correct1 = (top[:, 0] == labels).astype(jnp.int32) * mask
  correctk = jnp.any(top == labels[:, None], axis=1).astype(jnp.int32) * mask
  labels = jnp.where(mask > 0, labels, 0)
  return {
      "correct1": correct1.sum(), "correct5": correctk.sum(), "count": mask.sum(),
      "per_class_correct": jnp.zeros(num_classes, jnp.int32).at[labels].add(correct1),
      "per_class_total": jnp.zeros(num_classes, jnp.int32).at[labels].add(mask),
  }


def summarize(totals: dict[str, np.ndarray], expected: int, name: str) -> dict[str, float]:
  """Accuracy metrics from summed counts; mean recall is over classes with examples."""
  n = int(totals["count"])
  if n != expected:
    raise AssertionError(f"{name}: evaluated {n} examples, the split has {expected}")
  seen = totals["per_class_total"] > 0
  recall = totals["per_class_correct"][seen] / totals["per_class_total"][seen]
  return {"top1": float(totals["correct1"]) / n, "top5": float(totals["correct5"]) / n,
          "mean_per_class_recall": float(recall.mean()), "num_examples": n,
          "num_classes": len(totals["per_class_total"])}
