"""Evaluation-only jobs: `config.trainer = "eval"` (configs/eval_suite.py).

Evaluates each run of `config.checkpoints` on each entry of `config.datasets`, sharded over
all devices and processes. Per dataset, from embeddings computed once per run and cached
(`embeddings/`): zero-shot top-1 / top-5 / mean per-class recall with prompt ensembles, a
linear probe (L2 chosen on a validation split), k-NN, image<->text retrieval recall@1/5/10,
and accuracy at every taxonomy rank (summed species probabilities; optionally by prompting
each rank). Writes results.json / .csv / .md, TensorBoard scalars and images, and per
dataset a confusion matrix and a per-class accuracy chart (`plots/`). A re-run reuses what
is computed unless `config.force`.

WiSE-FT (`config.wise.base`, a run or checkpoint the runs were fine-tuned from): each run is
evaluated at every `config.wise.alphas` mix (1 - a) * base + a * run, named "<run>@<a>";
wise.json and plots/wise_<run>.png give the first table metric against a per dataset.
"""

import os

from absl import logging
import jax
import ml_collections
import numpy as np

from agriclip_jax import config_lib
from agriclip_jax import distributed
from agriclip_jax import files
from agriclip_jax import results as results_lib
from agriclip_jax import runs
from agriclip_jax import sharding
from agriclip_jax.evaluators import base as evaluators
from agriclip_jax.evaluators import embeddings
from agriclip_jax.evaluators import knn
from agriclip_jax.evaluators import metrics
from agriclip_jax.evaluators import zeroshot
from agriclip_jax.input import datasets
from agriclip_jax.input import pipeline
from agriclip_jax.trainers import common
from agriclip_jax.trainers import loop as loop_lib

OPEN_FIELDS = ("datasets",)
METRICS = ("zeroshot", "linear_probe", "knn", "retrieval", "taxonomy")
DATASET_FIELDS = dict(
    dataset="",  # "" = config.input.dataset
    split="test",
    train_split="",  # For the linear probe and k-NN ("" = skip them).
    val_split="",  # Chooses the probe's L2; "" = every 5th example of train_split.
    classes="all",  # all | present | [names] | "name,name" or label ids "0-19,25"
    drop_other_classes=False,  # Evaluate only the examples of `classes` (a subset's split).
    templates="",  # A list, a template set's name, or "" (the dataset's own).
    class_texts="",  # Prompt with the dataset metadata's class_texts[kind] instead of names.
    text_key="",  # Captions for retrieval ("" = no retrieval).
    taxonomy_prompts=False,  # Also prompt each rank's taxon names directly.
    image_key="image",
    label_key="label",
    max_examples=0,  # 0 = the whole split
    max_train_examples=0,
    k=20,
    temperature=0.07,
)


def default_config() -> ml_collections.ConfigDict:
  config = common.base_config()
  config.trainer = "eval"
  # Comma-separated run workdirs or pretrained checkpoints (any format models/importers reads).
  config.checkpoints = ""
  config.names = ""  # Comma-separated names for them ("" = the workdirs' base names).
  config.datasets = ml_collections.ConfigDict()  # name -> fields of DATASET_FIELDS
  config.metrics = ",".join(METRICS)
  config.table_metrics = "zeroshot/top1,linear_probe/top1,knn/top1"
  config.force = False
  config.plots = True
  # WiSE-FT: interpolate every run with `base` at each alpha (comma-separated).
  config.wise = dict(base="", alphas="0,0.25,0.5,0.75,1")
  return config


def dataset_entry(**fields) -> ml_collections.ConfigDict:
  """A complete `config.datasets` entry (every field, so any can be overridden)."""
  config_lib.check_keys(fields, DATASET_FIELDS, "datasets entry")
  return ml_collections.ConfigDict({**DATASET_FIELDS, **fields})


