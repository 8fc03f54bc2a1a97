"""Config arguments, validation against trainer fields, and the shipped configs."""

import glob

import numpy as np

import ml_collections
import pytest

from agriclip_jax import config_lib
from agriclip_jax import trainers


def test_parse_arg_types_and_errors():
  options = config_lib.parse_arg("demo,img=S/16,batch=32,lr=0.5", demo=False, img="B/16",
                                 batch=0, lr=1.0, name=None)
  assert options.demo is True and options.img == "S/16"
  assert options.batch == 32 and options.lr == 0.5 and options.name is None
  with pytest.raises(config_lib.ConfigError, match="unknown config option 'dmeo' "
                                                   r"\(did you mean 'demo'\?\)"):
    config_lib.parse_arg("dmeo", demo=False)
  with pytest.raises(config_lib.ConfigError, match="expects int"):
    config_lib.parse_arg("batch=big", batch=0)
  with pytest.raises(config_lib.ConfigError, match="needs a value"):
    config_lib.parse_arg("batch", batch=0)
  with pytest.raises(config_lib.ConfigError, match=r"unknown config option 'banana'; options: "
                     r".* \(it follows 'tasks=cow': options are split at "
                     r"commas, so a value cannot hold one; .* e.g. a\+b\)"):
    config_lib.load("configs/eval_suite.py:tasks=cow,banana")


def _demo():
  return config_lib.load("configs/alive_clip.py:demo")


def test_unknown_field_in_a_config_file_is_named():
  config = _demo()
  config.optim.lr_schedul = "cosine"  # A typo in a config file adds a new field.
  with pytest.raises(config_lib.ConfigError,
                     match=r"unknown config field 'optim.lr_schedul' \(did you mean"):
    trainers.validate(config)


def test_unknown_evaluator_field_and_type_are_named():
  config = _demo()
  config.evals.heldout.splt = "x"
  with pytest.raises(config_lib.ConfigError, match=r"'evals.heldout.splt' \(did you mean "
                                                   "'split'"):
    trainers.validate(config)
  config = _demo()
  config.evals.other = dict(type="zero_shot")
  with pytest.raises(config_lib.ConfigError, match="unknown evaluator type 'zero_shot'"):
    trainers.validate(config)


def test_unknown_trainer_and_override_field():
  config = ml_collections.ConfigDict(dict(trainer="dino_v9"))
  with pytest.raises(config_lib.ConfigError, match="unknown trainer 'dino_v9'"):
    trainers.validate(config)
  with pytest.raises(config_lib.ConfigError, match="'model.img.widht'"):
    config_lib.check_field(_demo(), "model.img.widht")
  config_lib.check_field(_demo(), "model.img.width")


def test_list_fields_parse_as_literals():
  assert config_lib.parse_list('[("data", -1), ("fsdp", 2)]') == [("data", -1), ("fsdp", 2)]
  assert config_lib.parse_list('(("data", -1),)') == [("data", -1)]
  for bad in ("[(data, 2)]", "data", "5", '[("data", -1)'):
    with pytest.raises(ValueError, match="expected a Python list literal"):
      config_lib.parse_list(bad)


def test_every():
  assert [s for s in range(1, 11) if config_lib.every(s, 4, total=10)] == [4, 8, 10]
  assert [s for s in range(1, 11) if config_lib.every(s, 0, total=10)] == [10]


def _config_files():
  for path in sorted(glob.glob("configs/*.py")):
    with open(path) as f:
      if "def get_config(" in f.read():
        yield path


@pytest.mark.parametrize("spec", sorted(
    [f"{path}:{arg}" for path in _config_files() if "inat21" not in path
     for arg in ("", "demo")]
    + ["configs/inat21_lit.py", "configs/inat21_lit.py:text=random,split=train_mini",
       "configs/alive_clip.py:inat=0.3", "configs/alive_lit.py:demo,inat=0.5"]
    + [f"configs/agriclip.py:stage={s}{d}" for s in ("clip", "dino", "align", "eval")
       for d in ("", ",demo")]
    + [f"tests/tiny_config.py:kind={k}" for k in ("clip", "lit", "pretrain", "mixture", "dino",
                                                  "joint", "align", "align_eval", "eval")]))
def test_shipped_configs_validate(spec):
  config = config_lib.load(spec.rstrip(":"))
  trainers.validate(config)
  assert config.total_steps > 0


