"""agri_synthetic builds and yields what it promises; missing datasets fail in one line."""

import io

import numpy as np
from PIL import Image
import pytest

from agriclip_jax.input import datasets
from data.agri_synthetic import fine
from data.agri_synthetic import spec as spec_lib


@pytest.fixture(scope="module")
def small(data_dir):
  return datasets.builder("agri_synthetic/small", data_dir)


def test_splits_and_sizes(small):
  classes = spec_lib.classes()
  held_out = [c for c in classes if c.held_out]
  assert len(classes) == 72 and len(held_out) == 12
  splits = small.info.splits
  assert splits["train"].num_examples == 60 * 12
  assert splits["test"].num_examples == 60 * 3
  assert splits["heldout"].num_examples == 12 * 4
  assert small.info.metadata["heldout_classes"] == [c.name for c in held_out]


def test_examples_have_every_promised_feature(small):
  classes = spec_lib.classes()
  for split in ("train", "heldout"):
    source = datasets.data_source(small, split)
    for i in range(0, len(source), 37):
      ex = source[i]
      spec = classes[ex["label"]]
      assert spec.held_out == (split == "heldout")
      image = np.asarray(Image.open(io.BytesIO(ex["image"])))
      assert image.shape == (64, 64, 3) and image.dtype == np.uint8
      captions = [c.decode() for c in ex["captions"]]
      assert len(captions) == len(spec_lib.CAPTION_TEMPLATES)
      for caption in captions:  # Every caption names the colour and the subject.
        assert spec.colour in caption and spec.subject in caption
      assert ex["class_name"].decode() == spec.name
      assert small.info.features["domain"].int2str(ex["domain"]) == spec.domain
      taxonomy = {k: v.decode() for k, v in ex["taxonomy"].items()}
      assert taxonomy == spec.taxonomy and set(taxonomy) == set(spec_lib.TAXONOMY_RANKS)
      assert ex["attributes"]["pattern"].decode() == spec.pattern


def test_taxonomy_nests():
  """Each taxon has a single parent, so rank-level accuracy is well defined."""
  parents = {}
  for spec in spec_lib.classes():
    ranks = [spec.taxonomy[r] for r in spec_lib.TAXONOMY_RANKS]
    for parent, child in zip(ranks, ranks[1:]):
      assert parents.setdefault(child, parent) == parent


def test_two_builds_are_identical_and_examples_differ(small, tmp_path):
  """A second build by a fresh builder in another directory gives
  byte-identical examples under the same ids, and no two examples share an image."""
  again = datasets.builder("agri_synthetic/small", str(tmp_path))
  for split in ("train", "heldout"):
    first, second = datasets.data_source(small, split), datasets.data_source(again, split)
    assert len(first) == len(second)
    by_id = {ex["id"]: ex for ex in (second[i] for i in range(len(second)))}
    images = set()
    for i in range(len(first)):
      ex = first[i]
      other = by_id[ex["id"]]
      assert ex["image"] == other["image"] and list(ex["captions"]) == list(other["captions"])
      images.add(ex["image"])
    assert len(images) == len(first)


def test_unknown_dataset_and_split_are_one_line_errors(small, tmp_path):
  with pytest.raises(datasets.DatasetError, match="unknown dataset 'no_such_set'"):
    datasets.builder("no_such_set", str(tmp_path))
  with pytest.raises(datasets.DatasetError, match="has no split 'validation'"):
    datasets.data_source(small, "validation")


MANUAL_BUILDER = """
import numpy as np
import tensorflow_datasets as tfds


class ManualOnly(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put the files in manual_dir."

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(
        {"x": tfds.features.Scalar(np.int32)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    yield 0, {"x": 0}
"""


def test_manual_dataset_not_prepared_says_how_to_prepare(tmp_path, monkeypatch):
  """A builder that needs the user's files (like ALive) is never built implicitly."""
  package = tmp_path / "manual_pkg"
  package.mkdir()
  (package / "__init__.py").write_text(MANUAL_BUILDER)
  monkeypatch.syspath_prepend(str(tmp_path))
  __import__("manual_pkg")
  with pytest.raises(datasets.DatasetError, match=r"not prepared .*agriclip_jax.input.prepare "
                                                  r"manual_only --manual_dir=.*tfds build "
                                                  r"data/manual_only --manual_dir="):
    datasets.builder("manual_only", str(tmp_path / "tfds"))
  assert not (tmp_path / "tfds" / "manual_only").exists()


