"""Evaluation suite metrics vs plain references; the eval job and the predict / embed CLIs."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import special

from agriclip_jax import results as results_lib
from agriclip_jax.evaluators import metrics
import fixtures
from conftest import REPO, launch


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


# Metrics ------------------------------------------------------------------------------------


def test_classification_with_ties_and_classes_without_examples():
  scores = np.array([[1.0, 1.0, 0.0, 0.0],   # tie: class 0 wins (lower index)
                     [0.0, 2.0, 2.0, 0.0],   # tie: class 1 wins
                     [0.0, 0.0, 0.0, 5.0],
                     [3.0, 0.0, 0.0, 0.0]])
  labels = np.array([0, 2, 3, 0])  # Class 1 has no examples.
  out = metrics.classification(scores, labels, k=2)
  assert out["top1"] == 0.75
  assert out["top2"] == 1.0  # Class 2 is second for row 1.
  # Recall: class 0: 2/2, class 2: 0/1, class 3: 1/1 -> mean over the three present.
  assert out["mean_per_class_recall"] == pytest.approx((1 + 0 + 1) / 3)
  np.testing.assert_array_equal(metrics.confusion(scores.argmax(1), labels, 4),
                                [[2, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]])


def test_rank_probabilities_sum_species_within_each_taxon():
  # Four species in two genera in one family.
  species_probs = np.array([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]])
  genus_of_species = np.array([0, 0, 1, 1])
  genus = metrics.rank_probabilities(species_probs, genus_of_species, 2)
  np.testing.assert_allclose(genus, [[0.3, 0.7], [0.8, 0.2]])
  family = metrics.rank_probabilities(species_probs, np.zeros(4, int), 1)
  np.testing.assert_allclose(family, [[1.0], [1.0]])
  # A species-level miss can still be a genus-level hit.
  assert species_probs[0].argmax() == 3 and genus[0].argmax() == genus_of_species[2]


def test_retrieval_recall_matches_brute_force():
  rng = np.random.default_rng(0)
  images = _unit(rng.normal(size=(6, 5)))
  image_of_text = np.array([0, 0, 1, 2, 3, 3, 4, 5, 5])
  texts = _unit(images[image_of_text] + 0.9 * rng.normal(size=(9, 5)))
  got = metrics.retrieval(images, texts, image_of_text, ks=(1, 2, 5))
  sims = images @ texts.T
  for k in (1, 2, 5):
    i2t = np.mean([any(image_of_text[t] == i for t in np.argsort(-sims[i])[:k])
                   for i in range(6)])
    t2i = np.mean([image_of_text[t] in np.argsort(-sims[:, t])[:k] for t in range(9)])
    assert got[f"image_to_text_recall@{k}"] == pytest.approx(i2t)
    assert got[f"text_to_image_recall@{k}"] == pytest.approx(t2i)
  assert got["image_to_text_recall@5"] >= got["image_to_text_recall@1"]


def test_logistic_regression_reaches_the_regularised_optimum():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(200, 6))
  y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int) + (x[:, 2] > 1).astype(int)
  l2 = 1e-2
  weights, bias = metrics.fit_logistic(x, y, 3, l2, steps=300)
  # Gradient of mean cross-entropy + l2/2 |W|^2, in numpy, vanishes at the solution.
  probs = special.softmax(x @ weights + bias, axis=1)
  residual = (probs - np.eye(3)[y]) / len(x)
  np.testing.assert_allclose(x.T @ residual + l2 * weights, 0, atol=1e-4)
  np.testing.assert_allclose(residual.sum(0), 0, atol=1e-4)


def test_linear_probe_chooses_regularisation_on_validation():
  rng = np.random.default_rng(2)
  centers = rng.normal(size=(4, 8)) * 3
  make = lambda n: (lambda y: (centers[y] + rng.normal(size=(n, 8)), y))(rng.integers(0, 4, n))
  out = metrics.linear_probe(make(200), make(60), make(100), 4, l2_grid=(1e-4, 1e3))
  assert out["l2"] == 1e-4  # Crushing the weights does worse on validation.
  assert out["top1"] > 0.9


def test_markdown_table_has_a_mean_row_and_one_column_per_checkpoint_metric():
  results = {"a": {"d1": {"zeroshot/top1": 0.5, "knn/top1": 0.25}, "d2": {"zeroshot/top1": 1.0}},
             "b": {"d1": {"zeroshot/top1": 0.0}}}
  table = results_lib.markdown_table(results, ("zeroshot/top1", "knn/top1"))
  lines = table.strip().splitlines()
  assert lines[0] == "| dataset | a zeroshot/top1 | a knn/top1 | b zeroshot/top1 |"
  assert lines[2] == "| d1 | 50.0 | 25.0 | 0.0 |"
  assert lines[3] == "| d2 | 100.0 | - | - |"
  assert lines[4] == "| **mean** | 75.0 | - | - |"  # Means only over every dataset.
  assert results_lib.markdown_table({"a": {"d": {"linear_probe/l2": 0.001}}},
                                    ("linear_probe/l2",)).splitlines()[2] == "| d | 0.001 |"


# The eval job and the commands, on tiny trained runs ------------------------------------------


@pytest.fixture(scope="module")
def runs_dir(data_dir, tmp_path_factory):
  """A tiny LiT run (and the image tower it locked): image-text and image-only runs."""
  root = tmp_path_factory.mktemp("runs")
  result = launch(str(root / "lit"), "tests/tiny_config.py:kind=lit", data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  return root


def test_confusion_plot_shows_the_classes_in_the_most_errors(tmp_path):
  confusion = np.diag([9, 8, 7, 6, 5])
  confusion[3, 1] = 2  # Class 3 mistaken for 1: both are in errors.
  confusion[4, 4] -= 1
  confusion[4, 0] += 1  # One error each for 4 and 0.
  np.testing.assert_array_equal(results_lib.confused_classes(confusion, 3), [0, 1, 3])
  np.testing.assert_array_equal(results_lib.confused_classes(confusion, 10), np.arange(5))
  image = results_lib.plot_confusion(str(tmp_path / "c.png"), confusion, list("abcde"), "t",
                                     max_classes=3)
  assert image.ndim == 3 and image.dtype == np.uint8 and (tmp_path / "c.png").exists()


def test_eval_job_writes_results_tables_and_plots_and_skips_done_work(data_dir, runs_dir,
                                                                     tmp_path):
  from agriclip_jax.input import prepare  # pylint: disable=g-import-not-at-top
  fixtures.write_image_folder(str(tmp_path / "cows"), {"Jersey": 10, "Holstein": 10, "Gir": 10})
  prepare.prepare("agri_downstream/cow_breed", str(tmp_path / "cows"), data_dir)
  overrides = [f"--config.checkpoints={runs_dir}/lit,{runs_dir}/lit/image_tower",
               "--config.names=lit,tower"]
  result = launch(str(tmp_path), "tests/tiny_config.py:kind=eval", *overrides,
                  data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / "results.json") as f:
    results = json.load(f)
  lit, tower = results["lit"], results["tower"]
  assert lit["heldout"]["zeroshot/num_examples"] == 48  # Not a multiple of the batch (32).
  assert lit["test"]["zeroshot/num_examples"] == 180
  for key in ("zeroshot/top1", "zeroshot/top5", "zeroshot/mean_per_class_recall",
              "linear_probe/top1", "knn/top1", "retrieval/image_to_text_recall@1",
              "retrieval/text_to_image_recall@10", "taxonomy/genus/top1",
              "taxonomy/kingdom/top1", "taxonomy/kingdom/prompted_top1"):
    assert key in lit["test"], key
  assert lit["test"]["taxonomy/kingdom/num_taxa"] == 2  # Plantae, Animalia
  assert lit["test"]["taxonomy/species/num_taxa"] == 60  # One species per class.
  assert lit["test"]["taxonomy/species/top1"] == lit["test"]["zeroshot/top1"]
  assert "zeroshot/top1" not in tower["test"] and "knn/top1" in tower["test"]  # image-only
  cows = lit["cows"]  # No taxonomy and no captions there: those metrics are left out.
  assert "zeroshot/top1" in cows and "linear_probe/top1" in cows
  assert not any(k.startswith(("taxonomy/", "retrieval/")) for k in cows)
  rows = list(csv.DictReader(open(tmp_path / "results.csv")))
  assert {r["checkpoint"] for r in rows} == {"lit", "tower"}
  table = (tmp_path / "results.md").read_text()
  assert "| **mean** |" in table and "lit zeroshot/top1" in table
  for name in ("heldout", "test"):
    for plot in ("confusion", "per_class"):
      assert (tmp_path / "plots" / "lit" / f"{name}_{plot}.png").stat().st_size > 1000
  # Run again: every metric is reused, nothing recomputed.
  before = os.path.getmtime(tmp_path / "plots" / "lit" / "test_confusion.png")
  again = launch(str(tmp_path), "tests/tiny_config.py:kind=eval", *overrides,
                 data_dir=data_dir)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stderr.count("already evaluated") == 6
  assert os.path.getmtime(tmp_path / "plots" / "lit" / "test_confusion.png") == before
  with open(tmp_path / "results.json") as f:
    assert json.load(f) == results
  # A changed dataset entry is evaluated again; the others are still reused.
  changed = launch(str(tmp_path), "tests/tiny_config.py:kind=eval", *overrides,
                   "--config.datasets.test.k=3", data_dir=data_dir)
  assert changed.returncode == 0, changed.stderr[-3000:]
  assert changed.stderr.count("already evaluated") == 4


def test_eval_job_gives_the_same_results_on_8_devices(data_dir, runs_dir, tmp_path):
  """Embeddings are computed sharded over the devices; the padded last batch (48 examples,
  batch 32) is masked the same way whatever the device count."""
  found = {}
  for devices in (1, 8):
    workdir = tmp_path / str(devices)
    result = launch(str(workdir), "tests/tiny_config.py:kind=eval_heldout",
                    f"--config.checkpoints={runs_dir}/lit", "--config.names=lit",
                    data_dir=data_dir, devices=devices)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(workdir / "results.json") as f:
      found[devices] = json.load(f)["lit"]["heldout"]
  assert found[1]["zeroshot/num_examples"] == found[8]["zeroshot/num_examples"] == 48
  assert found[8] == pytest.approx(found[1], abs=1e-5)


def _cli(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=600,
                        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  root = tmp_path_factory.mktemp("photos")
  for i in range(3):
    fixtures.write_image(str(root / "field" / f"p{i}.jpg"), seed=i, size=(50, 40))
  fixtures.write_image(str(root / "one.png"), seed=9)
  (root / "field" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  return root


def test_predict_cli_prints_top_k_and_reports_unreadable_images(runs_dir, photos):
  labels = "red spotted leaf,green plain fish,white striped cattle,yellow plain fruit"
  result = _cli("agriclip_jax.predict", "--checkpoint", str(runs_dir / "lit"), "--labels",
                labels, "--top-k", "2", "--format", "json", str(photos / "field"),
                str(photos / "one.png"))
  assert result.returncode == 1, result.stderr[-3000:]  # One image was unreadable.
  assert f"skipped {photos / 'field' / 'broken.jpg'}" in result.stderr
  out = json.loads(result.stdout)
  assert [p["image"] for p in out["predictions"]] == [
      str(photos / "field" / f"p{i}.jpg") for i in range(3)] + [str(photos / "one.png")]
  for prediction in out["predictions"]:
    top = prediction["top"]
    assert len(top) == 2 and top[0]["probability"] >= top[1]["probability"]
    assert {t["class"] for t in top} <= set(labels.split(","))
  assert out["skipped"][0]["image"] == str(photos / "field" / "broken.jpg")
  table = _cli("agriclip_jax.predict", "--checkpoint", str(runs_dir / "lit"), "--labels",
               labels, str(photos / "one.png"))
  assert table.returncode == 0 and table.stdout.splitlines()[0].split() == [
      "image", "rank", "probability", "class"]
  assert len(table.stdout.splitlines()) == 1 + 4  # top-k capped by the 4 classes


def test_predict_cli_sums_species_to_the_asked_rank(runs_dir, photos, tmp_path):
  taxonomy = tmp_path / "taxonomy.csv"
  taxonomy.write_text("species,genus\nred spotted leaf,Rubrophyllum\nred striped leaf,"
                      "Rubrophyllum\ngreen plain fish,Viridichthys\n")
  result = _cli("agriclip_jax.predict", "--checkpoint", str(runs_dir / "lit"), "--taxonomy",
                str(taxonomy), "--rank", "genus", "--format", "csv", str(photos / "one.png"))
  assert result.returncode == 0, result.stderr[-3000:]
  rows = list(csv.DictReader(result.stdout.splitlines()))
  assert [r["class"] for r in rows] != [] and {r["class"] for r in rows} == {
      "Rubrophyllum", "Viridichthys"}
  assert sum(float(r["probability"]) for r in rows) == pytest.approx(1.0, abs=1e-4)


def test_predict_cli_rejects_an_empty_class_list(runs_dir, photos):
  result = _cli("agriclip_jax.predict", "--checkpoint", str(runs_dir / "lit"), "--labels",
                " , ", str(photos / "one.png"))
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == "error: the class list is empty"


def test_embed_cli_writes_embeddings_and_their_order(runs_dir, photos, tmp_path):
  out = tmp_path / "e.npy"
  result = _cli("agriclip_jax.embed", "--checkpoint", str(runs_dir / "lit"), "--out", str(out),
                str(photos))
  assert result.returncode == 1  # broken.jpg
  vectors = np.load(out)
  names = (tmp_path / "e.txt").read_text().splitlines()
  assert vectors.shape == (4, 32) and len(names) == 4
  np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
  texts = tmp_path / "t.txt"
  texts.write_text("\ufeffa photo of a red spotted leaf.\na cow\n")  # Notepad's BOM.
  result = _cli("agriclip_jax.embed", "--checkpoint", str(runs_dir / "lit"), "--out",
                str(tmp_path / "t.npy"), "--texts", str(texts))
  assert result.returncode == 0, result.stderr[-3000:]
  assert np.load(tmp_path / "t.npy").shape == (2, 32)
  assert (tmp_path / "t.txt").read_text(encoding="utf-8").splitlines() == [
      "a photo of a red spotted leaf.", "a cow"]
