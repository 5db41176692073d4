"""A loaded task: its spec plus tokenised splits, and what it takes to batch, score and subsample.

``load_task`` reads each split (from files or the Hub), tokenises it once through the Arrow
cache and returns a ``Task``. Losses and predictions dispatch on ``spec.kind``
(``metalm.tasks.kinds``); metrics come from ``metalm.tasks.metrics``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from metalm import config as cfg
from metalm.config import to_dict
from metalm.data.batching import Batch, collate
from metalm.data.cache import cache_key, cached_columns, file_digest
from metalm.data.columns import row_lengths
from metalm.data.sampling import StratumTooSmall, holdout, rows_digest, subsample
from metalm.data.tokenize import IGNORE_INDEX, tokenize_records
from metalm.tasks import metrics
from metalm.tasks.kinds import is_token_level
from metalm.tasks.spec import TaskSpec, read_split, resolve_path


@dataclass(frozen=True)
class Task:
    """A task ready for training: tokenised columns per split."""

    spec: TaskSpec
    splits: dict[str, dict[str, list]]
    pad_id: int
    rows_read: dict | None = None
    """When the training split is restricted to a cell's rows: {rows, of, indices_sha256}."""
    fingerprint: str | None = None
    """A digest of what the tokens came from (the spec, each file's bytes, the tokenizer and length);
    a resumed run refuses to continue on a task whose fingerprint changed."""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    def size(self, split: str = "train") -> int:
        return len(self._columns(split)["input_ids"])

    def batch(self, split: str, indices: Sequence[int]) -> Batch:
        return collate(self._columns(split), indices, pad_id=self.pad_id)

    def labels(self, split: str) -> list:
        return self._columns(split)["labels"]

    def lengths(self, split: str = "train") -> np.ndarray:
        """(rows,) tokens of every row of ``split`` (for length-grouped batches)."""
        return row_lengths(self._columns(split)["input_ids"])

    def held_out_split(self) -> str:
        """``validation`` when loaded, else ``selection`` (a target's rows held out of a stage's cell),
        else the spec's first non-empty eval split, else ``train``."""
        for split in ("validation", "selection", *self.spec.eval_splits):
            if split in self.splits and self.size(split) > 0:
                return split
        return "train"

    def _columns(self, split: str) -> dict[str, list]:
        if split not in self.splits:
            # a caller's mistake at run time, not a bad config
            raise LookupError(f"task {self.name}: split {split!r} is not loaded (have {sorted(self.splits)})")
        return self.splits[split]

    def score(self, predictions: list, references: list) -> dict[str, float]:
        """The spec's metrics; token tasks pass per-sentence lists of tag indices."""
        if self.kind == "token_classification":
            names = self.spec.labels
            predictions = [[names[t] for t in seq] for seq in predictions]
            references = [[names[t] for t in seq] for seq in references]
        return metrics.compute(self.spec.metrics, predictions, references)

    def training_rows(self, *, seed: int, fraction: float | None = None, per_class: int | None = None,
                      validation_fraction: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """(training rows, held-out rows) of a low-resource cell: a stratified, seeded subsample of
        the training split, less a stratified ``validation_fraction`` of it for model selection.

        A stage that lists a target and that target's fine-tune call this with the same arguments,
        so they read the same rows.
        """
        if fraction is None and per_class is None:
            fraction = 1.0
        keep = self._stratified_rows("train", seed=seed, fraction=fraction, per_class=per_class)
        return holdout(self._stratum_labels("train"), keep, fraction=validation_fraction, seed=seed, kind=self.kind)

    def _stratum_labels(self, split: str) -> list:
        return self._columns(split)["labels"] if not is_token_level(self.kind) else [0] * self.size(split)

    def _stratified_rows(self, split: str, *, seed: int, fraction: float | None, per_class: int | None):
        """Sorted rows of a stratified subsample; a bad budget is a ConfigError naming the task (and class)."""
        try:
            return subsample(self._stratum_labels(split), seed=seed, fraction=fraction, per_class=per_class,
                             kind=self.kind)
        except StratumTooSmall as err:
            examples = "training examples" if split == "train" else f"{split} examples"
            stratum = err.stratum
            if isinstance(err.label, int) and self.spec.labels and 0 <= err.label < len(self.spec.labels):
                stratum = f"class {self.spec.labels[err.label]!r}"
            raise cfg.ConfigError(f"task {self.name}: per_class {err.per_class} is more than the {err.size} "
                                  f"{examples} of {stratum}") from err
        except ValueError as err:
            raise cfg.ConfigError(f"task {self.name}: {err}") from err

    def restricted(self, rows: Sequence[int], *, selection: Sequence[int] = ()) -> "Task":
        """The same task training on ``rows`` of its training split only; ``selection`` rows of the
        training split become a ``selection`` split (model selection, never reported)."""
        columns = self._columns("train")
        read = {"rows": len(rows), "of": self.size("train"), "indices_sha256": rows_digest(rows)}
        if not len(selection) and len(rows) == self.size("train") and np.array_equal(rows, np.arange(len(rows))):
            return replace(self, rows_read=read)  # every row, in order: no copy of the columns
        splits = {**self.splits, "train": _rows_of(columns, rows)}
        if len(selection):
            splits["selection"] = _rows_of(columns, selection)
        return replace(self, splits=splits, rows_read=read)

    def training_rows_read(self) -> dict:
        """Which rows of the training split this task trains on: {rows, of, indices_sha256}."""
        if self.rows_read is not None:
            return self.rows_read
        n = self.size("train")
        return {"rows": n, "of": n, "indices_sha256": rows_digest(range(n))}

    def subsampled(self, *, seed: int, fraction: float | None = None, per_class: int | None = None,
                   split: str = "train") -> "Task":
        """The same task with a stratified, seeded subsample of one split.

        Raises:
            ConfigError: ``per_class`` is more than a class has (naming the class), or
                ``fraction`` / ``per_class`` is out of range.
        """
        keep = self._stratified_rows(split, seed=seed, fraction=fraction, per_class=per_class)
        return replace(self, splits={**self.splits, split: _rows_of(self._columns(split), keep)})


def _rows_of(columns: dict[str, list], rows: Sequence[int]) -> dict[str, list]:
    """The given rows of every column, in that order."""
    return {key: [values[i] for i in rows] for key, values in columns.items()}


def load_task(spec: TaskSpec, tokenizer, *, root: str | Path, glue: str | Path | None = None,
              source: str = "files", cache_dir: str | Path | None = None, max_length: int = 128,
              splits: Sequence[str] | None = None) -> Task:
    """Reads, checks and tokenises the task's splits (cached by content).

    Args:
        spec: the task.
        tokenizer: a Hugging Face tokenizer.
        root: data root, expanded for ``{root}`` in file paths.
        glue: GLUE folder (``{root}/glue`` when None).
        source: ``files`` or ``hub``.
        cache_dir: Arrow cache folder, or None for no cache.
        max_length: truncation length in tokens.
        splits: which splits to load (all of the spec's by default).
    """
    wanted = tuple(splits) if splits is not None else spec.splits
    tok_id = tokenizer_fingerprint(tokenizer)
    loaded, keys = {}, []
    for split in wanted:
        key = {"spec": _tokenized_spec(spec), "split": split, "source": source, "tokenizer": tok_id,
               "max_length": max_length, "files": _digests(spec, root, glue, source)}
        keys.append(key)

        def build(split=split):
            records = read_split(spec, split, root=root, glue=glue, source=source)
            return tokenize_records(records, tokenizer, max_length=max_length,
                                    token_level=is_token_level(spec.kind), desc=f"{spec.name}/{split}",
                                    separate_pair=spec.pair_encoding == "bi")

        loaded[split] = cached_columns(key, build, cache_dir)
    return Task(spec=spec, splits=loaded, pad_id=tokenizer.pad_token_id or 0,
                fingerprint=cache_key({"task": spec.name, "splits": keys}))


def _tokenized_spec(spec: TaskSpec) -> dict:
    """The spec as the cache key sees it: head options leave the tokens alone, and a cross-encoded
    pair keeps the key it had before ``pair_encoding`` existed."""
    key = {k: v for k, v in to_dict(spec).items() if k not in ("head", "cosine_scale")
           and not (k in ("filter", "split_filters") and v is None)}  # keys from before filters existed
    if key.get("pair_encoding") == "cross":
        del key["pair_encoding"]
    return key


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of what the tokenizer does (vocabulary, normaliser, special tokens), not where it
    was loaded from: the same tokenizer saved beside each trained model shares cache entries."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)  # set by the last encode call, not part of what it does
        state.pop("padding", None)
        # The vocabulary (30k+ entries) as (token, id) pairs in id order: json.dumps(sort_keys=True)
        # of the whole state cost 0.15-0.4 s per load_task, a third of a cached SST-2 load.
        model = state.pop("model", {})
        vocab = model.pop("vocab", None) if isinstance(model, dict) else None
        if isinstance(vocab, dict):
            vocab = sorted(vocab.items(), key=lambda item: (item[1], item[0]))
        text = json.dumps([state, model], sort_keys=True) + json.dumps(vocab)
    else:  # slow tokenizers: the vocabulary and special tokens
        text = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens])
    extra = json.dumps([type(tokenizer).__name__, getattr(tokenizer, "init_kwargs", {}).get("do_lower_case")],
                       default=str)
    return hashlib.sha256((text + extra).encode()).hexdigest()


def _digests(spec: TaskSpec, root, glue, source) -> dict[str, str]:
    if source == "hub" or spec.format == "hub":
        return {}
    if spec.format == "twomoons":  # generated: the recipe and the codec's version stand for the file
        return {split: hashlib.sha256(f"twomoons-1:{recipe}".encode()).hexdigest() for split, recipe in spec.files.items()}
    digests = {}
    for split, template in spec.files.items():
        path = resolve_path(template, root=root, glue=glue)
        digests[split] = file_digest(path) if path.exists() else "missing"
    return digests


def gather_tokens(predictions: np.ndarray, labels: np.ndarray) -> tuple[list, list]:
    """Per-sentence tag sequences at labelled positions: predictions (B, T), labels (B, T)."""
    preds, refs = [], []
    for p_row, l_row in zip(predictions, labels):
        keep = l_row != IGNORE_INDEX
        preds.append(p_row[keep].tolist())
        refs.append(l_row[keep].tolist())
    return preds, refs