def test_class_ids_from_names_and_id_ranges():
  names = ["wheat", "rice", "maize", "cow"]
  assert datasets.class_ids("0-2,3", names, "x") == [0, 1, 2, 3]
  assert datasets.class_ids("maize, cow", names, "x") == [2, 3]
  with pytest.raises(datasets.DatasetError, match=r"x: unknown classes \['oat'\]"):
    datasets.class_ids("oat,cow", names, "x")
  with pytest.raises(datasets.DatasetError, match=r"ids \[4\] are out of range"):
    datasets.class_ids("2-4", names, "x")


def test_training_on_a_class_subset_reads_only_its_examples(small, tmp_path):
  from agriclip_jax.trainers import common  # pylint: disable=g-import-not-at-top
  import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config.get_config("kind=clip")
  config.input.data_dir = small.data_dir
  config.input.classes = "0-4,7"
  setup = common.Setup.create(config, str(tmp_path))
  source = setup.sources[0][1]
  full = datasets.data_source(small, "train")
  labels = [int(full[i]["label"]) for i in range(len(full))]
  assert len(source) == sum(l in (0, 1, 2, 3, 4, 7) for l in labels) > 0
  chosen = {0, 1, 2, 3, 4, 7} & set(labels)  # Held-out classes have no training examples.
  assert {int(source[i]["label"]) for i in range(len(source))} == chosen and len(chosen) > 2


def test_a_builders_input_error_is_a_user_error_when_the_package_builds():
  from agriclip_jax import errors  # pylint: disable=g-import-not-at-top
  from data import builder_utils  # pylint: disable=g-import-not-at-top
  with pytest.raises(datasets.DatasetError, match=r"^alive: captions.csv:3: bad row$") as e:
    with datasets.building("alive"):
      raise builder_utils.InputError("captions.csv:3: bad row")
  assert isinstance(e.value, errors.USER_ERRORS)
  assert not isinstance(builder_utils.InputError("x"), errors.USER_ERRORS)  # Hence the wrap.


def test_fine_classes_share_colours_within_a_subject_and_differ_in_structure():
  """Two classes of one subject, rendered from the same generator state, differ only where
  their markings or outline do (a few percent of pixels): colour tells them nothing."""
  classes = fine.classes()
  held_out = [c for c in classes if c.held_out]
  assert len(classes) == 64 and len(held_out) == 12
  for attr in ("subject", "marking", "density", "edge"):  # Every word is seen in training.
    assert {getattr(c, attr) for c in held_out} <= {
        getattr(c, attr) for c in classes if not c.held_out}
  for subject in spec_lib.SUBJECTS:  # Naming a held-out class takes every kind of detail.
    mine = [c for c in held_out if c.subject == subject]
    assert {c.density for c in mine} == set(fine.DENSITIES), mine
    assert {c.edge for c in mine} == set(fine.EDGES), mine
  scene = dict(size="large", background="dark soil")
  render = lambda c, seed: fine.render_fine(c, scene, np.random.default_rng(seed))
  for seed in range(3):
    for subject in spec_lib.SUBJECTS:
      mine = [c for c in classes if c.subject == subject]
      first = render(mine[0], seed)
      for other in mine[1:]:
        differs = np.any(render(other, seed) != first, axis=-1).mean()
        assert 0 < differs < 0.2, (mine[0].name, other.name, differs)


def test_fine_config_builds_with_captions_naming_the_details(data_dir):
  builder = datasets.builder("agri_synthetic/fine_small", data_dir)
  classes = fine.classes()
  assert builder.info.splits["train"].num_examples == 52 * 12
  assert builder.info.splits["heldout"].num_examples == 12 * 4
  assert builder.info.metadata["heldout_classes"] == [c.name for c in classes if c.held_out]
  source = datasets.data_source(builder, "heldout")
  for i in range(0, len(source), 7):
    ex = source[i]
    spec = classes[ex["label"]]
    assert spec.held_out and ex["class_name"].decode() == spec.name
    assert {k: ex["attributes"][k].decode() for k in ("marking", "density", "edge")} == dict(
        marking=spec.marking, density=spec.density, edge=spec.edge)
    captions = [c.decode() for c in ex["captions"]]
    assert all(spec.subject in c for c in captions)
    # Each detail is named, by its class-name word or its phrase, in every caption but one.
    for words in ((spec.marking, fine.MARKINGS[spec.marking]),
                  (spec.density, fine.DENSITIES[spec.density]),
                  (spec.edge, fine.EDGES[spec.edge])):
      assert sum(any(w in c for w in words) for c in captions) >= len(captions) - 1, captions
