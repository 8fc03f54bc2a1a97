"""The README's CLIP and AgriCLIP demos, run as shipped (the LiT demo: test_demo_lit.py, a
file of its own so that a parallel run starts both at once).

They share one root: the CLIP demo's workdir is also the AgriCLIP pipeline's `clip` stage,
which the pipeline then finds finished (as a user running the stages in turn would).
"""

import json

import pytest

from conftest import check_held_out_zero_shot, run_demo


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("demos")


def test_clip_demo_zero_shot_on_held_out_classes_is_at_least_5x_chance(root, demo_data_dir):
  check_held_out_zero_shot(*run_demo(root, "clip", "configs/alive_clip.py:demo",
                                     demo_data_dir))


def test_agriclip_pipeline_demo_aligned_dino_beats_chance(root, demo_data_dir):
  summary, _ = run_demo(root, "eval", "configs/agriclip.py:demo", demo_data_dir)
  for stage in ("clip", "dino", "align"):  # Every stage ran (clip already, by the test above).
    assert (root / stage / "summary.json").exists(), stage
  with open(root / "dino" / "summary.json") as f:
    assert json.load(f)["knn/top1"] > 10 / 60  # 60 training classes
  with open(root / "align" / "summary.json") as f:
    assert json.load(f)["align/heldout_r2"] > 0.5
  chance = 1 / summary["heldout/agriclip/num_classes"]
  assert summary["heldout/agriclip/top1"] >= 3 * chance, summary
  assert summary["heldout/mix/top1"] >= 3 * chance, summary