class DatasetEval:
  """One run on one dataset: embeddings (cached), then each metric from them."""

  def __init__(self, run: runs.Run, context, entry, cache: str, name: str):
    self.run, self.context, self.entry, self.cache, self.name = run, context, entry, cache, name
    self.builder = datasets.builder(entry.dataset or context.dataset, context.data_dir)
    common.check_feature(self.builder, entry.label_key, f"datasets.{name}.label_key")
    common.check_feature(self.builder, entry.image_key, f"datasets.{name}.image_key")
    if entry.text_key:
      common.check_feature(self.builder, entry.text_key, f"datasets.{name}.text_key")
    self.num_classes = self.builder.info.features[entry.label_key].num_classes
    self.batch_size = context.batch_size
    self._memo = {}

  @property
  def has_taxonomy(self) -> bool:
    metadata = self.builder.info.metadata or {}
    return bool(metadata.get("taxonomy_ranks") and metadata.get("class_taxonomy"))

  def embed(self, split: str, max_examples: int, with_texts: bool = False) -> dict:
    subset = self._subset_ids()
    key = config_lib.fingerprint(self.builder.info.full_name, split, max_examples,
                                 self.entry.image_key, self.entry.label_key,
                                 self.entry.text_key if with_texts else "", subset)
    path = files.join(self.cache, f"{self.name}_{split}_{key}.npz")
    if path in self._memo:
      return self._memo[path]
    if distributed.exists_everywhere(path):
      self._memo[path] = files.load_arrays(path)
      return self._memo[path]
    source = datasets.data_source(self.builder, split)
    if subset is not None:
      source = datasets.of_classes(source, self.entry.label_key, subset,
                                   f"datasets.{self.name} ({split})")
    transform = pipeline.EvalTransform(self.run.image_size, self.entry.image_key,
                                       self.entry.label_key)
    out = embeddings.embed_split(self.context, self.run.params, source, transform,
                                 self.batch_size, max_examples=max_examples)
    if with_texts:
      out.update(self._embed_texts(source, len(out["label"])))
    if jax.process_index() == 0:
      files.path(self.cache).mkdir(parents=True, exist_ok=True)
      files.save_arrays(path, **out)
    self._memo[path] = out
    return out

  def _subset_ids(self) -> list[int] | None:
    """The label ids of `classes` when the entry drops other classes' examples, else None."""
    if not self.entry.drop_other_classes:
      return None
    classes, where = self.entry.classes, f"datasets.{self.name}.classes"
    if isinstance(classes, str) and classes in ("all", "present"):
      raise config_lib.ConfigError(f"datasets.{self.name}: drop_other_classes needs `classes` "
                                   f"to name the classes, not {classes!r}")
    names = self.builder.info.features[self.entry.label_key].names
    if isinstance(classes, str):
      return datasets.class_ids(classes, names, where)
    return [datasets.class_ids(str(names.index(c)) if c in names else c, names, where)[0]
            for c in classes]

  def _embed_texts(self, source, n: int) -> dict:
    texts, image_of_text = [], []
    for i in range(n):
      value = pipeline.feature(source[i], self.entry.text_key)
      if isinstance(value, dict):
        value = [value[k] for k in sorted(value)]
      for text in value if isinstance(value, (list, tuple, np.ndarray)) else [value]:
        texts.append(text.decode() if isinstance(text, bytes) else str(text))
        image_of_text.append(i)
    tokens = self.run.tokenizer.encode(texts)
    return {"text_embedding": zeroshot.embed_texts(self.context, self.run.params, tokens,
                                                   self.batch_size),
            "image_of_text": np.asarray(image_of_text)}

  def zero_shot(self, test: dict):
    """(metrics, species probabilities over the evaluated classes, labels in that space,
    the zero-shot evaluator)."""
    e = self.entry
    config = ml_collections.ConfigDict(dict(
        zeroshot.default_config(), dataset=e.dataset, split=e.split, classes=e.classes,
        templates=e.templates, class_texts=e.class_texts, batch_size=self.batch_size,
        image_key=e.image_key, label_key=e.label_key))
    evaluator = zeroshot.Evaluator(self.name, config, self.context)
    classes = np.asarray(evaluator.prepare(self.run.params))
    labels = evaluator.label_map[test["label"]]
    if np.any(labels < 0):
      raise config_lib.ConfigError(f"datasets.{self.name}: the split has classes outside "
                                   "`classes`; use 'all' or 'present'")
    scores = test["embedding"].astype(np.float64) @ classes.T.astype(np.float64)
    out = {**metrics.classification(scores, labels),
           "num_classes": len(evaluator.class_names), "num_examples": len(labels)}
    return out, metrics.softmax(self.run.logit_scale * scores), labels, evaluator

  def taxonomy(self, probs, labels, evaluator) -> dict[str, float]:
    metadata = self.builder.info.metadata or {}
    ranks, per_class = metadata.get("taxonomy_ranks"), metadata.get("class_taxonomy")
    if not ranks or not per_class:
      raise config_lib.ConfigError(f"datasets.{self.name}: {self.builder.info.full_name} has "
                                   "no taxonomy metadata (taxonomy_ranks, class_taxonomy)")
    out = {}
    for depth, rank in enumerate(ranks):
      # A taxon is its path from the top rank: equal names in different lineages differ.
      # Taxa are numbered in class order, so equal scores break ties as zero-shot does.
      paths = [tuple(per_class[i][r] for r in ranks[:depth + 1]) for i in evaluator.class_ids]
      taxa = list(dict.fromkeys(paths))
      index = {path: i for i, path in enumerate(taxa)}
      taxon_of_class = np.array([index[p] for p in paths])
      rank_probs = metrics.rank_probabilities(probs, taxon_of_class, len(taxa))
      out[f"{rank}/top1"] = float(np.mean(rank_probs.argmax(1) == taxon_of_class[labels]))
      out[f"{rank}/num_taxa"] = len(taxa)
      if self.entry.taxonomy_prompts:
        prompts = [t.format(path[-1]) for path in taxa for t in evaluator.templates]
        embedded = zeroshot.ensemble(
            zeroshot.embed_texts(self.context, self.run.params,
                                 self.run.tokenizer.encode(prompts), self.batch_size),
            len(taxa), len(evaluator.templates))
        scores = self._test_embeddings @ embedded.T
        out[f"{rank}/prompted_top1"] = float(np.mean(scores.argmax(1) ==
                                                     taxon_of_class[labels]))
    return out

  def compute(self, wanted: set[str], plots_dir: str | None) -> tuple[dict, dict]:
    """(metrics, images for TensorBoard)."""
    e = self.entry
    test = self.embed(e.split, e.max_examples, with_texts="retrieval" in wanted)
    self._test_embeddings = test["embedding"]
    out, images = {}, {}
    if wanted & {"zeroshot", "taxonomy"}:
      zs, probs, labels, evaluator = self.zero_shot(test)
      out.update({f"zeroshot/{k}": v for k, v in zs.items()})
      if "taxonomy" in wanted:
        out.update({f"taxonomy/{k}": v for k, v in self.taxonomy(probs, labels,
                                                                 evaluator).items()})
      if plots_dir and jax.process_index() == 0:
        images = self._plots(probs.argmax(1), labels, evaluator.class_names, plots_dir)
    if wanted & {"linear_probe", "knn"}:
      train = self.embed(e.train_split, e.max_train_examples)
      if "knn" in wanted:
        scores = knn.knn_predict(train["embedding"], train["label"], test["embedding"],
                                 self.num_classes, e.k, e.temperature)
        out.update({f"knn/{k}": v for k, v in
                    metrics.classification(scores, test["label"]).items()})
      if "linear_probe" in wanted:
        if e.val_split:
          val = self.embed(e.val_split, e.max_train_examples)
          fit = (train["embedding"], train["label"])
          held = (val["embedding"], val["label"])
        else:  # Every 5th training example chooses the regularisation.
          held_rows = np.arange(len(train["label"])) % 5 == 0
          fit = (train["embedding"][~held_rows], train["label"][~held_rows])
          held = (train["embedding"][held_rows], train["label"][held_rows])
        out.update({f"linear_probe/{k}": v for k, v in metrics.linear_probe(
            fit, held, (test["embedding"], test["label"]), self.num_classes).items()})
    if "retrieval" in wanted:
      text = test["text_embedding"]
      text = text / np.linalg.norm(text, axis=1, keepdims=True)
      out.update({f"retrieval/{k}": v for k, v in metrics.retrieval(
          test["embedding"], text, test["image_of_text"]).items()})
    return out, images

  def _plots(self, predictions, labels, class_names, plots_dir) -> dict[str, np.ndarray]:
    files.path(plots_dir).mkdir(parents=True, exist_ok=True)
    confusion = metrics.confusion(predictions, labels, len(class_names))
    counts = confusion.sum(1)
    accuracy = np.diag(confusion) / np.maximum(counts, 1)
    title = f"{self.name} zero-shot ({os.path.basename(self.run.workdir)})"
    return {
        f"{self.name}/confusion": results_lib.plot_confusion(
            files.join(plots_dir, f"{self.name}_confusion.png"), confusion, class_names,
            title),
        f"{self.name}/per_class": results_lib.plot_per_class(
            files.join(plots_dir, f"{self.name}_per_class.png"), accuracy, counts,
            class_names, title),
    }


