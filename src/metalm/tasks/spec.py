"""What a task is, as data: where its files are, how to read them, its kind and metrics.

A ``TaskSpec`` is what a user writes in YAML for their own task, and what the built-in
registry holds for GLUE, minBERT, SentEval and WNUT-16. Paths may use ``{root}`` (the data
root) and ``{glue}`` (the GLUE folder, ``{root}/glue`` unless set).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from metalm import config as cfg
from metalm.data.errors import DataError
from metalm.data.hub import read_hub
from metalm.tasks.metrics import METRICS
from metalm.data.readers import (Record, label_parser, parse_twomoons_recipe, read_analogy, read_conll,
                                 read_delimited, read_fasttext, read_jsonl, read_twomoons)

Kind = Literal["classification", "pair_classification", "regression", "token_classification"]
Format = Literal["tsv", "csv", "jsonl", "conll", "fasttext", "analogy", "hub", "twomoons"]


@dataclass(frozen=True)
class HubSource:
    """Where the same task lives on the Hugging Face Hub."""

    path: str
    """Dataset id (``nyu-mll/glue``) or a builder name (``csv``, ``json``) for local files."""
    name: str | None = None
    """Dataset configuration (``rte``)."""
    splits: dict[str, str] = field(default_factory=dict)
    """Our split name -> the dataset's split name (``dev: validation``)."""
    columns: dict[str, str] | None = None
    """Column mapping on the Hub when it differs from the file columns."""
    data_files: dict[str, str] | None = None
    """For builder names: the dataset's split name -> local file."""
    revision: str | None = None