def test_resuming_accepts_fields_added_to_the_code_since_but_not_changed_ones(tmp_path):
  from agriclip_jax.trainers import common  # pylint: disable=g-import-not-at-top
  (tmp_path / "checkpoints" / "4" / "state").mkdir(parents=True)
  stored = common.base_config()
  del stored.input["flip"]  # As if written before the field existed.
  (tmp_path / "config.json").write_text(stored.to_json_best_effort())
  config = common.base_config()
  common.save_config(config, str(tmp_path))  # The added field alone: resumes.
  config.total_steps = 7
  with pytest.raises(config_lib.ConfigError, match="total_steps: 1000 -> 7"):
    common.save_config(config, str(tmp_path))


def _abstract_params(config):
  """The parameter shapes of a config's model, as its trainer builds it (nothing allocated)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from agriclip_jax.models import classifier, dino, two_towers  # pylint: disable=g-import-not-at-top
  size = config.input.image_size
  if config.trainer in ("contrastive", "ssl_contrastive"):
    model = two_towers.make(config.model, vocab_size=config.tokenizer.vocab_size)
    args = (jnp.zeros((1, size, size, 3)), jnp.zeros((1, config.tokenizer.max_len), jnp.int32))
  elif config.trainer == "supervised":
    model, args = classifier.make(config.model, 1000), (jnp.zeros((1, size, size, 3)),)
  else:
    size = config.dino.global_size
    model, args = dino.make(config.model), (jnp.zeros((1, size, size, 3)),)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *args)["params"])


# Full-size recipes: (config, image tower size in millions of parameters as the ViT paper
# gives it (B/16: 86, L/16: 307), which parameters train).
RECIPES = [
    ("configs/alive_clip.py", 86, "all"),
    ("configs/alive_lit.py", 86, "lit"),
    ("configs/inat21_lit.py", 307, "lit"),
    ("configs/image_pretrain.py", 86, "all"),
    ("configs/alive_dino.py", 86, "all"),
    ("configs/alive_ssl_contrastive.py", 86, "all"),
]
@pytest.mark.parametrize("spec,millions,trains", RECIPES, ids=[r[0] for r in RECIPES])
def test_full_size_recipes_build_their_models_and_their_rules_fit(spec, millions, trains):
  from agriclip_jax import optim  # pylint: disable=g-import-not-at-top
  from agriclip_jax.pytree import flatten  # pylint: disable=g-import-not-at-top
  config = config_lib.load(spec)
  params = flatten(_abstract_params(config))
  image = sum(int(np.prod(v.shape)) for k, v in params.items() if k.startswith("img/"))
  assert image / 1e6 == pytest.approx(millions, rel=0.02)
  labels = optim.param_labels(params, config.optim.rules)
  frozen = sorted(k for k, label in labels.items() if label == optim.FROZEN)
  if trains == "all":
    assert not frozen
  else:  # LiT: the image trunk is locked, its head, the text tower and the scale train.
    assert frozen == sorted(k for k in params
                            if k.startswith("img/") and not k.startswith("img/head/"))
    assert any(k.startswith("img/head/") for k in params)


def test_a_finished_required_run_with_another_config_is_used_and_its_differences_named(
    tmp_path, monkeypatch, caplog):
  from agriclip_jax.trainers import common  # pylint: disable=g-import-not-at-top
  from agriclip_jax.trainers import loop  # pylint: disable=g-import-not-at-top
  name = "configs/agriclip.py:stage=clip,demo"
  required = config_lib.load(name)
  stored = config_lib.load(name + ",dataset=agri_synthetic/fine")
  stored.seed, stored.log_every = 1, 7  # log_every does not change what was trained.
  workdir = tmp_path / "clip"
  workdir.mkdir()
  (workdir / "config.json").write_text(stored.to_json_best_effort())
  finished = {}
  monkeypatch.setattr(loop, "finished_summary", lambda path, steps: finished.get(path))

  def warnings(config):
    caplog.clear()
    with caplog.at_level("WARNING"):
      common.warn_if_reused_with_another_config(config, str(workdir), name)
    return caplog.text

  assert not warnings(required)  # Unfinished: resuming compares the configs (save_config).
  finished[str(workdir)] = {"step": required.total_steps}
  text = warnings(required)
  assert f"Using the finished run in {workdir}" in text and name in text
  assert 'input.dataset: "agri_synthetic" -> "agri_synthetic/fine"' in text
  assert "seed: 0 -> 1" in text and "log_every" not in text
  assert not warnings(stored)