def wanted_metrics(config, entry, run: runs.Run, has_taxonomy: bool) -> set[str]:
  """The metrics that apply to a run and dataset entry."""
  asked = {m.strip() for m in config.metrics.split(",") if m.strip()}
  unknown = asked - set(METRICS)
  if unknown:
    raise config_lib.ConfigError(f"config.metrics has unknown {sorted(unknown)}; known: "
                                 f"{list(METRICS)}")
  wanted = set(asked)
  if not run.has_text:
    wanted -= {"zeroshot", "retrieval", "taxonomy"}
  if not entry.train_split:
    wanted -= {"linear_probe", "knn"}
  if not entry.text_key:
    wanted.discard("retrieval")
  if not has_taxonomy:
    wanted.discard("taxonomy")
  return wanted


def is_done(previous: dict, wanted: set[str]) -> bool:
  return all(any(k.startswith(m + "/") for k in previous) for m in wanted)


KEYS = "results_keys.json"  # What each stored result was computed from.


def train(config: ml_collections.ConfigDict, workdir: str):
  checkpoints = [config_lib.expand_path(p.strip(), workdir)
                 for p in config.checkpoints.split(",") if p.strip()]
  if not checkpoints:
    raise config_lib.ConfigError("config.checkpoints names no run (comma-separated workdirs)")
  names = [n.strip() for n in config.names.split(",") if n.strip()] or [
      os.path.basename(os.path.normpath(p)) for p in checkpoints]
  if len(names) != len(checkpoints) or len(set(names)) != len(names):
    raise config_lib.ConfigError("config.names must give one distinct name per checkpoint")
  if not config.datasets:
    raise config_lib.ConfigError("config.datasets is empty")
  entries = {}
  for name, entry in config.datasets.items():
    config_lib.check_keys(entry, DATASET_FIELDS, f"datasets.{name}")
    entries[name] = ml_collections.ConfigDict({**DATASET_FIELDS, **entry.to_dict()})
  mesh = common.begin(config, workdir)
  writer = common.open_workdir(config, workdir)
  all_results = {} if config.force else results_lib.read(workdir)
  keys_path = files.path(workdir) / KEYS
  keys = files.read_json(keys_path) if keys_path.exists() and not config.force else {}
  alphas = _alphas(config.wise.alphas) if config.wise.base else []
  for run_name, run in _runs(config, names, checkpoints, alphas, mesh, workdir):
    context = evaluators.Context(
        mesh=mesh, params_sharding=run.params_sharding,
        params_abstract=jax.eval_shape(lambda p: p, run.params),
        encode_images=run.encode_images, encode_texts=run.encode_texts,
        tokenizer=run.tokenizer, dataset=config.input.dataset,
        data_dir=config.input.data_dir or None, image_size=run.image_size,
        batch_size=config.eval_batch_size or config.input.batch_size,
        num_threads=config.input.num_threads)
    sharding.batch_size_per_shard(mesh, context.batch_size)
    run_key = config_lib.fingerprint(*run.key)
    cache = files.join(workdir, "embeddings", f"{run_name}_{run_key}")
    for name, entry in entries.items():
      evaluation = DatasetEval(run, context, entry, cache, name)
      wanted = wanted_metrics(config, entry, run, evaluation.has_taxonomy)
      key = config_lib.fingerprint(run_key, evaluation.builder.info.full_name,
                                   entry.to_dict(), sorted(wanted))
      previous = all_results.get(run_name, {}).get(name, {})
      if keys.get(run_name, {}).get(name) == key and is_done(previous, wanted):
        logging.info("%s on %s: already evaluated (config.force=True redoes it)", run_name,
                     name)
        continue
      logging.info("Evaluating %s on %s: %s", run_name, name, sorted(wanted) or "nothing "
                   "applies (an image-only run on a dataset without a train split)")
      plots = files.join(workdir, "plots", run_name) if config.plots else None
      values, images = evaluation.compute(wanted, plots) if wanted else ({}, {})
      all_results.setdefault(run_name, {})[name] = values
      keys.setdefault(run_name, {})[name] = key
      if jax.process_index() == 0:  # Written after each dataset: nothing is lost.
        results_lib.write(workdir, all_results,
                          [m.strip() for m in config.table_metrics.split(",")])
        files.write_json(keys_path, keys)
      writer.write(run.step, {f"{run_name}/{name}/{k}": v for k, v in values.items()})
      if images:
        writer.write_images(run.step, {f"{run_name}/{k}": v[None] for k, v in images.items()})
  writer.close()
  if alphas and jax.process_index() == 0:
    _write_wise(workdir, all_results, names, alphas, config.table_metrics.split(",")[0].strip())
  summary = {"step": 0, **results_lib.flat(all_results)}
  if jax.process_index() == 0:
    results_lib.write(workdir, all_results, [m.strip() for m in config.table_metrics.split(",")])
    loop_lib.write_summary(workdir, summary)
  return summary


