"""alive: the ALive image-text dataset of AgriCLIP, from the user's copy of the release.

The manual directory (`--manual_dir`) holds either or both of:
- a captions table (CSV, or TSV by its suffix) with an image-path column, a caption column
  and optionally a class column (such as `specie_or_class`) and a source-dataset column;
  several rows may name one image, one caption each;
- a folder tree `<source dataset>/<class>/<image>` (images may sit deeper below the class).

An image keeps every caption the table gives it. An image without captions gets them from the
prompt strategy: dataset-level context + class-level templates from `prompts.json` (shipped
beside this file; a `prompts.json` in the manual directory extends it). `paraphrases.json` in
the manual directory (`{"class" or "source/class": [captions...]}`, e.g. written by an LLM)
adds its variants to every image of the class. The pipeline samples one caption per step.

Unreadable or corrupt images and table rows naming missing files are skipped, counted and
listed in `build_report.json` next to the prepared data. Train/validation membership is a
hash of the image path, so it never changes between builds.

Options are BuilderConfig fields, e.g.
`tfds build data/alive --manual_dir=DIR --config '{"name": "mine", "caption_column": "text"}'`
or `python -m agriclip_jax.input.prepare alive --manual_dir=DIR --option caption_column=text`.
"""

import dataclasses
import os
import re
import sqlite3

from absl import logging
import tensorflow_datasets as tfds

try:  # As data.alive inside the project; as alive under `tfds build data/alive`.
  from data import builder_utils
except ImportError:
  import builder_utils  # pylint: disable=import-error

IMAGE_COLUMNS = ("filepath", "image_path", "image", "path", "file_name", "filename", "file")
CAPTION_COLUMNS = ("title", "caption", "text", "captions", "prompt")
CLASS_COLUMNS = ("specie_or_class", "class", "class_name", "label", "species")
SOURCE_COLUMNS = ("source", "source_dataset", "dataset")
DOMAINS = ("crop", "livestock", "fish")
# Whole words (plural s allowed): "cowpea" and "deciduous" are not livestock.
_DOMAIN_WORDS = {
    "fish": re.compile(r"\b(fish(es)?|aquarium|acquarium|aquaculture|seafood|marine)s?\b"),
    "livestock": re.compile(r"\b(cows?|cattle|horses?|chickens?|poultry|goats?|sheep|pigs?|"
                            r"animals?|livestock|breeds?|feces|fecus|cid)\b"),
}


@dataclasses.dataclass
class AliveConfig(tfds.core.BuilderConfig):
  captions_file: str = ""  # "" = the single .csv/.tsv at the top of the manual dir, if any.
  images_dir: str = ""  # Root of the folder tree inside the manual dir ("" = the manual dir).
  image_column: str = ""  # "" = the first of IMAGE_COLUMNS in the header.
  caption_column: str = ""  # "" = the first of CAPTION_COLUMNS.
  class_column: str = ""  # "" = the first of CLASS_COLUMNS, if any.
  source_column: str = ""  # "" = the first of SOURCE_COLUMNS, if any.
  paraphrases_file: str = "paraphrases.json"
  prompts_file: str = "prompts.json"
  validation_fraction: float = 0.02


class Builder(builder_utils.ReportedBuild, tfds.core.GeneratorBasedBuilder):
  """ALive image-text pairs from the released captions table and/or folder tree."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [AliveConfig(name="default", description="Columns detected by name.")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Point --manual_dir at your copy of ALive: a captions CSV/TSV (image path + caption columns,
  optionally specie_or_class and source columns) and/or a <source>/<class>/<image> tree.
  """

  def __init__(self, **kwargs):
    kwargs["file_format"] = kwargs.get("file_format") or "array_record"  # Random access.
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "image_path": tfds.features.Text(),
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "label": tfds.features.ClassLabel(),  # Names are set from the data at build time.
            "class_name": tfds.features.Text(),
            "source": tfds.features.Text(),
            "domain": tfds.features.ClassLabel(names=DOMAINS),
        }),
        metadata=tfds.core.MetadataDict(prompt_templates=["a photo of {}."]),
    )

  def _split_generators(self, dl_manager):
    index = _Index(os.fspath(dl_manager.manual_dir), self.builder_config, self._scratch,
                   self._report)
    self.info.features["label"].names = sorted(
        {label_name(r["class_name"], r["source"]) for r in index.records()})
    fraction = self.builder_config.validation_fraction
    splits = {builder_utils.split_of(path, "validation", fraction) for path in index.paths()}
    if "validation" not in splits:
      logging.warning("alive: no image falls in the validation split (validation_fraction=%s)",
                      fraction)
    return {split: self._generate_examples(index, split) for split in sorted(splits)}

  def _generate_examples(self, index: "_Index", split: str):
    fraction = self.builder_config.validation_fraction
    label_of = {name: i for i, name in enumerate(self.info.features["label"].names)}
    for record in index.records():
      if builder_utils.split_of(record["path"], "validation", fraction) != split:
        continue
      try:
        image = builder_utils.read_image(index.absolute(record["path"]))
      except FileNotFoundError:
        self._report.skip(split, "missing file", record["path"], record["where"])
        continue
      except (OSError, builder_utils.BadImage) as e:
        self._report.skip(split, "unreadable image", record["path"], str(e))
        continue
      self._report.count(split)
      yield record["path"], {
          "image": image, "image_path": record["path"], "captions": record["captions"],
          "label": label_of[label_name(record["class_name"], record["source"])],
          "class_name": record["class_name"],
          "source": record["source"], "domain": record["domain"]}


