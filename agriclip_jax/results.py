"""Evaluation results as files: results.json, results.csv, results.md, and plots.

`results[checkpoint][dataset][metric] = value`. The markdown table has a row per dataset
and a column per (checkpoint, metric), with the mean over datasets as its last row: the shape
of the AgriCLIP paper's table.
"""

import csv
import io
import math
from typing import Any

import numpy as np

from agriclip_jax import files

Results = dict[str, dict[str, dict[str, float]]]


def write(directory: str, results: Results, table_metrics=("zeroshot/top1",)) -> None:
  directory = files.path(directory)
  files.write_json(directory / "results.json", results, sort_keys=True)
  table = io.StringIO()
  writer = csv.writer(table)
  writer.writerow(["checkpoint", "dataset", "metric", "value"])
  for checkpoint, datasets in sorted(results.items()):
    for dataset, metrics in sorted(datasets.items()):
      for metric, value in sorted(metrics.items()):
        writer.writerow([checkpoint, dataset, metric, value])
  (directory / "results.csv").write_text(table.getvalue())
  (directory / "results.md").write_text(markdown_table(results, table_metrics))


def read(directory: str) -> Results:
  path = files.path(directory) / "results.json"
  return files.read_json(path) if path.exists() else {}


def markdown_table(results: Results, metrics) -> str:
  """Rows: datasets + mean; columns: checkpoint x metric (metrics present somewhere).

  Accuracies and recalls are percentages. A column's mean is given only if it has a value on
  every dataset, so means always compare the same datasets."""
  checkpoints = sorted(results)
  datasets = sorted({d for c in checkpoints for d in results[c]})
  columns = [(c, m) for c in checkpoints for m in metrics
             if any(m in results[c].get(d, {}) for d in datasets)]
  lines = ["| dataset | " + " | ".join(f"{c} {m}" for c, m in columns) + " |",
           "|---" * (len(columns) + 1) + "|"]
  for dataset in datasets:
    cells = [_cell(results[c].get(dataset, {}).get(m), m) for c, m in columns]
    lines.append(f"| {dataset} | " + " | ".join(cells) + " |")
  means = []
  for c, m in columns:
    values = [results[c][d][m] for d in datasets if m in results[c].get(d, {})]
    complete = len(values) == len(datasets)
    means.append(_cell(float(np.mean(values)) if complete else None, m))
  lines.append("| **mean** | " + " | ".join(means) + " |")
  return "\n".join(lines) + "\n"


def _is_fraction(metric: str) -> bool:
  name = metric.rsplit("/", 1)[-1]
  return name in ("top1", "top5", "mean_per_class_recall", "prompted_top1") or "recall@" in name


def _cell(value, metric: str) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  return f"{100 * value:.1f}" if _is_fraction(metric) else f"{value:.4g}"


def confused_classes(confusion: np.ndarray, max_classes: int) -> np.ndarray:
  """Indices (ascending) of the `max_classes` classes in the most errors, as truth or as
  prediction; equal counts prefer the more frequent class, then the lower index."""
  errors = confusion - np.diag(np.diag(confusion))
  order = np.lexsort((np.arange(len(confusion)), -confusion.sum(1),
                      -(errors.sum(0) + errors.sum(1))))
  return np.sort(order[:max_classes])


def plot_confusion(path: str, confusion: np.ndarray, class_names: list[str], title: str,
                   max_classes: int = 40) -> np.ndarray:
  """Row-normalised confusion matrix as a PNG (with many classes, those in the most errors,
  as truth or as prediction); returns the image as a uint8 array (for TensorBoard)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  keep = confused_classes(confusion, max_classes)
  # Fractions of each true class's examples, counting predictions outside the shown classes.
  matrix = confusion[np.ix_(keep, keep)] / np.maximum(confusion[keep].sum(1, keepdims=True), 1)
  size = 4 + 0.22 * len(keep)
  fig, ax = plt.subplots(figsize=(size, size))
  image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
  ax.set_xticks(range(len(keep)), [class_names[i] for i in keep], rotation=90, fontsize=7)
  ax.set_yticks(range(len(keep)), [class_names[i] for i in keep], fontsize=7)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  shown = ("" if len(keep) == len(confusion)
           else f" ({len(keep)} of {len(confusion)} classes, most errors)")
  ax.set_title(title + shown, fontsize=9)
  fig.colorbar(image, ax=ax, fraction=0.046)
  return _save(fig, path)


def plot_per_class(path: str, accuracy: np.ndarray, counts: np.ndarray,
                   class_names: list[str], title: str, max_classes: int = 60) -> np.ndarray:
  """Per-class accuracy, sorted, as a bar chart PNG; returns the image as a uint8 array."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  present = np.flatnonzero(counts > 0)
  order = present[np.argsort(accuracy[present], kind="stable")]
  if len(order) > max_classes:  # The worst and best classes.
    order = np.concatenate([order[:max_classes // 2], order[-max_classes // 2:]])
  fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(order)), 4))
  ax.bar(range(len(order)), accuracy[order], color="tab:green")
  ax.set_xticks(range(len(order)), [class_names[i] for i in order], rotation=90, fontsize=7)
  ax.set_ylim(0, 1)
  ax.set_ylabel("accuracy")
  ax.set_title(title, fontsize=9)
  return _save(fig, path)


def plot_curves(path: str, x: list[float], curves: dict[str, list], xlabel: str, ylabel: str,
                title: str) -> np.ndarray:
  """One line per curve (None values left out), e.g. accuracy against the WiSE-FT alpha."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, values in sorted(curves.items()):
    points = [(a, v) for a, v in zip(x, values) if v is not None]
    if points:
      ax.plot(*zip(*points), marker="o", label=name)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  return _save(fig, path)


def _save(fig, path: str) -> np.ndarray:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=100)
  files.path(path).write_bytes(png.getvalue())
  fig.canvas.draw()
  image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  plt.close(fig)
  return image


def flat(results: Results) -> dict[str, Any]:
  """"checkpoint/dataset/metric" -> value, for TensorBoard and summaries."""
  return {f"{c}/{d}/{m}": v for c, ds in results.items() for d, ms in ds.items()
          for m, v in ms.items()}
