"""The README's first command, the LiT demo, run as shipped."""

from conftest import check_held_out_zero_shot, run_demo


def test_lit_demo_zero_shot_on_held_out_classes_is_at_least_5x_chance(tmp_path, demo_data_dir):
  check_held_out_zero_shot(*run_demo(tmp_path, "lit", "configs/alive_lit.py:demo",
                                     demo_data_dir))