def _pick_column(header: list[str], wanted: str, candidates, path: str, what: str,
                 required: bool) -> str | None:
  if wanted:
    if wanted not in header:
      raise builder_utils.InputError(f"{path}:1: no column {wanted!r} ({what}); the header "
                                     f"has {header}")
    return wanted
  lowered = {h.lower(): h for h in header}
  for name in candidates:
    if name in lowered:
      return lowered[name]
  if required:
    raise builder_utils.InputError(f"{path}:1: no {what} column (looked for {list(candidates)}; "
                                   f"the header has {header}); set the builder option")
  return None


def guess_domain(source: str) -> str:
  for domain, words in _DOMAIN_WORDS.items():
    if words.search(source.lower()):
      return domain
  return "crop"


def label_name(class_name: str, source: str) -> str:
  """Labels are (source, class) pairs: "healthy" leaves of two datasets are two classes."""
  return f"{class_name} ({source})" if source else class_name


class Prompts:
  """The prompt strategy: captions for an image of (source, class) from templates."""

  def __init__(self, shipped: dict, extra: dict | None):
    self.described = shipped["described_templates"]
    self.domains = shipped["domains"]
    self.sources = dict(shipped["sources"])
    for name, entry in ((extra or {}).get("sources") or {}).items():
      self.sources[name] = entry
    self.domains.update((extra or {}).get("domains") or {})

  def domain(self, source: str) -> str:
    domain = self.sources.get(source, {}).get("domain") or guess_domain(source)
    if domain not in DOMAINS:
      raise builder_utils.InputError(f"prompts: source {source!r} has domain {domain!r}; "
                                     f"expected one of {DOMAINS}")
    return domain

  def captions(self, source: str, class_name: str) -> list[str]:
    entry = self.sources.get(source) or self.domains[self.domain(source)]
    klass = entry.get("classes", {}).get(class_name, {})
    label = klass.get("name") or class_name.replace("_", " ").strip()
    fields = dict(label=label, context=entry.get("context", ""))
    templates = klass.get("templates") or entry.get("templates")
    if not templates:
      raise builder_utils.InputError(f"prompts: source {source!r} has no templates")
    out = [self._format(t, source, **fields) for t in templates]
    if klass.get("description"):
      described = out[0].rstrip(".")
      out += [self._format(t, source, described=described, description=klass["description"],
                           **fields) for t in self.described]
    return out

  @staticmethod
  def _format(template: str, source: str, **fields) -> str:
    try:
      return template.format(**fields)
    except (KeyError, IndexError) as e:
      raise builder_utils.InputError(
          f"prompts: template {template!r} (source {source!r}) uses {e}; templates may use "
          f"{sorted(fields)}") from None


