"""What the demo configs share: the synthetic dataset at 64 px and a tiny model for 2 CPUs."""

from agriclip_jax.evaluators import base as evaluators

# The demo image tower; alive_lit.py:demo locks a tower of this shape from image_pretrain.py.
# `preset` is there to be overridden (--config.model.img.preset=clip); "" = none.
TOWER = dict(preset="", width=128, depth=2, mlp_dim=512, num_heads=4)
IMAGE_TOWER = dict(TOWER, patch_size=8, pool_type="gap")


def use_synthetic_data(config, steps: int, eval_every: int) -> None:
  """Synthetic 64-px data, batch 64, warm-up + cosine at 2e-3, and the run's periods."""
  config.input.dataset = "agri_synthetic"
  config.input.image_size = 64
  config.input.batch_size = 64
  config.input.crop_scale = (0.6, 1.0)
  config.input.num_threads = 4
  config.optim.update(lr=2e-3, warmup_steps=50, weight_decay=1e-4)
  config.total_steps = steps
  config.log_every = 50
  config.eval_every = eval_every
  config.checkpoint_every = eval_every


def two_tower_demo(config, steps: int, eval_every: int) -> None:
  """A tiny CLIP-style model (text tower trained from scratch) with zero-shot evaluation on
  the held-out classes and on the training classes' test images."""
  use_synthetic_data(config, steps, eval_every)
  config.tokenizer.vocab_size = 1024
  config.tokenizer.max_len = 24
  config.model.img = dict(IMAGE_TOWER, head=True)
  config.model.txt = dict(TOWER, head=True)
  config.model.out_dim = 128
  config.model.logit_scale_init = 10.0
  config.evals.heldout = evaluators.make("zeroshot", split="heldout", classes="present")
  config.evals.test = evaluators.make("zeroshot", split="test", classes="present")