def _alphas(text: str) -> list[float]:
  try:
    alphas = [float(a) for a in str(text).split(",") if a.strip()]
  except ValueError:
    raise config_lib.ConfigError(f"config.wise.alphas={text!r}: comma-separated numbers "
                                 "expected, e.g. 0,0.25,0.5,0.75,1") from None
  if not alphas:
    raise config_lib.ConfigError("config.wise.alphas is empty")
  return alphas


def wise_name(run_name: str, alpha: float) -> str:
  return f"{run_name}@{alpha:g}"


def _runs(config, names, checkpoints, alphas, mesh, workdir):
  """(name, run) to evaluate: each checkpoint, or its WiSE-FT mixes with config.wise.base
  (made one at a time: one mix's parameters in memory)."""
  base = None
  if alphas:
    base = runs.load(config_lib.expand_path(config.wise.base, workdir), mesh)
  for run_name, checkpoint in zip(names, checkpoints):
    run = runs.load(checkpoint, mesh)
    if base is None:
      yield run_name, run
      continue
    for alpha in alphas:
      yield wise_name(run_name, alpha), runs.interpolate(base, run, alpha)


def _write_wise(workdir: str, results, names, alphas, metric: str) -> None:
  """wise.json ({run: {dataset: [metric at each alpha]}}, with the alphas) and a plot per run."""
  curves = {}
  for run_name in names:
    datasets_seen = sorted({d for a in alphas for d in results.get(wise_name(run_name, a), {})})
    curves[run_name] = {d: [results.get(wise_name(run_name, a), {}).get(d, {}).get(metric)
                            for a in alphas] for d in datasets_seen}
  files.write_json(files.path(workdir) / "wise.json",
                   {"metric": metric, "alphas": alphas, "curves": curves})
  (files.path(workdir) / "plots").mkdir(parents=True, exist_ok=True)
  for run_name, per_dataset in curves.items():
    results_lib.plot_curves(files.join(workdir, "plots", f"wise_{run_name}.png"), alphas,
                            per_dataset, "alpha (0 = base, 1 = fine-tuned)", metric,
                            f"WiSE-FT: {run_name}")
