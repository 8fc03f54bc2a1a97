"""Evaluates runs over a suite of datasets: zero-shot, linear probe, k-NN, retrieval, ranks.

  python launch.py --config configs/eval_suite.py --workdir workdirs/eval \\
      --config.checkpoints=workdirs/alive_clip,workdirs/alive_lit

writes results.json / .csv / .md (datasets x checkpoints, with the mean row), plots/ and
TensorBoard. The suite is the AgriCLIP downstream tasks (prepare them first, see README),
or a choice joined by "+" (config options are separated by commas, so a comma would start
the next option): `configs/eval_suite.py:tasks=cow_breed+banana_deficiency`.

Demo, after the README's demo command (which trains workdirs/lit_demo):

  python launch.py --config configs/eval_suite.py:demo --workdir workdirs/eval_demo

  compares the LiT demo run with the image tower it locked, on agri_synthetic.

Options: demo, tasks=<downstream task names joined by +>.
"""

from agriclip_jax import config_lib
from agriclip_jax.trainers import eval as eval_trainer


def get_config(arg=None):
  options = config_lib.parse_arg(arg, demo=False, tasks="")
  config = eval_trainer.default_config()
  config.input.batch_size = 256
  entry = eval_trainer.dataset_entry
  if options.demo:
    config.checkpoints = "workdirs/lit_demo,workdirs/lit_demo/image_tower"
    config.names = "lit_demo,image_tower"
    config.input.dataset = "agri_synthetic"
    config.input.batch_size = 128
    config.datasets.heldout = entry(split="heldout", classes="present")
    config.datasets.test = entry(split="test", classes="present", train_split="train",
                                 text_key="captions")
  else:
    from data.agri_downstream import registry  # pylint: disable=g-import-not-at-top
    try:
      tasks = registry.select(options.tasks)
    except ValueError as e:
      raise config_lib.ConfigError(str(e)) from None
    for task in tasks:
      config.datasets[task] = entry(dataset=f"agri_downstream/{task}", split="test",
                                    train_split="train")
  return config
