"""The text variant of the meta-learned LM objective (Shen, §4.3): MLM against soft labels on a real
corpus, with labelled tasks from the offline data in place of SuperGLUE.

Text is WordPiece-tokenised with the offline MiniLM tokenizer and mapped onto a compact
vocabulary (the corpus's and tasks' most frequent pieces; the rest become [UNK]) so the
teacher's two heads and the soft-label distributions stay small. Unlabelled x_u are disjoint
windows ``[CLS0] ... [SEP]`` of the corpus. A labelled example is ``[CLS_task] sentence [SEP]``
whose output is its label token repeated over the input (§4.3). The teacher's outputs on
held-out windows are logged at every evaluation, so degeneration (their Table 3) is visible.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from metalm.teacher import objective as obj
from metalm.teacher.finetune import accuracy, finetune
from metalm.teacher.model import ModelSize, teacher_and_student
from metalm.teacher.pretrain import PAD, PretrainSettings, pretrain
from metalm.config import ConfigError
from metalm.files import write_text_atomic
from metalm.tasks.registry import get_task_spec
from metalm.tasks.spec import read_split

SPECIALS = ["[PAD]", "[SEP]", "[MASK]", "[CLS0]", "[CLS1]", "[UNK]"]
SEP, MASK, CLS0, CLS1, UNK = 1, 2, 3, 4, 5
TASKS = ("sst2", "subj")  # the default labelled tasks: registered names, read through the task registry


@dataclass(frozen=True)
class TextSize:
    """How big a text run is (their Tables 7-9 scaled to a shared CPU)."""

    name: str
    samples: int  # pre-training samples per method
    warmup: int
    train_examples: int  # labelled examples per task (pre-training tasks and fine-tuning)
    finetune_epochs: int
    vocab: int = 3000  # wordpieces kept
    length: int = 32
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    eval_examples: int = 400  # per task: half selects the fine-tuned epoch, half is scored
    seed: int = 0


TEXT_SIZES = {
    "default": TextSize("default", samples=4_000, warmup=10, train_examples=1000, finetune_epochs=3),
    "quick": TextSize("quick", samples=32, warmup=1, train_examples=32, finetune_epochs=1, vocab=500,
                      d_model=16, n_layer=1, n_head=2, eval_examples=40),
}


@dataclass(frozen=True)
class TextTask:
    """One labelled text task as model inputs (the ``finetune.Labelled`` protocol)."""

    inputs: Tensor  # (n, T) ids
    labels: Tensor  # (n,)
    label_ids: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def targets(self) -> Tensor:
        ids = torch.tensor(self.label_ids)[self.labels]  # (n,)
        return ids[:, None].expand_as(self.inputs).clone()  # padding positions carry no weight

    def subset(self, idx) -> "TextTask":
        return TextTask(self.inputs[idx], self.labels[idx], self.label_ids)


def read_task(root: Path, name: str, split: str, limit: int) -> tuple[list[str], list[int]]:
    """Up to ``limit`` sentences and label indices of a registered single-sentence classification
    task (read as ``metalm finetune`` reads it), in a fixed order that is the same for every method."""
    spec = get_task_spec(name)
    if spec.kind != "classification":
        raise ConfigError(f"lmtext: task {name} is {spec.kind}; Shen's text setting takes single-sentence "
                          "classification tasks (e.g. sst2, subj, mr, cr, polarity, twomoons)")
    records = read_split(spec, split, root=root)
    g = torch.Generator().manual_seed(0)  # a fixed sample, the same for every method
    order = torch.randperm(len(records), generator=g)[:limit].tolist()
    return [records[i]["text_a"] for i in order], [int(records[i]["label"]) for i in order]


class TextVocab:
    """Compact ids over WordPiece: specials, one [CLS] and one token per label of each task, then pieces."""

    def __init__(self, tokenizer, texts: list[str], *, tasks: dict[str, tuple[str, ...]], size: int):
        """``tasks``: task name -> its labels, in label order."""
        self.tokenizer = tokenizer
        self.names = list(SPECIALS)
        self.task_cls, self.label_ids = {}, {}
        for task, labels in tasks.items():
            self.task_cls[task] = len(self.names)
            self.label_ids[task] = tuple(len(self.names) + 1 + i for i in range(len(labels)))
            self.names += [f"[CLS_{task}]"] + [f"[{task}:{label}]" for label in labels]
        counts = Counter(piece for text in texts for piece in tokenizer.tokenize(text))
        self.first_piece = len(self.names)
        self.names += [piece for piece, _ in counts.most_common(size)]
        self.index = {piece: i for i, piece in enumerate(self.names) if i >= self.first_piece}

    @property
    def size(self) -> int:
        return len(self.names)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(piece, UNK) for piece in self.tokenizer.tokenize(text)]

    def decode(self, ids) -> str:
        pieces = [self.names[int(i)] for i in ids if int(i) != PAD]
        return self.tokenizer.convert_tokens_to_string(pieces)

    def scheme(self) -> obj.MaskingScheme:
        return obj.MaskingScheme(mask_id=MASK, cls_mlm=CLS1, content=(self.first_piece, self.size))


def corpus_windows(vocab: TextVocab, text: str, length: int) -> Tensor:
    """Disjoint windows ``[CLS0] pieces [SEP]`` of ``length`` ids: (N, length)."""
    ids = vocab.encode(text)
    body = length - 2
    n = len(ids) // body
    windows = torch.tensor(ids[: n * body]).view(n, body)
    return torch.cat([torch.full((n, 1), CLS0), windows, torch.full((n, 1), SEP)], dim=1)


def task_tensors(vocab: TextVocab, task: str, sentences: list[str], labels: list[int], length: int) -> TextTask:
    rows = torch.zeros(len(sentences), length, dtype=torch.long)
    for i, sentence in enumerate(sentences):
        ids = [vocab.task_cls[task]] + vocab.encode(sentence)[: length - 2] + [SEP]
        rows[i, : len(ids)] = torch.tensor(ids)
    return TextTask(rows, torch.tensor(labels), vocab.label_ids[task])


def teacher_outputs(teacher, vocab: TextVocab, x_u: Tensor) -> list[dict]:
    """The teacher's most likely x̂ and ŷ for each x_u (what the soft-label student is fed, argmaxed)."""
    teacher.eval()
    with torch.no_grad():
        logits = teacher(x_u, x_u != PAD)
    teacher.train()
    return [{"x_u": vocab.decode(a), "x_hat": " ".join(vocab.names[int(i)] for i in b),
             "y_hat": " ".join(vocab.names[int(i)] for i in c)}
            for a, b, c in zip(x_u, logits["input"].argmax(-1), logits["output"].argmax(-1))]


