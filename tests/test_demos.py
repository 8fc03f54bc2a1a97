"""The README's demos, run as shipped: each must name held-out classes far above chance."""

import json
import os

import pytest

from conftest import launch


@pytest.fixture(scope="module")
def demo_data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("demo_tfds"))  # The first demo builds the dataset here.


@pytest.mark.parametrize("config", ["configs/alive_lit.py:demo", "configs/alive_clip.py:demo"])
def test_demo_zero_shot_on_held_out_classes_is_at_least_5x_chance(demo_data_dir, tmp_path,
                                                                    config):
  result = launch(str(tmp_path), config, data_dir=demo_data_dir, timeout=1200)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(tmp_path, "summary.json")) as f:
    summary = json.load(f)
  chance = 1 / summary["heldout/num_classes"]
  assert summary["heldout/num_classes"] == 12 and summary["heldout/num_examples"] == 600
  assert summary["heldout/top1"] >= 5 * chance, summary
  assert f"heldout: top-1 {summary['heldout/top1']:.4f} (chance 0.0833)" in result.stdout
