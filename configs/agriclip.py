"""AgriCLIP's pipeline: CLIP on ALive, DINO on ALive images, DINO -> CLIP alignment, eval.

The stages live side by side under one root R; each reads the previous stages' output there:

  python launch.py --config configs/agriclip.py:stage=clip  --workdir R/clip
  python launch.py --config configs/agriclip.py:stage=dino  --workdir R/dino
  python launch.py --config configs/agriclip.py:stage=align --workdir R/align
  python launch.py --config configs/agriclip.py:stage=eval  --workdir R/eval

A stage runs the stages it reads first if they are unfinished (config.requires), so the eval
stage alone runs everything. The demo does that on the synthetic dataset in minutes:

  python launch.py --config configs/agriclip.py:demo --workdir /tmp/agriclip/eval

  reaching, on the 12 held-out classes (chance 0.083), zero-shot top-1 over seeds 0 / 1 / 2:
  CLIP 0.922 / 0.903 / 0.925, AgriCLIP (image -> DINO -> aligner) 0.637 / 0.722 / 0.682, their
  mix 0.832 / 0.855 / 0.885; alignment R^2 0.785 / 0.804 / 0.778 on held-out images (6 min
  15 s on 2 CPU cores, every stage included; measured 2026-11-25 and 2026-11-27).

From pretrained weights, as published: CLIP fine-tuned from OpenAI's ViT-B/16 (a Hugging
Face `openai/clip-vit-base-patch16` directory, or open_clip's OpenAI `ViT-B-16` file), and a
pretrained DINO tower aligned instead of one trained here (facebookresearch/dino's
`dino_resnet50_pretrain.pth` — 2048-d features, what AgriCLIP's released aligners use — or
`dino_vitbase16_pretrain.pth`; any image checkpoint models/importers reads):

  python launch.py --config configs/agriclip.py:stage=eval,clip_init=/data/clip-vit-base-patch16,dino=/data/dino_resnet50_pretrain.pth \\
      --workdir R/eval

The demo on classes that differ in fine structure only (`agri_synthetic/fine`: marking shape
and density, outline; one colour distribution per subject), every stage on that dataset:

  python launch.py --config configs/agriclip.py:demo,dataset=agri_synthetic/fine --workdir F/eval

(F: a root of its own. A finished stage is used as it is, whatever config trained it, so a
root that already holds the default demo's stages would align their towers instead; the run
then warns, naming the fields in which the stage's stored config differs.)

Options: stage=clip|dino|align|eval (default eval), demo, dataset=<the demo's dataset>, tasks=<agri_downstream tasks the
eval stage scores, joined by +; default all of the registry>, clip_init=<CLIP checkpoint the
clip stage fine-tunes>, dino=<pretrained image checkpoint the align stage uses instead of the
dino stage> (paths without commas).
"""

from agriclip_jax import config_lib
from agriclip_jax.evaluators import base as evaluators
from agriclip_jax.trainers import align
from configs import alive_clip
from configs import alive_dino

STAGES = ("clip", "dino", "align", "eval")


def get_config(arg=None):
  options = config_lib.parse_arg(arg, stage="eval", demo=False, dataset="", tasks="",
                                 clip_init="", dino="")
  if options.dataset and not options.demo:
    raise config_lib.ConfigError("dataset= chooses the demo's dataset: add demo")
  config = _stage(options)
  if options.dataset:
    config.input.dataset = options.dataset
  return config


def _stage(options):
  if options.stage not in STAGES:
    raise config_lib.ConfigError(f"stage={options.stage!r}; expected one of {STAGES}")
  demo = "demo" if options.demo else None
  if options.stage == "clip":
    return alive_clip.get_config(
        demo if not options.clip_init else f"pretrained={options.clip_init}")
  if options.stage == "dino":
    return alive_dino.get_config(demo)
  config = align.default_config()
  this = "configs/agriclip.py:stage={}" + "".join(
      f",{k}={options[k]}" for k in ("clip_init", "dino", "dataset") if options[k])
  this += ",demo" if options.demo else ""
  if options.stage == "align":
    config.requires = [dict(workdir="{workdir}/../clip", config=this.format("clip"))]
    if not options.dino:
      config.requires.append(dict(workdir="{workdir}/../dino", config=this.format("dino")))
  else:  # eval: the align stage's aligner, on the evaluation datasets.
    config.requires = [dict(workdir="{workdir}/../align", config=this.format("align"))]
    config.align.aligner_workdir = "{workdir}/../align"
  if options.dino:  # A pretrained image tower (align and eval read it): nothing to train.
    config.align.dino_workdir = options.dino
  if options.demo:
    config.input.dataset = "agri_synthetic"
    config.input.batch_size = 64
    config.align.heldout_split = "test"
    config.evals.heldout = evaluators.make("zeroshot", split="heldout", classes="present")
    config.evals.test = evaluators.make("zeroshot", split="test", classes="present")
  else:
    config.input.dataset = "alive"
    config.input.batch_size = 256
    config.align.heldout_split = "validation"
    if options.stage == "eval":
      from data.agri_downstream import registry  # pylint: disable=g-import-not-at-top
      try:
        tasks = registry.select(options.tasks)
      except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
      for task in tasks:
        config.evals[task] = evaluators.make("zeroshot", dataset=f"agri_downstream/{task}",
                                             split="test")
    else:
      config.evals.val = evaluators.make("zeroshot", split="validation")
  return config
