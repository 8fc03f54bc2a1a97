"""k-nearest-neighbour classification on image embeddings: `type="knn"`.

Embeds a labelled train split (the memory bank) and an evaluation split, then classifies each
evaluation image by a vote of its k most cosine-similar bank images, weighted by
exp(similarity / temperature) (DINO's k-NN protocol). Reports top-1 and top-5.
"""

import numpy as np

from agriclip_jax import config_lib
from agriclip_jax.evaluators import embeddings
from agriclip_jax.evaluators import metrics
from agriclip_jax.input import datasets
from agriclip_jax.input import pipeline


def default_config() -> dict:
  return dict(
      dataset="",  # "" = the training dataset
      train_split="train",
      split="test",
      k=20,
      temperature=0.07,
      max_train_examples=0,  # 0 = the whole train split
      batch_size=0,  # 0 = the context's
      image_key="image",
      label_key="label",
  )


def knn_predict(bank, bank_labels, queries, num_classes: int, k: int, temperature: float,
                chunk: int = 1024) -> np.ndarray:
  """[queries, num_classes] vote scores (rows of bank and queries are L2-normalised)."""
  k = min(k, len(bank))
  scores = np.zeros((len(queries), num_classes), np.float64)
  for start in range(0, len(queries), chunk):
    sims = queries[start:start + chunk] @ bank.T
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    weights = np.exp(np.take_along_axis(sims, top, axis=1) / temperature)
    rows = np.repeat(np.arange(len(top)), k)
    np.add.at(scores[start:start + chunk], (rows, bank_labels[top].ravel()), weights.ravel())
  return scores


class Evaluator:

  def __init__(self, name: str, config, context):
    self.name, self.config, self.context = name, config, context
    builder = datasets.builder(config.dataset or context.dataset, context.data_dir)
    self.bank_source = datasets.data_source(builder, config.train_split)
    self.source = datasets.data_source(builder, config.split)
    self.num_classes = builder.info.features[config.label_key].num_classes
    self.batch_size = config.batch_size or context.batch_size
    if config.k < 1:
      raise config_lib.ConfigError(f"evals.{name}.k must be at least 1")

  @property
  def _transform(self):
    return pipeline.EvalTransform(self.context.image_size, self.config.image_key,
                                  self.config.label_key)

  def run(self, params) -> dict[str, float]:
    bank = embeddings.embed_split(self.context, params, self.bank_source, self._transform,
                                  self.batch_size, max_examples=self.config.max_train_examples)
    test = embeddings.embed_split(self.context, params, self.source, self._transform,
                                  self.batch_size)
    scores = knn_predict(_normalized(bank["embedding"]), bank["label"],
                         _normalized(test["embedding"]), self.num_classes, self.config.k,
                         self.config.temperature)
    labels = test["label"]
    return {**metrics.classification(scores, labels), "num_classes": len(np.unique(labels)),
            "num_examples": len(labels), "bank_size": len(bank["label"])}


def _normalized(x):
  x = x.astype(np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
