"""Tiny versions of the demo configs, for tests: seconds of training on agri_synthetic/small.

  python launch.py --config tests/tiny_config.py:kind=clip --workdir /tmp/tiny
"""

from agriclip_jax import config_lib
from agriclip_jax.evaluators import base as evaluators
from configs import agriclip
from configs import eval_suite
from configs import alive_clip
from configs import alive_dino
from configs import alive_lit
from configs import alive_ssl_contrastive
from configs import image_pretrain

TOWER = dict(width=32, depth=1, mlp_dim=64, num_heads=2)


def get_config(arg=None):
  options = config_lib.parse_arg(arg, kind="clip", steps=12)
  if options.kind == "clip":
    config = alive_clip.get_config("demo")
  elif options.kind == "lit":
    config = alive_lit.get_config("demo")
    config.requires = [dict(workdir="{workdir}/image_tower",
                            config="tests/tiny_config.py:kind=pretrain")]
  elif options.kind == "lit_imported":  # Locks the tower of --config.init.img.path (timm form).
    config = alive_lit.get_config("demo")
    config.requires = []
    config.init.workdir = ""
    config.model.img.update(preset="timm", pool_type="tok")
  elif options.kind == "lit_resnet":  # Locks a ResNet-18 (--config.init.img.path).
    config = alive_lit.get_config("demo")
    config.requires = []
    config.init.workdir = ""
    alive_lit.lock_imported_tower(config, "resnet", "resnet18", head=True)
  elif options.kind in ("clip_form", "siglip_form"):  # Towers transformers' CLIP / SigLIP hold.
    family = options.kind.split("_")[0]
    config = alive_clip.get_config("demo,loss=" + ("sigmoid" if family == "siglip" else "softmax"))
    config.model.img = dict(preset=family, head=family == "clip")
    config.model.txt = dict(preset=family, head=True)
  elif options.kind == "pretrain":
    config = image_pretrain.get_config("demo")
  elif options.kind == "dino":
    config = alive_dino.get_config("demo")
  elif options.kind == "joint":
    config = alive_ssl_contrastive.get_config("demo")
  elif options.kind == "eval":  # Checkpoints are set by the test.
    config = eval_suite.get_config("demo")
    config.input.dataset = "agri_synthetic/small"
    config.input.batch_size = 32
    config.datasets.test.taxonomy_prompts = True
    config.datasets.test.max_train_examples = 360
    # A downstream task: no captions, no taxonomy (its fixture is prepared by the test).
    config.datasets.cows = eval_suite.eval_trainer.dataset_entry(
        dataset="agri_downstream/cow_breed", train_split="train")
    return config
  elif options.kind == "eval_heldout":  # Checkpoints are set by the test.
    config = eval_suite.get_config("demo")
    config.input.dataset = "agri_synthetic/small"
    config.input.batch_size = 32
    del config.datasets.test
    return config
  elif options.kind in ("align", "align_eval"):  # Reads tiny clip and dino runs beside it.
    config = agriclip.get_config("demo,stage=align")
    config.requires = [dict(workdir="{workdir}/../clip", config="tests/tiny_config.py:kind=clip"),
                       dict(workdir="{workdir}/../dino", config="tests/tiny_config.py:kind=dino")]
    if options.kind == "align_eval":
      config.requires = []
      config.align.aligner_workdir = "{workdir}/../align"
    config.input.dataset = "agri_synthetic/small"
    config.input.batch_size = 16
    config.eval_batch_size = 32
    return config
  elif options.kind == "mixture":  # The ALive and iNaturalist fixtures of test_builders.
    config = alive_clip.get_config("demo")
    config.input.mixture = [
        dict(dataset="alive", weight=1.0),
        dict(dataset="inaturalist2021_text", split="train_mini", weight=0.5, text_key="texts")]
    config.evals.heldout = evaluators.make("zeroshot", dataset="alive", split="train")
    config.evals.test = evaluators.make("zeroshot", dataset="inaturalist2021_text", split="val",
                             class_texts="lit_species")
  else:
    raise config_lib.ConfigError(f"unknown kind {options.kind!r}")
  if options.kind != "mixture":
    config.input.dataset = "agri_synthetic/small"
  config.input.image_size = 32
  config.input.batch_size = 16
  config.input.num_threads = 2
  config.eval_batch_size = 32
  if options.kind != "lit_resnet":
    config.model.img.update(TOWER, patch_size=8)
  if "dino" in config:
    config.dino.update(global_size=32, local_size=16, num_local=2)
    head = config.model.get("head") or config.model.get("dino_head")
    head.update(out_dim=64, hidden_dim=32, bottleneck_dim=16)
  if "txt" in config.model:
    config.model.txt.update(TOWER)
    config.model.out_dim = 32
    config.tokenizer.vocab_size = 300
    config.tokenizer.max_len = 16
  config.optim.warmup_steps = 2
  config.total_steps = options.steps
  config.log_every = 2
  config.eval_every = options.steps
  config.checkpoint_every = 4
  return config
