"""LiT on ALive: a locked pretrained image tower, a text tower trained from scratch.

Demo, on the built-in synthetic dataset (2 CPU cores, a few minutes). Its first stage trains
the image tower that it then locks (configs/image_pretrain.py:demo, labels only, training
classes only) into <workdir>/image_tower:

  python launch.py --config configs/alive_lit.py:demo --workdir /tmp/lit_demo

  reaches zero-shot top-1 0.792 on the 12 held-out classes (chance 0.083) and 0.819 on the
  training classes' test images (chance 0.017): 152 s on 2 CPU cores, image-tower stage and
  dataset build included (measured 2026-11-22; the run is deterministic).

Full recipe (after preparing ALive; the image tower from a supervised or imported run):

  python launch.py --config configs/alive_lit.py --workdir workdirs/alive_lit \\
      --config.init.workdir=PRETRAINED_RUN_WORKDIR

Options: demo, img=<ViT variant>, txt=<text size>, batch=<global batch>, steps=<total steps>,
head=<bool: trainable linear head on the locked tower>.
"""

from agriclip_jax import config_lib
from agriclip_jax.trainers import contrastive

IMAGE_PRETRAIN_DEMO = "configs/image_pretrain.py:demo"


def get_config(arg=None):
  options = config_lib.parse_arg(arg, demo=False, img="B/16", txt="B", batch=0, steps=0,
                                 head=True)
  config = contrastive.default_config()
  # Locked image: the trunk is frozen; only its optional linear head learns, with the text.
  config.optim.rules = [("img/head/.*", {}), ("img/.*", None), (".*", {})]
  config.init.params = "img/.*"
  config.init.skip = "img/head/.*"  # The pretrained classifier head is not wanted.
  if options.demo:
    demo(config, options)
  else:
    config.input.dataset = "alive"
    config.input.batch_size = 4096
    config.total_steps = 20_000
    config.model.img = dict(variant=options.img, pool_type="gap", head=options.head)
    config.model.txt = dict(variant=options.txt, head=True)
    config.model.out_dim = 512
    config.optim.update(lr=5e-4, warmup_steps=500, weight_decay=0.1, b2=0.98, eps=1e-6)
    config.evals.val = dict(type="zeroshot", split="validation")
  if options.batch:
    config.input.batch_size = options.batch
  if options.steps:
    config.total_steps = options.steps
  return config


def demo(config, options):
  """Locks the demo image tower from configs/image_pretrain.py:demo (run first if missing)."""
  from configs import image_pretrain  # pylint: disable=g-import-not-at-top
  config.init.workdir = "{workdir}/image_tower"
  config.init.config = IMAGE_PRETRAIN_DEMO
  config.input.dataset = "agri_synthetic"
  config.input.image_size = 64
  config.input.batch_size = 64
  config.input.crop_scale = (0.6, 1.0)
  config.input.num_threads = 4
  config.tokenizer.vocab_size = 1024
  config.tokenizer.max_len = 24
  config.model.img = dict(image_pretrain.DEMO_TOWER, head=options.head)
  config.model.txt = dict(width=128, depth=2, mlp_dim=512, num_heads=4, head=True)
  config.model.out_dim = 128
  config.optim.update(lr=2e-3, warmup_steps=50, weight_decay=1e-4)
  config.total_steps = 500
  config.log_every = 50
  config.eval_every = 250
  config.checkpoint_every = 250
  config.evals.heldout = dict(type="zeroshot", split="heldout", classes="present")
  config.evals.test = dict(type="zeroshot", split="test", classes="present")
