"""LiT for species detection on iNaturalist-2021 (the recipe of Nakkab, Feuer & Hegde, 2023).

A locked ViT-L/16 image tower at 384 px (timm's `vit_large_patch16_384.augreg_in21k_ft_in1k`:
ImageNet-21k AugReg weights fine-tuned on 1k) with a trainable linear head to 512, a 12-layer,
width-512 text transformer trained from scratch on "<common name> <supercategory> <genus>"
captions; zero-shot top-1/top-5 on the 100k-image `val` split with a template ensemble.
Prepare the data first (see README); download the tower's `model.safetensors` (its Hugging
Face repository `timm/vit_large_patch16_384.augreg_in21k_ft_in1k`, with its config.json), then:

  python launch.py --config configs/inat21_lit.py --workdir workdirs/inat21_lit \\
      --config.init.img.path=/data/vit_large_patch16_384.augreg_in21k_ft_in1k

The tower may also come from the original AugReg .npz (format detected) or from a run of this
project (`--config.init.workdir=RUN`, whose checkpoint holds `img/...` of the same shape).
Reported reference: 63.3% zero-shot top-1 (secondary source); not reproduced here, since
neither the data nor the weights can be fetched on this project's machine.

Options: img=<ViT variant>, size=<image px>, split=train|train_mini, text=<text type> (one of
scientific, common, taxonomic, scientific_common, taxonomic_common, lit_species) or
random (a random type per step), batch=<global batch>, steps=<total steps>,
tower=<family of the locked tower: timm (default), clip, open_clip, siglip, dino, dinov2, hf_vit>.
"""

from agriclip_jax import config_lib
from agriclip_jax.evaluators import base as evaluators
from agriclip_jax.models import presets
from agriclip_jax.trainers import contrastive

TEXT_TYPES = ("scientific", "common", "taxonomic", "scientific_common", "taxonomic_common",
              "lit_species")


def get_config(arg=None):
  options = config_lib.parse_arg(arg, img="L/16", size=384, split="train", text="lit_species",
                                 batch=4096, steps=19_000, tower="timm")
  if options.text not in TEXT_TYPES + ("random",):
    raise config_lib.ConfigError(f"text={options.text!r}; expected one of "
                                 f"{TEXT_TYPES + ('random',)}")
  config = contrastive.default_config()
  config.input.dataset = "inaturalist2021_text"
  config.input.split = options.split
  config.input.image_size = options.size
  config.input.batch_size = options.batch
  config.input.text_key = "texts" if options.text == "random" else f"texts/{options.text}"
  config.input.text_choice = "step"
  config.tokenizer.max_len = 32
  config.model.img = dict(preset=options.tower, variant=options.img, head=True)
  config.input.mean, config.input.std = presets.normalization(options.tower)
  config.model.txt = dict(width=512, depth=12, num_heads=8, mlp_dim=2048, head=True)
  config.model.out_dim = 512
  config.model.logit_scale_init = 10.0  # LiT's initial temperature.
  config.optim.update(lr=5e-4, warmup_steps=500, weight_decay=0.1, b2=0.98, eps=1e-6)
  config.optim.rules = [("img/head/.*", {}), ("img/.*", None), (".*", {})]
  config.init.params = "img/.*"
  config.init.skip = "img/head/.*"
  config.total_steps = options.steps
  config.eval_every = 2000
  config.checkpoint_every = 1000
  config.evals.val = evaluators.make("zeroshot", split="val", templates="species",
      class_texts="lit_species" if options.text == "random" else options.text)
  return config