class _Index:
  """The captions table and folder tree, joined by image path in an on-disk SQLite index."""

  def __init__(self, manual_dir: str, config: AliveConfig, scratch: str,
               report: builder_utils.Report):
    if not os.path.isdir(manual_dir):
      raise builder_utils.InputError(f"manual directory {manual_dir} does not exist")
    self.manual_dir = manual_dir
    self.report = report
    self.db = sqlite3.connect(os.path.join(scratch, "alive_index.sqlite"),
                              check_same_thread=False)
    self.db.execute("CREATE TABLE rows (path TEXT, caption TEXT, class TEXT, source TEXT, "
                    "line INTEGER)")
    self.db.execute("CREATE TABLE tree (path TEXT PRIMARY KEY, class TEXT, source TEXT)")
    self.table = self._captions_file(config)
    if self.table:
      self._load_table(config)
    self._load_tree(os.path.join(manual_dir, config.images_dir))
    self.db.execute("CREATE INDEX rows_path ON rows (path)")
    self.db.commit()
    shipped = builder_utils.load_json(os.path.join(os.path.dirname(__file__), "prompts.json"))
    self.prompts = Prompts(shipped, self._optional_json(config.prompts_file))
    self.paraphrases = self._optional_json(config.paraphrases_file) or {}
    if not isinstance(self.paraphrases, dict):
      raise builder_utils.InputError(f"{config.paraphrases_file}: expected an object mapping "
                                     "class names to lists of captions")
    if not next(self.paths(), None):
      raise builder_utils.InputError(f"{manual_dir}: no images found (no captions table and "
                                     "no image files)")

  def absolute(self, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(self.manual_dir, path)

  def _optional_json(self, name: str):
    path = os.path.join(self.manual_dir, name) if name else ""
    return builder_utils.load_json(path) if path and os.path.exists(path) else None

  def _captions_file(self, config: AliveConfig) -> str | None:
    if config.captions_file:
      path = os.path.join(self.manual_dir, config.captions_file)
      if not os.path.exists(path):
        raise builder_utils.InputError(f"captions file {path} does not exist")
      return path
    tables = sorted(f for f in os.listdir(self.manual_dir)
                    if f.lower().endswith((".csv", ".tsv")) and not builder_utils.is_hidden(f))
    if len(tables) > 1:
      raise builder_utils.InputError(f"{self.manual_dir} holds several tables {tables}; set "
                                     "the builder option captions_file")
    return os.path.join(self.manual_dir, tables[0]) if tables else None

  def _relative(self, path: str) -> str:
    path = os.path.normpath(path)
    if os.path.isabs(path):
      inside = os.path.relpath(path, self.manual_dir)
      return path if inside.startswith("..") else inside
    return path

  def _load_table(self, config: AliveConfig) -> None:
    header = builder_utils.table_header(self.table)
    pick = lambda wanted, names, what, required: _pick_column(
        header, wanted, names, self.table, what, required)
    image_col = pick(config.image_column, IMAGE_COLUMNS, "image path", True)
    caption_col = pick(config.caption_column, CAPTION_COLUMNS, "caption", True)
    class_col = pick(config.class_column, CLASS_COLUMNS, "class", False)
    source_col = pick(config.source_column, SOURCE_COLUMNS, "source", False)
    batch = []
    for line, row in builder_utils.read_table(self.table):
      path = self._relative(row[image_col].strip())
      if not path or path == ".":
        raise builder_utils.InputError(f"{self.table}:{line}: empty image path")
      parts = path.split(os.sep)
      klass = (row.get(class_col) or "").strip() if class_col else ""
      source = (row.get(source_col) or "").strip() if source_col else ""
      batch.append((path, row[caption_col].strip(),
                    klass or (parts[-2] if len(parts) >= 2 else "unknown"),
                    source or (parts[0] if len(parts) >= 3 else ""), line))
      if len(batch) >= 10_000:
        self.db.executemany("INSERT INTO rows VALUES (?, ?, ?, ?, ?)", batch)
        batch = []
    self.db.executemany("INSERT INTO rows VALUES (?, ?, ?, ?, ?)", batch)

  def _load_tree(self, root: str) -> None:
    if not os.path.isdir(root):
      raise builder_utils.InputError(f"images directory {root} does not exist")
    batch = []
    for relative in builder_utils.walk_images(root):
      path = os.path.normpath(os.path.relpath(os.path.join(root, relative), self.manual_dir))
      parts = os.path.relpath(os.path.join(root, relative), root).split(os.sep)
      source = parts[0] if len(parts) >= 3 else ""
      klass = parts[1] if len(parts) >= 3 else (parts[0] if len(parts) == 2 else "unknown")
      batch.append((path, klass, source))
      if len(batch) >= 10_000:
        self.db.executemany("INSERT OR IGNORE INTO tree VALUES (?, ?, ?)", batch)
        batch = []
    self.db.executemany("INSERT OR IGNORE INTO tree VALUES (?, ?, ?)", batch)

  def paths(self):
    for (path,) in self.db.execute("SELECT DISTINCT path FROM rows UNION SELECT path FROM tree"):
      yield path

  def records(self):
    """One dict per image: path, captions, class_name, source, domain, where (for reports)."""
    rows = self.db.execute("SELECT path, caption, class, source, line FROM rows "
                           "ORDER BY path, line")
    current, group = None, []
    for row in rows:
      if row[0] != current and group:
        yield self._record(group)
        group = []
      current = row[0]
      group.append(row)
    if group:
      yield self._record(group)
    tree_only = self.db.execute("SELECT path, class, source FROM tree WHERE path NOT IN "
                                "(SELECT path FROM rows) ORDER BY path")
    for path, klass, source in tree_only:
      yield self._finish(path, [], klass, source, f"folder tree: {path}")

  def _record(self, group):
    path, _, klass, source, line = group[0]
    captions = [caption for _, caption, _, _, _ in group if caption]
    return self._finish(path, captions, klass, source, f"{self.table}:{line}")

  def _finish(self, path, captions, klass, source, where):
    if not captions:
      captions = self.prompts.captions(source, klass)
    variants = self.paraphrases.get(f"{source}/{klass}") or self.paraphrases.get(klass) or []
    if not isinstance(variants, list):
      raise builder_utils.InputError(f"paraphrases for {klass!r} must be a list of captions")
    captions = list(dict.fromkeys(captions + [str(v) for v in variants]))
    return {"path": path, "captions": captions, "class_name": klass, "source": source,
            "domain": self.prompts.domain(source), "where": where}
