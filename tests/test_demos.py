"""The README's demos, run as shipped: each must name held-out classes far above chance.

They share one root: the CLIP demo's workdir is also the AgriCLIP pipeline's `clip` stage,
which the pipeline then finds finished (as a user running the stages in turn would).
"""

import json
import os

import pytest

from conftest import REPO, launch


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("demos")


def _run(root, name, config):
  # A relative workdir, as in the README's command, run from the repository root.
  result = launch(os.path.relpath(root / name, REPO), config, data_dir=str(root / "tfds"),
                  timeout=1500)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(root, name, "summary.json")) as f:
    return json.load(f), result


@pytest.mark.parametrize("name,config", [("lit", "configs/alive_lit.py:demo"),
                                         ("clip", "configs/alive_clip.py:demo")])
def test_demo_zero_shot_on_held_out_classes_is_at_least_5x_chance(root, name, config):
  summary, result = _run(root, name, config)
  chance = 1 / summary["heldout/num_classes"]
  assert summary["heldout/num_classes"] == 12 and summary["heldout/num_examples"] == 600
  assert summary["heldout/top1"] >= 5 * chance, summary
  assert f"heldout: top-1 {summary['heldout/top1']:.4f} (chance 0.0833)" in result.stdout


def test_agriclip_pipeline_demo_aligned_dino_beats_chance(root):
  summary, _ = _run(root, "eval", "configs/agriclip.py:demo")
  for stage in ("clip", "dino", "align"):  # Every stage ran (clip already, by the test above).
    assert (root / stage / "summary.json").exists(), stage
  with open(root / "dino" / "summary.json") as f:
    assert json.load(f)["knn/top1"] > 10 / 60  # 60 training classes
  with open(root / "align" / "summary.json") as f:
    assert json.load(f)["align/heldout_r2"] > 0.5
  chance = 1 / summary["heldout/agriclip/num_classes"]
  assert summary["heldout/agriclip/top1"] >= 3 * chance, summary
  assert summary["heldout/mix/top1"] >= 3 * chance, summary