@dataclass(frozen=True)
class TaskSpec:
    """A labelled task: files, columns, kind, labels and metrics."""

    name: str
    """Unique name; also the name of the task's head."""
    kind: Kind
    """classification (one sentence), pair_classification, regression (pair scores), token_classification."""
    files: dict[str, str] = field(default_factory=dict)
    """Split name -> file path. ``all`` with ``split_ratios`` splits one file, seeded. Format
    ``twomoons``: split name -> the points to generate, ``"points=N noise=S seed=R"``."""
    format: Format = "tsv"
    """File format."""
    columns: dict[str, str | int] = field(default_factory=dict)
    """Record field (text_a, text_b, label) -> header name or 0-based column index."""
    header: bool = True
    """Whether delimited files start with a header line."""
    quoting: Literal["none", "csv"] = "none"
    """``none``: quotes are text (GLUE tsv); ``csv``: standard CSV quoting."""
    comment_prefix: str | None = None
    """Skip lines starting with this prefix."""
    skip_unlabelled: bool = False
    """Delimited files: drop rows whose label field is empty instead of failing on them."""
    allow_empty_text: bool = False
    """Accept rows whose text field is empty (an error otherwise: an empty text is usually a broken row)."""
    allow_extra_fields: bool = False
    """Delimited files with a header: accept rows with more fields than the header names."""
    filter: dict[str | int, str | tuple[str, ...]] | None = None
    """tsv / csv / jsonl: keep only the rows whose column (header name, JSON key, or 0-based index
    without a header) holds this value or one of these values, in every split; e.g. ``{lang: en}``."""
    split_filters: dict[str, dict[str | int, str | tuple[str, ...]]] | None = None
    """Split -> a filter as ``filter`` for that split alone, for one file that holds several splits
    in a column (``files: {train: all.tsv, dev: all.tsv}``, ``split_filters: {train: {subset: TRAIN},
    dev: {subset: DEV}}``)."""
    labels: tuple[str, ...] | None = None
    """Label names in index order (classification kinds)."""
    metrics: tuple[str, ...] = ("accuracy",)
    """Metrics to report, the first being the headline metric."""
    eval_splits: tuple[str, ...] = ("dev",)
    """Splits that evaluation reports by default."""
    split_ratios: dict[str, float] | None = None
    """For ``files: {all: ...}``: split name -> fraction (e.g. train 0.8, dev 0.2)."""
    split_seed: int = 0
    """Seed of that split."""
    hub: HubSource | None = None
    """The same task on the Hub (used when the data source is ``hub``)."""
    encoding: str = "utf-8"
    """Text encoding of the task's files."""
    description: str = ""
    pair_encoding: Literal["cross", "bi"] = "cross"
    """Tasks with two texts: cross, one sequence of both (a cross-encoder); bi, each text encoded and
    pooled on its own (a siamese bi-encoder) and the head reads the two embeddings (Xue §4.1):
    pair_classification from [u, v], regression as `cosine_scale` · relu(cos(W u, W v))."""
    head: Literal["linear", "mlp"] = "linear"
    """Sentence kinds: dropout + linear, or dropout + a 2-layer MLP with GELU (Xue's task heads)."""
    cosine_scale: float = 5.0
    """regression with pair_encoding bi: the label scale the cosine is stretched to (STS 0-5: 5)."""

    def __post_init__(self):
        if self.pair_encoding == "bi" and (self.kind not in ("pair_classification", "regression")
                                           or "text_b" not in self.columns):
            raise cfg.ConfigError(f"task {self.name}: pair_encoding bi needs kind pair_classification or "
                                  f"regression with columns.text_b, got kind {self.kind}")
        if self.head == "mlp" and self.kind == "token_classification":
            raise cfg.ConfigError(f"task {self.name}: head mlp applies to sentence kinds, not token_classification")
        if not self.cosine_scale > 0:
            raise cfg.ConfigError(f"task {self.name}: cosine_scale must be > 0, got {self.cosine_scale}")
        if self.kind in ("classification", "pair_classification", "token_classification") and not self.labels:
            raise cfg.ConfigError(f"task {self.name}: kind {self.kind} needs a list of labels")
        if self.kind != "token_classification" and self.format != "hub" and "text_a" not in self.columns \
                and self.format not in ("fasttext", "conll", "analogy", "twomoons"):
            raise cfg.ConfigError(f"task {self.name}: columns needs text_a")
        if self.kind == "pair_classification" and self.format not in ("hub", "analogy") \
                and "text_b" not in self.columns:
            raise cfg.ConfigError(f"task {self.name}: a pair task needs columns.text_b")
        if (self.filter or self.split_filters) and self.format not in ("tsv", "csv", "jsonl"):
            raise cfg.ConfigError(f"task {self.name}: filter and split_filters apply to tsv, csv and jsonl files, "
                                  f"not format {self.format}")
        unknown = sorted(set(self.split_filters or {}) - set(self.files))
        if unknown or (self.split_filters and self.split_ratios):
            raise cfg.ConfigError(f"task {self.name}: split_filters names "
                                  + (f"split(s) {unknown} that are not in files {sorted(self.files)}" if unknown else
                                     "splits of a file cut by split_ratios; use filter, which applies before the cut"))
        if self.format == "twomoons":
            if self.split_ratios or self.kind != "classification":
                raise cfg.ConfigError(f"task {self.name}: format twomoons gives each split its own points "
                                      "(no split_ratios) and is a classification task")
            for split, recipe in self.files.items():
                try:
                    parse_twomoons_recipe(recipe)
                except ValueError as err:
                    raise cfg.ConfigError(f"task {self.name}: files.{split}: {err}") from None
        if "all" in self.files and not self.split_ratios:
            raise cfg.ConfigError(f"task {self.name}: files.all needs split_ratios (e.g. train: 0.8, dev: 0.2)")
        for metric in self.metrics:
            if metric not in METRICS:
                close = cfg.closest(metric, METRICS)
                hint = f"did you mean {close!r}? " if close else ""
                raise cfg.ConfigError(f"task {self.name}: metric {metric!r} is not registered ({hint}known: "
                                      f"{', '.join(METRICS)})")
        if not self.metrics:
            raise cfg.ConfigError(f"task {self.name}: metrics is empty; give at least one (the first is the headline)")

    @property
    def num_labels(self) -> int:
        return 1 if self.kind == "regression" else len(self.labels or ())

    @property
    def splits(self) -> tuple[str, ...]:
        if self.split_ratios:
            return tuple(self.split_ratios)
        if self.format == "hub" and self.hub is not None:
            return tuple(self.hub.splits)
        return tuple(self.files)


def has_two_texts(spec: TaskSpec) -> bool:
    """Whether the task's examples are pairs of texts (``text_b`` in its file or Hub columns, or
    the analogy format's word pairs), which get ``encoder.pair_max_length`` tokens."""
    hub_columns = (spec.hub.columns or {}) if spec.hub is not None else {}
    return "text_b" in spec.columns or "text_b" in hub_columns or spec.format == "analogy"


def resolve_path(template: str, *, root: str | Path, glue: str | Path | None = None) -> Path:
    """Expands ``{root}``, ``{glue}`` and ``{gensim}`` (gensim's bundled test data) in a task file path;
    a path that is still relative is taken relative to the data root, as documented."""
    glue = glue if glue is not None else Path(root) / "glue"
    gensim = gensim_data_dir() if "{gensim}" in template else ""
    path = Path(template.format(root=root, glue=glue, gensim=gensim)).expanduser()
    base = Path(root).expanduser()
    if path.is_absolute() or "{root}" in template or "{glue}" in template or "{gensim}" in template:
        return path
    return base / path


def gensim_data_dir() -> Path:
    """The folder of English test data that ships inside the gensim package."""
    try:
        from gensim.test.utils import datapath
    except ImportError as err:
        raise RuntimeError("the embedded demo data needs `pip install gensim`") from err
    return Path(datapath("lee.cor")).parent


