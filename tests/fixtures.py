"""Small raw datasets in their released formats, generated for tests and benchmarks.

Each writer returns what it put there, so tests can check every feature exactly.
"""

import csv
import io
import json
import os
import tarfile

import numpy as np
from PIL import Image


def write_image(path: str, seed: int, size=(40, 30), fmt: str | None = None) -> bytes:
  """A small random image; returns its bytes."""
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  buffer = io.BytesIO()
  fmt = fmt or ("PNG" if path.lower().endswith(".png") else "JPEG")
  Image.fromarray(pixels).save(buffer, format=fmt)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(buffer.getvalue())
  return buffer.getvalue()


def write_alive(root: str) -> dict:
  """An ALive-style manual dir: a folder tree, a captions CSV, paraphrases, and faults."""
  tree = {  # (source, class) -> image names
      ("Banana Deficiency", "boron"): ["b1.jpg", "b2.jpg"],
      ("Banana Deficiency", "healthy"): ["h1.jpg"],
      ("Cow Breed", "Jersey"): ["j1.png", "j2.jpg"],
      ("Marché aux poissons (fish market)", "Dorade grise"): ["d1.jpg"],  # not in prompts.json
  }
  paths = {}
  for i, ((source, klass), names) in enumerate(sorted(tree.items())):
    for j, name in enumerate(names):
      path = os.path.join(source, klass, name)
      write_image(os.path.join(root, path), seed=10 * i + j)
      paths[path] = (source, klass)
  corrupt = os.path.join("Cow Breed", "Jersey", "broken.jpg")
  data = write_image(os.path.join(root, corrupt), seed=99)
  with open(os.path.join(root, corrupt), "wb") as f:
    f.write(data[: len(data) // 3])  # truncated
  rows = [  # The table captions some images (two captions for j1), and names a missing file.
      ("Cow Breed/Jersey/j1.png", "A Jersey cattle, renowned for its rich, creamy milk.",
       "Jersey"),
      ("Cow Breed/Jersey/j1.png", "a photo of a cow from Jersey breed", "Jersey"),
      ("Banana Deficiency/boron/b1.jpg", "une feuille de bananier carencée en bore", "boron"),
      ("Cow Breed/Jersey/missing.jpg", "a cow that is not there", "Jersey"),
  ]
  with open(os.path.join(root, "captions.csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["filepath", "title", "specie_or_class"])
    writer.writerows(rows)
  paraphrases = {"healthy": ["a banana leaf in perfect health", "a vigorous green banana leaf"]}
  with open(os.path.join(root, "paraphrases.json"), "w", encoding="utf-8") as f:
    json.dump(paraphrases, f, ensure_ascii=False)
  return {"paths": paths, "corrupt": corrupt, "missing": "Cow Breed/Jersey/missing.jpg",
          "rows": rows, "paraphrases": paraphrases}


INAT_CATEGORIES = [
    dict(id=0, name="Danaus plexippus", common_name="monarch butterfly",
         supercategory="Insects", kingdom="Animalia", phylum="Arthropoda", **{
             "class": "Insecta"}, order="Lepidoptera", family="Nymphalidae", genus="Danaus",
         specific_epithet="plexippus",
         image_dir_name="00000_Animalia_Arthropoda_Insecta_Lepidoptera_Nymphalidae_Danaus_"
                        "plexippus"),
    dict(id=1, name="Quercus robur", common_name="pedunculate oak", supercategory="Plants",
         kingdom="Plantae", phylum="Tracheophyta", **{"class": "Magnoliopsida"},
         order="Fagales", family="Fagaceae", genus="Quercus", specific_epithet="robur",
         image_dir_name="00001_Plantae_Tracheophyta_Magnoliopsida_Fagales_Fagaceae_Quercus_"
                        "robur"),
    dict(id=2, name="Bolitoglossa mexicana", common_name="", supercategory="Amphibians",
         kingdom="Animalia", phylum="Chordata", **{"class": "Amphibia"}, order="Caudata",
         family="Plethodontidae", genus="Bolitoglossa", specific_epithet="mexicana",
         image_dir_name="00002_Animalia_Chordata_Amphibia_Caudata_Plethodontidae_"
                        "Bolitoglossa_mexicana"),
    dict(id=3, name="Pelophylax lessonae", common_name="grenouille de Lessona (pool frog)",
         supercategory="Amphibians", kingdom="Animalia", phylum="Chordata",
         **{"class": "Amphibia"}, order="Anura", family="Ranidae", genus="Pelophylax",
         specific_epithet="lessonae",
         image_dir_name="00003_Animalia_Chordata_Amphibia_Anura_Ranidae_Pelophylax_lessonae"),
]


def write_inat(root: str, archive: bool = False, member_prefix: str = "") -> dict:
  """iNaturalist-2021-format files: train_mini.json + val.json, images in folders (or a
  .tar.gz per split, its member names starting with `member_prefix`), one image missing and
  one corrupt."""
  expected = {}
  image_id = 0
  for split, per_class in (("train_mini", 3), ("val", 2)):
    images, annotations, members = [], [], []
    for category in INAT_CATEGORIES:
      for k in range(per_class):
        name = f"{split}/{category['image_dir_name']}/{image_id:05d}-{k}.jpg"
        images.append(dict(id=image_id, file_name=name, width=40, height=30))
        annotations.append(dict(id=image_id, image_id=image_id, category_id=category["id"]))
        members.append((name, category))
        image_id += 1
    staging = os.path.join(root, "_staging" if archive else "")
    for n, (name, category) in enumerate(members):
      if split == "val" and n == 1:
        continue  # Listed in val.json, but its file is missing.
      data = write_image(os.path.join(staging, name), seed=image_id + n)
      if split == "train_mini" and n == 4:
        with open(os.path.join(staging, name), "wb") as f:
          f.write(data[:50])  # Corrupt.
    if archive:
      with tarfile.open(os.path.join(root, f"{split}.tar.gz"), "w:gz") as tar:
        tar.add(os.path.join(staging, split), arcname=member_prefix + split)
    doc = dict(info={"year": 2021}, images=images, annotations=annotations,
               categories=INAT_CATEGORIES, licenses=[])
    with open(os.path.join(root, f"{split}.json"), "w", encoding="utf-8") as f:
      json.dump(doc, f, indent=1, ensure_ascii=False)
    expected[split] = {"members": members, "missing": members[1][0] if split == "val" else None,
                       "corrupt": members[4][0] if split == "train_mini" else None}
  return expected


def write_image_folder(root: str, classes: dict[str, int], splits=None, seed=0) -> list[str]:
  """`<split>/<class>/<image>` (or `<class>/<image>` without splits); returns the paths."""
  paths = []
  for split in splits or [""]:
    for c, (klass, count) in enumerate(sorted(classes.items())):
      for k in range(count):
        path = os.path.join(split, klass, f"{k}.jpg")
        write_image(os.path.join(root, path), seed=seed + 100 * c + k)
        paths.append(path)
  return paths
