"""Built-in tasks: GLUE, the minBERT files, SentEval and WNUT-16, with their layouts and metrics.

File paths follow the GLUE download script's layout under ``{glue}`` and the layouts
described in ``shared/data/README.md`` under ``{root}``. Each GLUE task also names its
Hub source (``nyu-mll/glue``), used with ``data.source=hub``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from metalm import config as cfg
from metalm.tasks.spec import HubSource, TaskSpec, load_spec_file, spec_from_mapping

BINARY = ("0", "1")
ENTAIL2 = ("entailment", "not_entailment")
WNUT_TYPES = ("company", "facility", "geo-loc", "movie", "musicartist", "other", "person", "product",
              "sportsteam", "tvshow")
WNUT_TAGS = ("O",) + tuple(f"{p}-{t}" for t in WNUT_TYPES for p in ("B", "I"))


def _glue_hub(name: str, columns: dict[str, str], splits: dict[str, str] | None = None) -> HubSource:
    return HubSource(path="nyu-mll/glue", name=name, columns=columns,
                     splits=splits or {"train": "train", "dev": "validation"})


def _glue(name, folder, *, kind, columns, labels, metrics, hub_cols, header=True, files=None,
          eval_splits=("dev",), hub_splits=None, description="") -> TaskSpec:
    files = files or {"train": f"{{glue}}/{folder}/train.tsv", "dev": f"{{glue}}/{folder}/dev.tsv"}
    return TaskSpec(name=name, kind=kind, files=files, format="tsv", columns=columns, header=header,
                    labels=labels, metrics=metrics, eval_splits=eval_splits,
                    hub=_glue_hub(name, hub_cols, hub_splits), description=description)


_PAIR_HUB = {"text_a": "sentence1", "text_b": "sentence2", "label": "label"}

_BUILTIN: list[TaskSpec] = [
    # --- GLUE (standard tsv layout) ---
    _glue("cola", "CoLA", kind="classification", header=False, columns={"text_a": 3, "label": 1},
          labels=BINARY, metrics=("matthews",), hub_cols={"text_a": "sentence", "label": "label"},
          description="CoLA: grammatical acceptability (Matthews corr.)"),
    _glue("sst2", "SST-2", kind="classification", columns={"text_a": "sentence", "label": "label"},
          labels=BINARY, metrics=("accuracy",), hub_cols={"text_a": "sentence", "label": "label"},
          files={s: f"{{glue}}/SST-2/{s}.tsv" for s in ("train", "dev", "test")},
          description="SST-2: binary sentiment"),
    _glue("mrpc", "MRPC", kind="pair_classification",
          columns={"text_a": "#1 String", "text_b": "#2 String", "label": "Quality"},
          labels=BINARY, metrics=("f1", "accuracy"), hub_cols=_PAIR_HUB,
          files={s: f"{{glue}}/MRPC/{s}.tsv" for s in ("train", "dev", "test")},
          description="MRPC: paraphrase (F1 / accuracy)"),
    _glue("stsb", "STS-B", kind="regression",
          columns={"text_a": "sentence1", "text_b": "sentence2", "label": "score"},
          labels=None, metrics=("pearson", "spearman"), hub_cols=_PAIR_HUB,
          files={s: f"{{glue}}/STS-B/{s}.tsv" for s in ("train", "dev", "test")},
          description="STS-B: similarity 0-5 (Pearson / Spearman)"),
    _glue("qqp", "QQP", kind="pair_classification",
          columns={"text_a": "question1", "text_b": "question2", "label": "is_duplicate"},
          labels=BINARY, metrics=("accuracy", "f1"),
          hub_cols={"text_a": "question1", "text_b": "question2", "label": "label"},
          description="QQP: question paraphrase (not available offline)"),
    _glue("mnli", "MNLI", kind="pair_classification",
          columns={"text_a": "sentence1", "text_b": "sentence2", "label": "gold_label"},
          labels=("contradiction", "entailment", "neutral"), metrics=("accuracy",),
          hub_cols={"text_a": "premise", "text_b": "hypothesis", "label": "label"},
          files={"train": "{glue}/MNLI/train.tsv", "dev_matched": "{glue}/MNLI/dev_matched.tsv",
                 "dev_mismatched": "{glue}/MNLI/dev_mismatched.tsv"},
          eval_splits=("dev_matched", "dev_mismatched"),
          hub_splits={"train": "train", "dev_matched": "validation_matched",
                      "dev_mismatched": "validation_mismatched"},
          description="MNLI: entailment, matched/mismatched dev (not available offline)"),
    _glue("qnli", "QNLI", kind="pair_classification",
          columns={"text_a": "question", "text_b": "sentence", "label": "label"},
          labels=ENTAIL2, metrics=("accuracy",),
          hub_cols={"text_a": "question", "text_b": "sentence", "label": "label"},
          description="QNLI: question answering entailment"),
    _glue("rte", "RTE", kind="pair_classification", columns=_PAIR_HUB, labels=ENTAIL2,
          metrics=("accuracy",), hub_cols=_PAIR_HUB, description="RTE: entailment"),
    _glue("wnli", "WNLI", kind="pair_classification", columns=_PAIR_HUB, labels=BINARY,
          metrics=("accuracy",), hub_cols=_PAIR_HUB, description="WNLI: Winograd entailment"),
    # Only QNLI's dev file is available offline: split it (seeded) into a small labelled pool.
    TaskSpec(name="qnli_dev", kind="pair_classification", files={"all": "{glue}/QNLI/dev.tsv"},
             columns={"text_a": "question", "text_b": "sentence", "label": "label"}, labels=ENTAIL2,
             metrics=("accuracy",), split_ratios={"train": 0.8, "dev": 0.2},
             description="QNLI dev.tsv split 80/20 (seed 0), for machines without QNLI train"),
    # --- minBERT (tab-separated with CSV quoting, despite the .csv name) ---
    TaskSpec(name="sst5", kind="classification", quoting="csv",
             files={"train": "{root}/minbert/ids-sst-train.csv", "dev": "{root}/minbert/ids-sst-dev.csv"},
             columns={"text_a": "sentence", "label": "sentiment"}, labels=("0", "1", "2", "3", "4"),
             metrics=("accuracy",), description="SST-5: five-class sentiment (minBERT files)"),
    # quora-dev.csv has 2 rows with an empty is_duplicate (minBERT's own reader skips them).
    TaskSpec(name="quora", kind="pair_classification", quoting="csv", skip_unlabelled=True,
             files={"all": "{root}/minbert/quora-dev.csv"},
             columns={"text_a": "sentence1", "text_b": "sentence2", "label": "is_duplicate"},
             labels=BINARY, metrics=("accuracy", "f1"),
             split_ratios={"train": 0.8, "dev": 0.1, "test": 0.1},
             description="Quora paraphrase (minBERT quora-dev.csv split 80/10/10, seed 0)"),
    TaskSpec(name="sts", kind="regression", quoting="csv",
             files={"train": "{root}/minbert/sts-train.csv", "dev": "{root}/minbert/sts-dev.csv"},
             columns={"text_a": "sentence1", "text_b": "sentence2", "label": "similarity"},
             metrics=("pearson", "spearman"), description="STS similarity 0-5 (minBERT files)"),
    TaskSpec(name="cfimdb", kind="classification", quoting="csv",
             files={"train": "{root}/minbert/ids-cfimdb-train.csv", "dev": "{root}/minbert/ids-cfimdb-dev.csv"},
             columns={"text_a": "sentence", "label": "sentiment"}, labels=BINARY, metrics=("accuracy",),
             description="CFIMDB binary movie-review sentiment (minBERT files)"),
    # --- WNUT-16 NER (token<TAB>tag, blank line between tweets; train only, split 80/20) ---
    TaskSpec(name="wnut16", kind="token_classification", format="conll",
             files={"all": "{root}/ner/wnut16_train.txt"}, labels=WNUT_TAGS, metrics=("entity_f1",),
             split_ratios={"train": 0.8, "dev": 0.2}, description="WNUT-16 NER, BIO tags (train split 80/20)"),
]

# --- SentEval (no header: label<TAB>sentence) ---
for _name in ("MR", "CR", "SUBJ", "MPQA"):
    _BUILTIN.append(TaskSpec(
        name=_name.lower(), kind="classification", header=False,
        files={s: f"{{root}}/senteval/{_name}/{s}.tsv" for s in ("train", "dev")},
        columns={"text_a": 1, "label": 0}, labels=BINARY, metrics=("accuracy",),
        allow_empty_text=_name == "CR",  # CR's train.tsv has one labelled row with no sentence (line 1763)
        description=f"SentEval {_name}: binary sentence classification"))

# STS-B as a bi-encoder: each sentence pooled on its own, scored as 5 x relu(cos) (Xue §4.1). For a
# mean-pooled sentence encoder such as MiniLM a cross-encoded fresh head starts far below the
# encoder's own zero-shot cosine, so low-resource STS-B studies use this form.
_BUILTIN.append(dataclasses.replace(
    next(spec for spec in _BUILTIN if spec.name == "stsb"), name="stsb_bi", pair_encoding="bi",
    description="STS-B as a bi-encoder: 5 x relu(cos) of the two pooled sentences (Pearson / Spearman)"))

REGISTRY: dict[str, TaskSpec] = {spec.name: spec for spec in _BUILTIN}


def get_task_spec(ref: str | TaskSpec | dict) -> TaskSpec:
    """A task spec from a registered name, a YAML file path, an inline mapping, or a spec."""
    if isinstance(ref, TaskSpec):
        return ref
    if isinstance(ref, dict):
        return spec_from_mapping(ref)
    if ref in REGISTRY:
        return REGISTRY[ref]
    if ref.endswith((".yaml", ".yml")) or Path(ref).is_file():
        return load_spec_file(ref)
    raise cfg.ConfigError(f"unknown task {ref!r}: not a registered task ({', '.join(sorted(REGISTRY))}) "
                          "nor a YAML task file")


# --- Embedded demo tasks: English data shipped inside the gensim package (no network, no shared/) ---
ANALOGY_RELATIONS = ("capital-common-countries", "capital-world", "currency", "city-in-state", "family",
                     "gram1-adjective-to-adverb", "gram2-opposite", "gram3-comparative", "gram4-superlative",
                     "gram5-present-participle", "gram6-nationality-adjective", "gram7-past-tense",
                     "gram8-plural", "gram9-plural-verbs")
_DEMO = [
    TaskSpec(name="polarity", kind="classification", format="fasttext",
             files={"all": "{gensim}/pang_lee_polarity.cor"}, labels=("neg", "pos"), metrics=("accuracy",),
             encoding="cp1252",
             split_ratios={"train": 0.5, "dev": 0.5},
             description="200 movie-review sentences (Pang & Lee), split 100/100; gensim test data"),
    TaskSpec(name="simlex", kind="regression", header=False, comment_prefix="#",
             files={"all": "{gensim}/simlex999.txt"}, columns={"text_a": 0, "text_b": 1, "label": 2},
             metrics=("spearman", "pearson"), split_ratios={"train": 0.8, "dev": 0.2},
             description="SimLex-999 word-pair similarity (0-10); gensim test data"),
    TaskSpec(name="wordsim", kind="regression", header=False, comment_prefix="#",
             files={"all": "{gensim}/wordsim353.tsv"}, columns={"text_a": 0, "text_b": 1, "label": 2},
             metrics=("spearman", "pearson"), split_ratios={"train": 0.8, "dev": 0.2},
             description="WordSim-353 word-pair relatedness (0-10); gensim test data"),
    TaskSpec(name="analogy", kind="pair_classification", format="analogy",
             files={"all": "{gensim}/questions-words.txt"}, labels=ANALOGY_RELATIONS,
             metrics=("accuracy", "macro_f1"), split_ratios={"train": 0.8, "dev": 0.2},
             description="relation of a word pair (14 classes) from word2vec's analogy questions; gensim test data"),
]
# Two Moons (Shen, §4.2) as a text task: each point's two grid coordinates as words, generated from
# the codec (no files). The test split is the 1000 points the Two Moons study scores.
_DEMO.append(TaskSpec(
    name="twomoons", kind="classification", format="twomoons", labels=BINARY, metrics=("accuracy",),
    files={"train": "points=1000 noise=0.1 seed=21", "dev": "points=200 noise=0.1 seed=31",
           "test": "points=1000 noise=0.1 seed=8"}, eval_splits=("dev", "test"),
    description="Two Moons points as 'x y' on a 64 x 64 grid (Shen §4.2), generated: 1000 train / 200 dev / 1000 test"))
REGISTRY.update({spec.name: spec for spec in _DEMO})