def run_text(size: TextSize, out: str | Path, *, data_root: str | Path, corpus: str | Path,
             methods: tuple[str, ...] = ("mlm", "soft"), tasks: tuple[str, ...] = TASKS,
             progress: bool = True) -> Path:
    """Pre-trains one student per method, fine-tunes it on every task, writes ``results.md``.

    ``tasks``: registered single-sentence classification tasks (labelled tasks of pre-training and
    the fine-tuning targets). Each method's result is ``<out>/runs/<method>.json``; a re-run skips
    those that exist and refuses a folder made with other tasks.
    """
    from metalm.models.encoder import load_tokenizer

    torch.manual_seed(size.seed)
    out, root = Path(out), Path(data_root)
    text = Path(corpus).read_text(encoding="utf-8")
    tasks = tuple(tasks)
    for path in sorted((out / "runs").glob("*.json")):
        made_with = tuple(json.loads(path.read_text()).get("tasks", TASKS))
        if made_with != tasks:
            raise ConfigError(f"{path}: made with tasks {list(made_with)}, not {list(tasks)}; use another --out")
    data = {t: {split: read_task(root, t, split, size.train_examples if split == "train" else size.eval_examples)
                for split in ("train", "dev")} for t in tasks}
    vocab = TextVocab(load_tokenizer("minilm"), [text] + [s for t in data.values() for s in t["train"][0]],
                      tasks={t: get_task_spec(t).labels for t in tasks}, size=size.vocab)
    windows = corpus_windows(vocab, text, size.length)
    held, unlabelled = windows[:64], windows[64:]
    held_out = obj.mask_tokens(held, vocab.scheme(), generator=torch.Generator().manual_seed(7))
    sets = {t: {s: task_tensors(vocab, t, *data[t][s], size.length) for s in ("train", "dev")} for t in tasks}
    model_size = ModelSize(vocab.size, n_layer=size.n_layer, d_model=size.d_model, d_ff=4 * size.d_model,
                           n_head=size.n_head, max_positions=size.length)
    for method in methods:
        path = out / "runs" / f"{method}.json"
        if path.exists():
            continue
        start = time.time()
        teacher, student = teacher_and_student(model_size, seed=size.seed)
        settings = PretrainSettings(method, samples=size.samples, warmup=size.warmup, meta_weight=10.0)
        log = None if method == "mlm" else (lambda step: teacher_outputs(teacher, vocab, held[:2]))
        pre = pretrain(settings, teacher, student, unlabelled, [(t["train"].inputs, t["train"].targets())
                                                                for t in sets.values()],
                       held_out, seed=size.seed, scheme=vocab.scheme(), log_samples=log)
        state = {k: v.clone() for k, v in student.state_dict().items()}
        scores = {}
        for name, t in sets.items():
            student.load_state_dict(state)
            half = len(t["dev"]) // 2
            val, test = t["dev"].subset(slice(0, half)), t["dev"].subset(slice(half, None))
            finetune(student, t["train"], val, epochs=size.finetune_epochs, batch_size=16, peak_lr=4e-3,
                     warmup=10, seed=size.seed)
            majority = float(torch.bincount(test.labels).max()) / len(test)
            scores[name] = {"accuracy": accuracy(student, test), "majority": majority, "n_test": len(test)}
        result = {"method": method, "tasks": list(tasks), "scores": scores, "final_mlm_loss": pre["curve"][-1]["mlm_loss"],
                  "mlm_curve": pre["curve"], "teacher_samples": pre["samples"], "size": asdict(size),
                  "vocab_size": vocab.size, "unlabelled_windows": len(unlabelled),
                  "seconds": round(time.time() - start, 1)}
        write_text_atomic(path, json.dumps(result, indent=1))
        if progress:
            print(f"{method}: " + ", ".join(f"{k} {100 * v['accuracy']:.1f}" for k, v in scores.items())
                  + f" ({result['seconds']:.0f}s)", flush=True)
    return write_text_report(out, size, corpus, tasks)


