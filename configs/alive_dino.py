"""DINO self-supervised training on ALive images (AgriCLIP's second stage).

Demo, on the built-in synthetic dataset (2 CPU cores, a few minutes):

  python launch.py --config configs/alive_dino.py:demo --workdir /tmp/dino_demo

  reaches k-NN top-1 0.763 / 0.779 / 0.770 (seeds 0 / 1 / 2, --config.seed=S) on the 60
  training classes' test images (chance 0.017; an untrained tower of this shape gives 0.713 on
  this easy synthetic data) in about 3 minutes.

Full recipe (ViT-B/16, DINO's defaults, 100 epochs of ALive at batch 256; prepare ALive first):

  python launch.py --config configs/alive_dino.py --workdir workdirs/alive_dino

Options: demo, img=<ViT variant>, batch=<global batch>, epochs=<epochs of ALive>.
"""

from agriclip_jax import config_lib
from agriclip_jax.evaluators import base as evaluators
from agriclip_jax.trainers import dino
from configs import demo_common

ALIVE_TRAIN_EXAMPLES = 588_000  # ~98% of ALive's 600k pairs; sets durations in steps.


def get_config(arg=None):
  options = config_lib.parse_arg(arg, demo=False, img="B/16", batch=256, epochs=100)
  config = dino.default_config()
  if options.demo:
    return demo(config)
  steps_per_epoch = ALIVE_TRAIN_EXAMPLES // options.batch
  config.input.dataset = "alive"
  config.input.batch_size = options.batch
  config.input.image_size = 224  # Evaluation (k-NN) resolution = the global crops'.
  config.model.img = dict(preset="", variant=options.img, pool_type="tok")
  config.optim.update(lr=5e-4 * options.batch / 256, warmup_steps=10 * steps_per_epoch)
  config.dino.freeze_last_layer_steps = steps_per_epoch
  config.total_steps = options.epochs * steps_per_epoch
  config.eval_every = 10 * steps_per_epoch
  config.checkpoint_every = steps_per_epoch
  config.evals.knn = evaluators.make("knn", train_split="train", split="validation",
                                     max_train_examples=50_000)
  return config


def demo(config):
  """Tiny DINO on `agri_synthetic`: 64-px global and 32-px local crops, a small head."""
  demo_common.use_synthetic_data(config, steps=300, eval_every=150)
  config.model.img = dict(demo_common.IMAGE_TOWER, pool_type="tok")
  config.model.head = dict(out_dim=1024, hidden_dim=256, bottleneck_dim=64, num_layers=3,
                           norm_last_layer=True)
  config.dino.update(global_size=64, local_size=32, num_local=2, teacher_momentum=0.99,
                     freeze_last_layer_steps=50)
  config.optim.update(lr=1e-3, weight_decay=0.04, clip_norm=3.0)
  config.evals.knn = evaluators.make("knn", train_split="train", split="test")
  return config
