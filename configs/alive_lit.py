"""LiT on ALive: a locked pretrained image tower, a text tower trained from scratch.

Demo, on the built-in synthetic dataset (2 CPU cores, a few minutes). Its first stage trains
the image tower that it then locks (configs/image_pretrain.py:demo, labels only, training
classes only) into <workdir>/image_tower:

  python launch.py --config configs/alive_lit.py:demo --workdir /tmp/lit_demo

  reaches zero-shot top-1 0.862 on the 12 held-out classes (chance 0.083) and 0.900 on the
  training classes' test images (chance 0.017): 152 s on 2 CPU cores, image-tower stage and
  dataset build included (accuracy measured 2026-11-25, time 2026-11-22; deterministic). Over
  seeds 0 / 1 / 2 (`--config.seed=S`, the same locked tower): held-out 0.862 / 0.855 / 0.847
  (mean 0.854), test 0.900 / 0.891 / 0.889 (mean 0.893).
  With `demo,cache=0` it trains from the locked tower's stored centre-crop features: 0.880
  and 0.911, the LiT stage in 128 s (cache build 20 s) against 156 s
  (python -m agriclip_jax.benchmarks.lit_cache, 2026-11-26).

Full recipe (after preparing ALive), locking the image tower of one of this project's runs:

  python launch.py --config configs/alive_lit.py --workdir workdirs/alive_lit \\
      --config.init.workdir=PRETRAINED_RUN_WORKDIR

or a downloaded one (`tower=` names its family; `python -m agriclip_jax.models.inspect PATH`
tells which): a timm / AugReg ViT, BioCLIP's image tower (its open_clip directory), DINOv2:

  python launch.py --config configs/alive_lit.py:tower=timm,img=L/16,size=384 \\
      --workdir workdirs/alive_lit_l16 --config.init.img.path=/data/vit_large_patch16_384
  python launch.py --config configs/alive_lit.py:tower=open_clip,img=B/16 \\
      --workdir workdirs/alive_lit_bioclip --config.init.img.path=/data/bioclip
  python launch.py --config configs/alive_lit.py:tower=resnet,img=resnet50 \\
      --workdir workdirs/alive_lit_dino_r50 --config.init.img.path=/data/dino_resnet50_pretrain.pth

Options: demo, img=<ViT variant>, txt=<text size>, batch=<global batch>, steps=<total steps>,
head=<bool: trainable linear head on the locked tower>, inat=<weight of iNaturalist-2021 mixed
into the training data, relative to ALive's 1; 0 = none>, tower=<family of an imported image
tower: timm, clip, open_clip, siglip, dino, dinov2, hf_vit, or resnet (a DINO /
torchvision ResNet; img=resnet50 by default)>, size=<image size>, registers=<register
tokens of the imported tower (DINOv2 with registers: 4)>, cache=<views: train from the locked
tower's features, computed once per image and view before the first step (0 = the centre crop
only; trainers/image_cache.py); -1 (default) = run the tower every step>.
"""

from agriclip_jax import config_lib
from agriclip_jax.evaluators import base as evaluators
from agriclip_jax.models import presets
from agriclip_jax.trainers import contrastive
from configs import alive_clip
from configs import demo_common

IMAGE_PRETRAIN_DEMO = "configs/image_pretrain.py:demo"


def get_config(arg=None):
  options = config_lib.parse_arg(arg, demo=False, img="B/16", txt="B", batch=0, steps=0,
                                 inat=0.0,
                                 head=True, tower="", size=0, registers=0, cache=-1)
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
    config.model.img = dict(preset="", variant=options.img, pool_type="gap", head=options.head)
    config.model.txt = dict(preset="", variant=options.txt, head=True)
    config.model.out_dim = 512
    config.optim.update(lr=5e-4, warmup_steps=500, weight_decay=0.1, b2=0.98, eps=1e-6)
    config.evals.val = evaluators.make("zeroshot", split="validation")
    if options.tower:
      lock_imported_tower(config, options.tower, options.img, options.head)
      if options.registers:
        config.model.img.num_registers = options.registers
  if options.size:
    config.input.image_size = options.size
  if options.inat:
    alive_clip.add_inaturalist(config, options.inat)
  if options.batch:
    config.input.batch_size = options.batch
  if options.steps:
    config.total_steps = options.steps
  if options.cache >= 0:
    config.image_cache.enabled = True
    config.image_cache.views = options.cache
  return config


def lock_imported_tower(config, family: str, img: str, head: bool) -> None:
  """Locks a pretrained image tower of another project's format, given with
  --config.init.img.path: the family's architecture and image normalisation."""
  if family == "resnet":  # DINO's / torchvision's ResNets (format dino_resnet).
    config.model.img = dict(arch=img if img.startswith("resnet") else "resnet50", head=head)
    config.input.mean, config.input.std = presets.normalization("dino")
  else:
    config.model.img = dict(preset=family, variant=img, head=head)
    config.input.mean, config.input.std = presets.normalization(family)
  config.init.params = ".*"  # (config.init.workdir is not used.)


def demo(config, options):
  """Locks the demo image tower from configs/image_pretrain.py:demo (run first if missing)."""
  demo_common.two_tower_demo(config, steps=500, eval_every=250)
  config.model.img.head = options.head
  config.requires = [dict(workdir="{workdir}/image_tower", config=IMAGE_PRETRAIN_DEMO)]
  config.init.workdir = "{workdir}/image_tower"
