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

WiSE-FT demo: the CLIP demo (workdirs/clip_demo) fine-tuned on half of the training classes,
then evaluated at five mixes of the two on both halves and on the held-out classes:

  python launch.py --config configs/alive_clip.py:demo --workdir workdirs/clip_demo
  python launch.py --config configs/alive_clip.py:demo,steps=300 --workdir workdirs/clip_ft \
      --config.init.workdir=workdirs/clip_demo --config.input.classes=0-35 \
      --config.optim.lr=5e-4 --config.optim.warmup_steps=20
  python launch.py --config configs/eval_suite.py:wise_demo --workdir workdirs/wise_demo

Options: demo, wise_demo, tasks=<downstream task names joined by +>.
"""

from agriclip_jax import config_lib
from agriclip_jax.trainers import eval as eval_trainer


def get_config(arg=None):
  options = config_lib.parse_arg(arg, demo=False, wise_demo=False, tasks="")
  config = eval_trainer.default_config()
  config.input.batch_size = 256
  entry = eval_trainer.dataset_entry
  if options.wise_demo:
    wise_demo(config)
  elif options.demo:
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


def wise_demo(config) -> None:
  """workdirs/clip_ft mixed with workdirs/clip_demo: the fine-tuned half of the training
  classes (ids 0-35), the other half, and the held-out classes, each with its own classes as
  the candidates."""
  from data.agri_synthetic import spec  # pylint: disable=g-import-not-at-top
  entry = eval_trainer.dataset_entry
  train = [i for i, c in enumerate(spec.classes()) if not c.held_out]
  tuned = ",".join(str(i) for i in train if i <= 35)
  other = ",".join(str(i) for i in train if i > 35)
  config.checkpoints = "workdirs/clip_ft"
  config.names = "clip_ft"
  config.wise.base = "workdirs/clip_demo"
  config.input.dataset = "agri_synthetic"
  config.input.batch_size = 128
  config.metrics = "zeroshot"
  config.table_metrics = "zeroshot/top1"
  config.datasets.tuned_classes = entry(split="test", classes=tuned, drop_other_classes=True)
  config.datasets.other_classes = entry(split="test", classes=other, drop_other_classes=True)
  config.datasets.heldout = entry(split="heldout", classes="present")