def read_split(spec: TaskSpec, split: str, *, root: str | Path, glue: str | Path | None = None,
               source: str = "files") -> list[Record]:
    """Reads one split of a task as records (no tokenisation)."""
    parse = _parser(spec)
    if source == "hub" or spec.format == "hub":
        if spec.hub is None:
            raise cfg.ConfigError(f"task {spec.name}: no Hub source is registered for it")
        hub = spec.hub
        if split not in hub.splits:
            raise cfg.ConfigError(f"task {spec.name}: no Hub split for {split!r} (have {sorted(hub.splits)})")
        return read_hub(hub.path, name=hub.name, split=hub.splits[split], columns=hub.columns or spec.columns,
                        parse_label=parse, data_files=hub.data_files, revision=hub.revision)
    if spec.split_ratios:
        parts = _split_file(spec, resolve_path(spec.files["all"], root=root, glue=glue))
        if split not in parts:
            raise cfg.ConfigError(f"task {spec.name}: unknown split {split!r} (have {sorted(parts)})")
        return parts[split]
    if split not in spec.files:
        raise cfg.ConfigError(f"task {spec.name}: unknown split {split!r} (have {sorted(spec.files)})")
    if spec.format == "twomoons":
        return read_twomoons(spec.files[split], parse_label=parse)
    return _read_file(spec, resolve_path(spec.files[split], root=root, glue=glue), parse, split=split)


_SPLIT_MEMO: dict[tuple, dict[str, list[Record]]] = {}


def _split_file(spec: TaskSpec, path: Path) -> dict[str, list[Record]]:
    """The parts of a one-file task, parsed once per file version (not once per split)."""
    stat = path.stat() if path.exists() else None
    key = (repr(spec), str(path), stat and (stat.st_mtime_ns, stat.st_size))
    if key not in _SPLIT_MEMO:
        records = _read_file(spec, path, _parser(spec))
        _SPLIT_MEMO.clear()  # keep only the latest file: enough for loading its splits in a row
        _SPLIT_MEMO[key] = split_records(records, spec.split_ratios, seed=spec.split_seed)
    return _SPLIT_MEMO[key]


def _parser(spec: TaskSpec):
    return label_parser("score" if spec.kind == "regression" else "class", spec.labels)


def row_filter(spec: TaskSpec, split: str | None) -> dict[str | int, frozenset[str]] | None:
    """Column -> the values a row may hold there, from ``filter`` and the split's ``split_filters``."""
    merged: dict[str | int, frozenset[str]] = {}
    for part in (spec.filter or {}, (spec.split_filters or {}).get(split, {}) if split else {}):
        for column, values in part.items():
            allowed = frozenset([values] if isinstance(values, str) else values)
            merged[column] = merged[column] & allowed if column in merged else allowed
    return merged or None


def _read_file(spec: TaskSpec, path: Path, parse, split: str | None = None) -> list[Record]:
    keep = row_filter(spec, split)
    if spec.format in ("tsv", "csv"):
        return read_delimited(path, columns=spec.columns, parse_label=parse,
                              delimiter="\t" if spec.format == "tsv" else ",", header=spec.header,
                              quoting=spec.quoting, comment_prefix=spec.comment_prefix, encoding=spec.encoding,
                              skip_unlabelled=spec.skip_unlabelled, allow_empty_text=spec.allow_empty_text,
                              allow_extra_fields=spec.allow_extra_fields, keep=keep)
    if spec.format == "jsonl":
        return read_jsonl(path, columns=spec.columns, parse_label=parse, encoding=spec.encoding, keep=keep)
    if spec.format == "conll":
        return read_conll(path, parse_label=parse, encoding=spec.encoding)
    if spec.format == "fasttext":
        return read_fasttext(path, parse_label=parse, encoding=spec.encoding)
    if spec.format == "analogy":
        return read_analogy(path, parse_label=parse, encoding=spec.encoding)
    raise DataError(path, None, None, "a known format", spec.format)


def split_records(records: list[Record], ratios: Mapping[str, float], *, seed: int) -> dict[str, list[Record]]:
    """Splits records into named parts by ratio, after a seeded shuffle (same on every run)."""
    import numpy as np

    total = sum(ratios.values())
    order = np.random.default_rng(seed).permutation(len(records))
    parts, start = {}, 0
    names = list(ratios)
    for i, name in enumerate(names):
        end = len(records) if i == len(names) - 1 else start + int(round(len(records) * ratios[name] / total))
        parts[name] = [records[j] for j in order[start:end]]
        start = end
    return parts


def load_spec_file(path: str | Path) -> TaskSpec:
    """Reads a user's task definition from YAML."""
    return cfg.parse(TaskSpec, cfg.read_yaml(path), where=str(path))


def spec_from_mapping(data: Mapping[str, Any], where: str = "task") -> TaskSpec:
    return cfg.parse(TaskSpec, dict(data), where=where)
