"""Supervised image-tower pre-training: the tower a LiT run locks.

Stands in for the ImageNet-21k pre-trained ViT that LiT uses when no weights can be fetched:
it learns the training classes of a dataset from labels only (no text), so the held-out
classes stay unseen. The LiT demo runs it as its first stage (`config.requires`):

  python launch.py --config configs/image_pretrain.py:demo --workdir /tmp/image_pretrain

  reaches test top-1 0.908 over the 60 training classes (chance 0.017) in 400 steps.

Options: demo, img=<ViT variant>, batch=<global batch>, steps=<total steps>.
"""

from agriclip_jax import config_lib
from agriclip_jax.evaluators import base as evaluators
from agriclip_jax.trainers import supervised
from configs import demo_common


def get_config(arg=None):
  options = config_lib.parse_arg(arg, demo=False, img="B/16", batch=0, steps=0)
  config = supervised.default_config()
  if options.demo:
    demo_common.use_synthetic_data(config, steps=400, eval_every=200)
    config.model.img = dict(demo_common.IMAGE_TOWER)
    config.evals.test = evaluators.make("classification", split="test", classes="present")
  else:
    config.input.dataset = "alive"
    config.input.batch_size = 1024
    config.total_steps = 30_000
    config.model.img = dict(preset="", variant=options.img, pool_type="gap")
    config.optim.update(lr=1e-3, warmup_steps=2000, weight_decay=0.05)
    config.label_smoothing = 0.1
    config.evals.val = evaluators.make("classification", split="validation")
  if options.batch:
    config.input.batch_size = options.batch
  if options.steps:
    config.total_steps = options.steps
  return config