def write_text_report(out: Path, size: TextSize, corpus, tasks: tuple[str, ...] = TASKS) -> Path:
    results = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    tasks = list(tasks)
    lines = [f"## Meta LM on text: size {size.name}, corpus {Path(corpus).name}", "",
             "| method | " + " | ".join(f"{t} acc" for t in tasks) + " | student MLM loss |",
             "|---|" + "---|" * (len(tasks) + 1)]
    for r in results:
        lines.append(f"| {r['method']} | " + " | ".join(f"{100 * r['scores'][t]['accuracy']:.1f}" for t in tasks)
                     + f" | {r['final_mlm_loss']:.2f} |")
    if results:
        s = results[0]["scores"]
        lines.append("| majority class | " + " | ".join(f"{100 * s[t]['majority']:.1f}" for t in tasks) + " | |")
    lines += ["", f"{size.samples:,} pre-training samples per method (batch 4 x grad. accum. 4), "
              f"{size.train_examples} labelled examples per task, {size.finetune_epochs} fine-tuning epochs, "
              f"scored on {size.eval_examples // 2} held-out dev examples per task; one seed.", ""]
    for r in results:
        for entry in r["teacher_samples"]:
            lines += [f"### {r['method']} teacher after {entry['step']} optimizer steps", ""]
            for s in entry["samples"][:1]:
                lines += ["```", f"x_u : {s['x_u']}", f"x̂   : {s['x_hat']}", f"ŷ   : {s['y_hat']}", "```", ""]
    path = out / "results.md"
    write_text_atomic(path, "\n".join(lines))
    if results:
        from metalm.teacher.pictures import plot_mlm_curve

        plot_mlm_curve(results, out / "mlm_curve.png", title=f"Meta LM on text, size {size.name}")
    return path
