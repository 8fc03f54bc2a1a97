"""The ALive, iNaturalist-2021 and downstream builders on generated raw files, feature by
feature; skips are counted and listed; malformed inputs name their file and line."""

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from agriclip_jax.input import datasets
from agriclip_jax.input import prepare
from data import builder_utils
from data.alive import alive_dataset_builder as alive_lib
from data.inaturalist2021_text import inaturalist2021_text_dataset_builder as inat_lib
import fixtures  # pylint: disable=wrong-import-order

PROMPTS = builder_utils.load_json(os.path.join(os.path.dirname(alive_lib.__file__),
                                               "prompts.json"))


def _examples(builder, split):
  source = datasets.data_source(builder, split)
  return [source[i] for i in range(len(source))]


def _decode(value):
  if isinstance(value, bytes):
    return value.decode()
  if isinstance(value, dict):
    return {k: _decode(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_decode(v) for v in value]
  return value


# ALive ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alive(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("alive"))
  raw = fixtures.write_alive(os.path.join(root, "raw"))
  builder, report = prepare.prepare("alive", os.path.join(root, "raw"), os.path.join(root, "tfds"))
  return builder, report, raw, os.path.join(root, "raw")


def expected_alive_captions(raw):
  prompts = alive_lib.Prompts(PROMPTS, None)
  captions = {path: prompts.captions(source, klass)
              for path, (source, klass) in raw["paths"].items()}
  for path, caption, _ in raw["rows"]:  # Table captions replace the generated ones.
    if path in captions:
      captions[path] = [c for p, c, _ in raw["rows"] if p == path]
  for path, (_, klass) in raw["paths"].items():
    captions[path] = captions[path] + raw["paraphrases"].get(klass, [])
  return captions


def test_alive_every_feature_of_every_image(alive):
  builder, _, raw, root = alive
  captions = expected_alive_captions(raw)
  seen = {}
  for split in builder.info.splits:
    for ex in _examples(builder, split):
      ex = _decode({k: v for k, v in ex.items() if k != "image"}) | {"image": ex["image"]}
      path = ex["image_path"]
      assert builder_utils.split_of(path, "validation", 0.02) == split
      source, klass = raw["paths"][path]
      assert ex["captions"] == captions[path], path
      assert (ex["class_name"], ex["source"]) == (klass, source)
      assert builder.info.features["label"].int2str(ex["label"]) == f"{klass} ({source})"
      with open(os.path.join(root, path), "rb") as f:
        assert ex["image"] == f.read()  # JPEG and PNG bytes are kept as they are.
      seen[path] = builder.info.features["domain"].int2str(ex["domain"])
  assert set(seen) == set(raw["paths"])
  assert seen["Cow Breed/Jersey/j1.png"] == "livestock"
  assert seen["Banana Deficiency/boron/b1.jpg"] == "crop"
  assert seen["Marché aux poissons (fish market)/Dorade grise/d1.jpg"] == "fish"  # guessed
  assert builder.info.features["label"].names == sorted(
      {f"{k} ({s})" for s, k in raw["paths"].values()})


def test_domain_is_guessed_from_whole_words():
  assert alive_lib.guess_domain("Marché aux poissons (fish market)") == "fish"
  assert alive_lib.guess_domain("Cow Breed") == "livestock"
  assert alive_lib.guess_domain("Horses of Spain") == "livestock"
  assert alive_lib.guess_domain("Cowpea Diseases") == "crop"  # not "cow"
  assert alive_lib.guess_domain("Deciduous trees") == "crop"  # not "cid"


def test_alive_prompt_strategy_and_paraphrases(alive):
  builder, _, _, _ = alive
  by_path = {}
  for split in builder.info.splits:
    for ex in _examples(builder, split):
      by_path[ex["image_path"].decode()] = _decode(ex["captions"])
  assert by_path["Banana Deficiency/boron/b2.jpg"] == [
      "a photo of a leaf with boron deficiency.",
      "a banana leaf lacking boron.",
      "a banana plant leaf with a boron deficiency.",
      "a photo of a leaf with boron deficiency, characterized by yellow patches and curled "
      "edges.",
      "banana leaves showing nutrient deficiencies: boron, with yellow patches and curled "
      "edges."]
  assert by_path["Banana Deficiency/healthy/h1.jpg"][-2:] == [
      "a banana leaf in perfect health", "a vigorous green banana leaf"]
  assert by_path["Cow Breed/Jersey/j1.png"] == [
      "A Jersey cattle, renowned for its rich, creamy milk.",
      "a photo of a cow from Jersey breed"]


def test_alive_skips_are_counted_and_listed(alive):
  builder, report, raw, root = alive
  assert report["skipped"]["missing file"]["count"] == 1
  missing = report["skipped"]["missing file"]["items"][0]
  assert missing["item"] == raw["missing"]
  assert missing["detail"] == os.path.join(root, "captions.csv") + ":5"
  assert [i["item"] for i in report["skipped"]["unreadable image"]["items"]] == [raw["corrupt"]]
  assert sum(report["examples"].values()) == len(raw["paths"])
  with open(os.path.join(builder.data_dir, builder_utils.REPORT_NAME)) as f:
    assert json.load(f) == report


def test_alive_ignores_macos_resource_forks_of_tables_and_images(tmp_path):
  raw = fixtures.write_alive(str(tmp_path / "raw"))
  for fork in ("._captions.csv", os.path.join("Cow Breed", "Jersey", "._j2.jpg")):
    (tmp_path / "raw" / fork).write_bytes(b"\x00\x05\x16\x07resource fork")
  _, report = prepare.prepare("alive", str(tmp_path / "raw"), str(tmp_path / "tfds"))
  assert [i["item"] for i in report["skipped"]["unreadable image"]["items"]] == [raw["corrupt"]]
  assert sum(report["examples"].values()) == len(raw["paths"])


def test_alive_malformed_or_mismatched_table_is_one_line(tmp_path):
  raw = tmp_path / "raw"
  fixtures.write_alive(str(raw))
  lines = (raw / "captions.csv").read_text(encoding="utf-8").splitlines()
  lines[2] += ",extra field"
  (raw / "captions.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
  with pytest.raises(builder_utils.InputError, match=r"captions.csv:3: 4 fields, the header "
                                                     r"has 3"):
    prepare.prepare("alive", str(raw), str(tmp_path / "tfds"))
  (raw / "captions.csv").write_text("path_to_img,words\nx.jpg,y\n")
  with pytest.raises(builder_utils.InputError, match=r"captions.csv:1: no image path column"):
    prepare.prepare("alive", str(raw), str(tmp_path / "tfds"))
  # The column names can be given instead (a new config name keeps the build apart).
  (raw / "captions.csv").write_text("path_to_img,words\nCow Breed/Jersey/j2.jpg,a cow\n")
  builder, _ = prepare.prepare("alive", str(raw), str(tmp_path / "tfds"),
                               ["image_column=path_to_img", "caption_column=words"])
  assert builder.info.full_name.startswith("alive/default_")  # Named after its options.
  again, _ = prepare.prepare("alive", str(raw), str(tmp_path / "tfds"),
                             ["image_column=path_to_img", "caption_column=words",
                              "validation_fraction=0.5"])
  assert again.info.full_name != builder.info.full_name  # Other options: another dataset.
  paths = {ex["image_path"]: _decode(ex["captions"]) for s in builder.info.splits
           for ex in _examples(builder, s)}
  assert paths[b"Cow Breed/Jersey/j2.jpg"] == ["a cow"]


def _captions_by_path(builder):
  return {_decode(ex["image_path"]): _decode(ex["captions"]) for s in builder.info.splits
          for ex in _examples(builder, s)}


def test_alive_reads_a_csv_with_a_utf8_byte_order_mark(tmp_path):
  raw = tmp_path / "raw"
  fixtures.write_alive(str(raw))
  text = (raw / "captions.csv").read_text(encoding="utf-8")
  (raw / "captions.csv").write_text(text, encoding="utf-8-sig")  # Excel's "CSV UTF-8".
  assert builder_utils.table_header(str(raw / "captions.csv"))[0] == "filepath"
  builder, _ = prepare.prepare("alive", str(raw), str(tmp_path / "tfds"))
  assert _captions_by_path(builder)["Banana Deficiency/boron/b1.jpg"] == [
      "une feuille de bananier carencée en bore"]
  # The column can also be named (a BOM would have made it "\ufefffilepath").
  builder, _ = prepare.prepare("alive", str(raw), str(tmp_path / "tfds"),
                               ["image_column=filepath"])
  assert "Banana Deficiency/boron/b1.jpg" in _captions_by_path(builder)


TSV_ROWS = [  # Captions that start with a quote, one never closed, and quotes inside.
    ("Cow Breed/Jersey/j1.png", '"Jersey" cattle, renowned for their milk'),
    ("Cow Breed/Jersey/j2.jpg", '"Best of breed: a Jersey cow'),  # Swallowed the next row.
    ("Banana Deficiency/boron/b1.jpg", 'a "boron" deficient leaf, 6" wide'),
    ("Banana Deficiency/boron/b2.jpg", "a leaf"),
]


def test_alive_reads_an_unquoted_tsv_verbatim(tmp_path):
  raw = tmp_path / "raw"
  fixtures.write_alive(str(raw))
  os.remove(raw / "captions.csv")
  lines = ["filepath\ttitle"] + [f"{path}\t{caption}" for path, caption in TSV_ROWS]
  (raw / "captions.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
  captions = _captions_by_path(prepare.prepare("alive", str(raw), str(tmp_path / "tfds"))[0])
  for path, caption in TSV_ROWS:  # No row swallowed by the first quote, no quote lost.
    assert captions[path] == [caption], path


def test_tables_quoted_throughout_are_unquoted_and_rows_over_several_lines_are_logged(
    tmp_path, monkeypatch):
  path = tmp_path / "quoted.tsv"
  path.write_text('"image"\t"caption"\n"a.jpg"\t"with\ta tab and ""quotes"""\n',
                  encoding="utf-8")
  assert [row for _, row in builder_utils.read_table(str(path))] == [
      {"image": "a.jpg", "caption": 'with\ta tab and "quotes"'}]
  warnings = []
  monkeypatch.setattr(builder_utils.logging, "warning", lambda *a: warnings.append(a[0] % a[1:]))
  path = tmp_path / "swallowed.csv"  # A quote opens a field that swallows the next rows.
  path.write_text('image,caption\na.jpg,"a 6\nb.jpg,x\nc.jpg,y" post\nd.jpg,z\n',
                  encoding="utf-8")
  assert [line for line, _ in builder_utils.read_table(str(path))] == [4, 5]
  assert warnings == [f"{path}: 4 lines after the header hold 2 rows: rows span lines 2-4 (a "
                      "quote opened a field that runs over line ends)"]


def test_tfds_cli_builds_alive(tmp_path):
  raw = tmp_path / "raw"
  fixtures.write_alive(str(raw))
  tfds_cli = os.path.join(os.path.dirname(sys.executable), "tfds")
  result = subprocess.run(
      [tfds_cli, "build", "data/alive", f"--manual_dir={raw}", f"--data_dir={tmp_path / 'out'}"],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
      text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  built = datasets.builder("alive", str(tmp_path / "out"), prepare=False)
  assert built.info.splits.total_num_examples == 6
  assert os.path.exists(os.path.join(built.data_dir, builder_utils.REPORT_NAME))
  assert any(f.endswith(".array_record-00000-of-00001") or ".array_record" in f
             for f in os.listdir(built.data_dir))


# iNaturalist-2021 -------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[False, True], ids=["folders", "archives"])
def inat(request, tmp_path_factory):
  root = str(tmp_path_factory.mktemp("inat"))
  expected = fixtures.write_inat(os.path.join(root, "raw"), archive=request.param)
  builder, report = prepare.prepare("inaturalist2021_text", os.path.join(root, "raw"),
                                    os.path.join(root, "tfds"))
  return builder, report, expected


def test_inat_every_feature_and_every_text_type(inat):
  builder, _, expected = inat
  categories = {c["id"]: c for c in fixtures.INAT_CATEGORIES}
  assert builder.info.features["label"].names == [c["name"] for c in fixtures.INAT_CATEGORIES]
  for split in ("train_mini", "val"):
    members = dict(expected[split]["members"])
    skipped = {expected[split]["missing"], expected[split]["corrupt"]}
    examples = _examples(builder, split)
    assert sorted(_decode(ex["file_name"]) for ex in examples) == sorted(set(members) - skipped)
    for ex in examples:
      category = members[_decode(ex["file_name"])]
      assert int(ex["label"]) == category["id"]
      taxonomy = _decode(ex["taxonomy"])
      for field in inat_lib.TAXONOMY_FIELDS:
        assert taxonomy[field] == (category.get(field) or ""), field
      scientific, genus = category["name"], category["genus"]
      common = category["common_name"] or scientific  # falls back to the scientific name
      ranks = " ".join(category[r] for r in inat_lib.RANKS)
      assert _decode(ex["texts"]) == {
          "scientific": f"a photo of {scientific}.",
          "common": f"a photo of {common}.",
          "taxonomic": f"a photo of {ranks}.",
          "scientific_common": f"a photo of {scientific} with common name {common}.",
          "taxonomic_common": f"a photo of {ranks} with common name {common}.",
          "lit_species": f"{common} {category['supercategory']} {genus}",
      }
  texts = builder.info.metadata["class_texts"]
  assert texts["lit_species"][2] == "Bolitoglossa mexicana Amphibians Bolitoglossa"
  assert texts["common"][3] == "grenouille de Lessona (pool frog)"
  del categories


def test_inat_skips_missing_and_corrupt_images(inat):
  _, report, expected = inat
  assert [i["item"] for i in report["skipped"]["missing file"]["items"]] == [
      expected["val"]["missing"]]
  assert [i["item"] for i in report["skipped"]["unreadable image"]["items"]] == [
      expected["train_mini"]["corrupt"]]
  assert report["examples"] == {"train_mini": 11, "val": 7}


def test_inat_malformed_json_names_file_and_line(tmp_path):
  fixtures.write_inat(str(tmp_path / "raw"))
  path = tmp_path / "raw" / "val.json"
  lines = path.read_text(encoding="utf-8").splitlines()
  broken = next(i for i, line in enumerate(lines) if '"file_name"' in line)
  lines[broken] = lines[broken].replace('"file_name"', "file_name")
  path.write_text("\n".join(lines), encoding="utf-8")
  with pytest.raises(builder_utils.InputError, match=rf"val.json:{broken + 1}:\d+: malformed "
                                                     "JSON"):
    prepare.prepare("inaturalist2021_text", str(tmp_path / "raw"), str(tmp_path / "tfds"))


def test_inat_malformed_records_are_skipped_one_line_each(tmp_path, caplog):
  raw = tmp_path / "raw"
  fixtures.write_inat(str(raw))
  val, train = json.loads((raw / "val.json").read_text()), json.loads(
      (raw / "train_mini.json").read_text())
  del val["annotations"][2]["image_id"]
  val["images"][5]["id"] = None
  val["annotations"][3]["category_id"] = 99
  train["images"][0] = "junk"
  first, second = val["images"][0], val["images"][1]
  val["images"] += [dict(first, id=9001), dict(second, file_name="val/elsewhere.jpg")]
  (raw / "val.json").write_text(json.dumps(val))
  (raw / "train_mini.json").write_text(json.dumps(train))
  with caplog.at_level(logging.WARNING):
    _, report = prepare.prepare("inaturalist2021_text", str(raw), str(tmp_path / "tfds"))
  repeated = [i["item"] for i in report["skipped"]["duplicate record"]["items"]]
  assert repeated == [f"{raw}/val.json images (id 9001, {first['file_name']!r})",
                      f"{raw}/val.json images (id {second['id']}, 'val/elsewhere.jpg')"]
  malformed = [(i["item"], i["detail"]) for i in report["skipped"]["malformed record"]["items"]]
  assert malformed == [
      (f"{raw}/train_mini.json images[0]", "not an object but str"),
      (f"{raw}/val.json images[5] (id None)", "'id' is None, not an integer"),
      (f"{raw}/val.json annotations[2] (id {val['annotations'][2]['id']})", "no 'image_id'")]
  for item, detail in malformed:
    assert f"{item}: {detail}; skipped" in caplog.text
  unknown = report["skipped"]["unknown category"]["items"]
  assert [i["item"] for i in unknown] == [val["images"][3]["file_name"]]
  assert report["examples"] == {"train_mini": 10, "val": 4}
  del val["categories"][1]["id"]
  (raw / "val.json").write_text(json.dumps(val))
  with pytest.raises(builder_utils.InputError, match=r"val.json categories\[1\]: category None "
                                                     r"lacks fields \['id'\]"):
    prepare.prepare("inaturalist2021_text", str(raw), str(tmp_path / "tfds2"))


def test_inat_archive_members_starting_with_dot_slash_match(tmp_path):
  fixtures.write_inat(str(tmp_path / "raw"), archive=True, member_prefix="./")
  _, report = prepare.prepare("inaturalist2021_text", str(tmp_path / "raw"),
                              str(tmp_path / "tfds"))
  assert report["examples"] == {"train_mini": 11, "val": 7}


def test_a_split_that_keeps_nothing_stops_in_one_line_naming_its_written_report(tmp_path):
  expected = fixtures.write_inat(str(tmp_path / "raw"))
  shutil.rmtree(tmp_path / "raw" / "val")  # val.json lists images that are not there.
  with pytest.raises(builder_utils.InputError, match="no val example kept") as failure:
    prepare.prepare("inaturalist2021_text", str(tmp_path / "raw"), str(tmp_path / "tfds"))
  message = str(failure.value)
  assert "\n" not in message and "incomplete" not in message
  report = builder_utils.load_json(message.rsplit("details in ", 1)[1])
  assert report["skipped"]["missing file"]["count"] == len(expected["val"]["members"])
  fixtures.write_inat(str(tmp_path / "raw"))  # Fixed: the build succeeds, the report goes.
  builder, report = prepare.prepare("inaturalist2021_text", str(tmp_path / "raw"),
                                    str(tmp_path / "tfds"))
  assert report["examples"] == {"train_mini": 11, "val": 7}
  assert os.listdir(os.path.dirname(builder.data_dir)) == [os.path.basename(builder.data_dir)]


def test_the_log_names_the_report_where_the_data_ends_up(tmp_path, caplog):
  fixtures.write_image_folder(str(tmp_path / "cows"), {"Jersey": 2, "Holstein": 2, "Gir": 2})
  with caplog.at_level(logging.INFO):
    builder, _ = prepare.prepare("agri_downstream/cow_breed", str(tmp_path / "cows"),
                                 str(tmp_path / "tfds"))
  path = os.path.join(builder.data_dir, builder_utils.REPORT_NAME)
  assert f"(details in {path})" in caplog.text and os.path.exists(path)


# Downstream tasks -------------------------------------------------------------------------


def test_downstream_split_folders_class_mapping_and_registry_order(tmp_path):
  raw = tmp_path / "banana"
  fixtures.write_image_folder(str(raw), {"boron": 3, "healthy": 2, "Zinc_def": 2},
                              splits=["train", "Test"])
  (raw / "classnames.json").write_text(json.dumps({"Zinc_def": "zinc"}))
  builder, report = prepare.prepare("agri_downstream/banana_deficiency", str(raw),
                                    str(tmp_path / "tfds"))
  names = builder.info.features["label"].names
  assert names == ["boron", "calcium", "healthy", "iron", "magnesium", "manganese",
                   "potassium", "sulphur", "zinc"]  # The registry's order.
  assert builder.info.metadata["prompt_templates"][0] == (
      "a photo of a banana leaf with {} deficiency.")
  for split, folder in (("train", "train"), ("test", "Test")):
    examples = {_decode(ex["image_path"]): ex for ex in _examples(builder, split)}
    assert sorted(examples) == sorted(
        os.path.join(folder, c, f"{k}.jpg")
        for c, n in {"boron": 3, "healthy": 2, "Zinc_def": 2}.items() for k in range(n))
    for path, ex in examples.items():
      klass = {"Zinc_def": "zinc"}.get(path.split("/")[1], path.split("/")[1])
      assert names[ex["label"]] == _decode(ex["class_name"]) == klass
  assert report["examples"] == {"train": 7, "test": 7}


def test_downstream_without_split_folders_hashes_a_test_split(tmp_path):
  paths = fixtures.write_image_folder(str(tmp_path / "cows"),
                                      {"Jersey": 10, "Holstein": 10, "Gir": 10})
  builder, _ = prepare.prepare("agri_downstream/cow_breed", str(tmp_path / "cows"),
                               str(tmp_path / "tfds"))
  test = sorted(_decode(ex["image_path"]) for ex in _examples(builder, "test"))
  assert test == sorted(p for p in paths if builder_utils.split_of(p, "test", 0.2) == "test")
  assert builder.info.splits["train"].num_examples + len(test) == 30
  assert builder.info.features["label"].names == ["Gir", "Holstein", "Jersey"]


def test_downstream_wrong_classes_are_one_line(tmp_path):
  fixtures.write_image_folder(str(tmp_path / "cows"), {"Jersey": 2, "Gir": 2})
  with pytest.raises(builder_utils.InputError, match="Cow Breed has 3 classes; the folders "
                                                     "give 2"):
    prepare.prepare("agri_downstream/cow_breed", str(tmp_path / "cows"), str(tmp_path / "t"))
  fixtures.write_image_folder(str(tmp_path / "banana"), {"boron": 2, "copper": 2})
  with pytest.raises(builder_utils.InputError, match=r"folders \['copper'\] are not among"):
    prepare.prepare("agri_downstream/banana_deficiency", str(tmp_path / "banana"),
                    str(tmp_path / "t"))


def _write_mac_debris(folder) -> None:
  """What a macOS zip and a notebook leave in a folder: a resource fork and a hidden folder."""
  (folder / "._0.jpg").write_bytes(b"\x00\x05\x16\x07resource fork")
  fixtures.write_image(str(folder / ".ipynb_checkpoints" / "0-checkpoint.jpg"), seed=7)


def test_downstream_ignores_hidden_entries_and_macos_zip_debris(tmp_path):
  raw = tmp_path / "cows"
  fixtures.write_image_folder(str(raw), {"Jersey": 2, "Holstein": 2, "Gir": 2},
                              splits=["train", "test"])
  _write_mac_debris(raw)
  _write_mac_debris(raw / "train" / "Jersey")
  (raw / "__MACOSX" / "train" / "Jersey").mkdir(parents=True)  # Beside train/ and test/.
  (raw / "__MACOSX" / "train" / "Jersey" / "._0.jpg").write_bytes(b"\x00\x05\x16\x07")
  builder, report = prepare.prepare("agri_downstream/cow_breed", str(raw), str(tmp_path / "t"))
  assert builder.info.features["label"].names == ["Gir", "Holstein", "Jersey"]
  assert report == {"examples": {"train": 6, "test": 6}, "skipped": {}}
  fixtures.write_image_folder(str(tmp_path / "flat"), {"Jersey": 3, "Holstein": 3, "Gir": 3})
  _write_mac_debris(tmp_path / "flat")  # Without split folders, .ipynb_checkpoints is no class.
  builder, report = prepare.prepare("agri_downstream/cow_breed", str(tmp_path / "flat"),
                                    str(tmp_path / "t2"))
  assert builder.info.features["label"].names == ["Gir", "Holstein", "Jersey"]
  assert sum(report["examples"].values()) == 9 and report["skipped"] == {}


def test_downstream_ambiguous_layout_and_empty_class_folder_are_one_line(tmp_path):
  raw = tmp_path / "animals"
  fixtures.write_image_folder(str(raw), {"cow": 2, "goat": 2}, splits=["train", "test"])
  (raw / "extra" / "cow").mkdir(parents=True)
  with pytest.raises(builder_utils.InputError, match=r"ambiguous layout: split folders "
                                                     r"\['test', 'train'\] beside \['extra'\]"):
    prepare.prepare("agri_downstream/animal_2", str(raw), str(tmp_path / "t"))
  fixtures.write_image_folder(str(tmp_path / "flat"), {"cow": 2, "goat": 2})
  (tmp_path / "flat" / "sheep").mkdir()
  with pytest.raises(builder_utils.InputError, match=r"class folders \['sheep'\] hold no image"):
    prepare.prepare("agri_downstream/animal_2", str(tmp_path / "flat"), str(tmp_path / "t"))


def test_registry_names_every_known_task():
  from data.agri_downstream import registry  # pylint: disable=g-import-not-at-top
  titles = {t.title for t in registry.TASKS}
  for title in ("Acquarium Fish", "Animal-2", "Banana Deficiency", "Bean Lesion",
                "Chicken Fecus", "CID", "Citrus Fruits", "Citrus Leaves", "Cow Breed",
                "DeepFish", "Fish Freshness", "Fish Species", "Fruits Diseases", "Horse Breed",
                "Supermarket Fish", "FishNet", "Soybean Weeds"):
    assert title in titles
  for task in registry.TASKS:
    assert all("{}" in t for t in task.templates), task.name
    assert task.domain in ("crop", "livestock", "fish")


def test_eval_suite_names_several_tasks_joined_by_plus():
  from configs import eval_suite  # pylint: disable=g-import-not-at-top
  config = eval_suite.get_config("tasks=cow_breed+banana_deficiency")
  assert sorted(config.datasets) == ["banana_deficiency", "cow_breed"]
  assert config.datasets.cow_breed.dataset == "agri_downstream/cow_breed"


# Shared helpers ---------------------------------------------------------------------------


def test_streaming_json_matches_json_module_including_errors(tmp_path):
  doc = {"info": {"a": [1, 2]}, "images": [{"id": i, "name": f"é{i}"} for i in range(300)],
         "empty": [], "n": 12345678901234567890}
  path = tmp_path / "x.json"
  path.write_text(json.dumps(doc, indent=1, ensure_ascii=False), encoding="utf-8")
  for chunk_size in (5, 64, 1 << 20):
    items = list(builder_utils.stream_json_object(str(path), chunk_size))
    assert [v for k, v in items if k == "images"] == doc["images"]
    assert ("n", doc["n"]) in items and ("info", doc["info"]) in items
  text = path.read_text(encoding="utf-8")
  for cut in (17, 500, 3000, len(text) - 2):  # Truncated files: same position as json's.
    path.write_text(text[:cut], encoding="utf-8")
    try:
      json.loads(text[:cut])
    except json.JSONDecodeError as e:
      want = f":{e.lineno}:{e.colno}:"
    with pytest.raises(builder_utils.InputError) as error:
      list(builder_utils.stream_json_object(str(path), chunk_size=64))
    assert want in str(error.value), (cut, str(error.value))


def test_checked_image_rejects_truncated_and_converts_other_formats(tmp_path):
  data = fixtures.write_image(str(tmp_path / "a.jpg"), seed=0, size=(64, 48))
  assert builder_utils.checked_image(data) == data
  with pytest.raises(builder_utils.BadImage):
    builder_utils.checked_image(data[: len(data) // 2])
  bmp = fixtures.write_image(str(tmp_path / "a.bmp"), seed=1, fmt="BMP")
  png = builder_utils.checked_image(bmp)
  assert png.startswith(b"\x89PNG")
  np.testing.assert_array_equal(np.asarray(_open(png)), np.asarray(_open(bmp)))


def _write_unusual_images(root) -> dict:
  """Valid images a plain RGB decode gets wrong; returns path -> the RGB pixels to expect.

  Red left and blue right (an edge on the 16-pixel blocks JPEG encodes colour in), so turning
  and conversion can be checked pixel by pixel.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  pixels = np.zeros((32, 48, 3), np.uint8)
  pixels[:, :16] = (220, 30, 30)
  pixels[:, 16:] = (30, 30, 220)
  rgb = Image.fromarray(pixels)
  exif = Image.Exif()
  exif[builder_utils.EXIF_ORIENTATION] = 6  # Shown turned 90 degrees clockwise.
  rgba = rgb.convert("RGBA")
  rgba.paste((0, 0, 0, 0), (0, 0, 48, 8))  # The top rows transparent, black beneath.
  on_white = pixels.copy()
  on_white[:8] = 255
  grey = np.asarray(rgb.convert("L"))
  images = {  # class/file -> (image, save options, expected pixels)
      "Jersey/turned.jpg": (rgb, dict(exif=exif, quality=95), np.rot90(pixels, k=-1)),
      "Jersey/cmyk.jpg": (rgb.convert("CMYK"), dict(quality=95),
                          np.asarray(rgb.convert("CMYK").convert("RGB"))),
      "Holstein/rgba.png": (rgba, {}, on_white),
      "Holstein/la.png": (rgba.convert("LA"), {}, np.where(on_white == 255, 255, np.stack(
          [grey] * 3, -1))),
      "Gir/palette.png": (rgb.convert("P"), {}, np.asarray(rgb.convert("P").convert("RGB"))),
  }
  expected = {}
  for path, (image, options, want) in images.items():
    os.makedirs(os.path.join(root, os.path.dirname(path)), exist_ok=True)
    image.save(os.path.join(root, path), **options)
    expected[path] = want
  return expected


def test_builds_store_upright_rgb_images_as_the_feature_declares(tmp_path):
  expected = _write_unusual_images(str(tmp_path / "cows"))
  builder, report = prepare.prepare("agri_downstream/cow_breed", str(tmp_path / "cows"),
                                    str(tmp_path / "tfds"))
  assert not report["skipped"]
  seen = {}
  for split in builder.info.splits:
    source = builder.as_data_source(split=split)  # Plain TFDS decoding.
    for i in range(len(source)):
      seen[_decode(source[i]["image_path"])] = source[i]["image"]
  assert sorted(seen) == sorted(expected)
  for path, image in seen.items():
    assert image.shape == expected[path].shape, path  # 3 channels; the turned one 48x32.
    if path.endswith(".jpg"):  # Stored at quality 95; colour blurs a little at the edge.
      assert np.abs(image.astype(int) - expected[path]).mean() < 4, path
    else:
      np.testing.assert_array_equal(image, expected[path], err_msg=path)


def _open(data):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  return Image.open(io.BytesIO(data)).convert("RGB")


# Training on the prepared fixtures ----------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """One data dir holding the ALive, iNaturalist and cow-breed fixtures, prepared."""
  root = tmp_path_factory.mktemp("prepared")
  fixtures.write_alive(str(root / "alive"))
  fixtures.write_inat(str(root / "inat"), archive=True)
  fixtures.write_image_folder(str(root / "cows"), {"Jersey": 10, "Holstein": 10, "Gir": 10})
  data_dir = str(root / "tfds")
  for name, raw in (("alive", "alive"), ("inaturalist2021_text", "inat"),
                    ("agri_downstream/cow_breed", "cows")):
    prepare.prepare(name, str(root / raw), data_dir)
  return data_dir


@pytest.mark.parametrize("config,overrides", [
    ("kind=clip", ["--config.input.dataset=alive", "--config.evals.heldout.split=train",
                   "--config.evals.test.split=train"]),
    ("kind=clip", ["--config.input.dataset=inaturalist2021_text",
                   "--config.input.split=train_mini", "--config.input.text_key=texts",
                   "--config.evals.heldout.split=val",
                   "--config.evals.heldout.class_texts=lit_species",
                   "--config.evals.test.split=train_mini",
                   "--config.evals.test.templates=species"]),
    ("kind=pretrain", ["--config.input.dataset=agri_downstream/cow_breed"]),
    ("kind=mixture", ["--config.loss_targets=labels"]),
], ids=["alive", "inaturalist", "downstream", "mixture"])
def test_training_runs_on_each_prepared_dataset(prepared, tmp_path, config, overrides):
  from conftest import launch  # pylint: disable=g-import-not-at-top
  result = launch(str(tmp_path), f"tests/tiny_config.py:{config}", "--config.total_steps=6",
                  *overrides, data_dir=prepared)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "finished at step 6" in result.stdout
  with open(tmp_path / "summary.json") as f:
    summary = json.load(f)
  assert all(v == v for v in summary.values())  # no NaN
  if config == "kind=mixture":
    assert "alive/" in result.stderr and "inaturalist2021_text/" in result.stderr
    assert summary["test/num_classes"] == 4 and summary["heldout/num_examples"] == 6
    with open(tmp_path / "metrics.jsonl") as f:  # Labels reach the loss, datasets kept apart.
      fractions = [m["targets/same_label_fraction"] for m in map(json.loads, f)
                   if "targets/same_label_fraction" in m]
    assert fractions and all(0 <= x < 1 for x in fractions)


def test_bounded_memory_makes_tfds_spill_to_disk_past_its_cap(tmp_path):
  """`bounded_memory` sets a private TFDS setting (no public one exists; the version is
  pinned in requirements.txt): if an upgrade renames or stops reading it, this fails instead
  of builds silently holding 1 GB of examples again."""
  from tensorflow_datasets.core import shuffle as tfds_shuffle  # pylint: disable=g-import-not-at-top

  def shuffler_after(num_bytes):
    shuffler = tfds_shuffle.Shuffler(str(tmp_path), hash_salt="s", disable_shuffling=False)
    for i in range(num_bytes // 1000):
      shuffler.add(i, bytes(1000))
    return shuffler

  default = tfds_shuffle.MAX_MEM_BUFFER_SIZE
  with builder_utils.bounded_memory(10_000):
    assert len(shuffler_after(5_000).bucket_lengths) == 1  # Under the cap: in memory.
    spilled = shuffler_after(20_000)
    assert len(spilled.bucket_lengths) > 1 and sum(spilled.bucket_lengths) == 20
    assert list(tmp_path.glob("bucket_*.tmp"))  # On disk.
  assert tfds_shuffle.MAX_MEM_BUFFER_SIZE == default > 20_000  # Restored; it would not spill.
  assert len(shuffler_after(20_000).bucket_lengths) == 1
