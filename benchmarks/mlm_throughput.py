"""MLM pre-training throughput: metalm's ``mlm`` objective and training loop against the Hugging Face
Trainer with ``DataCollatorForLanguageModeling``, on the same weights, sentences, batches and optimiser.

    python benchmarks/mlm_throughput.py [--quick] [--encoder minilm] [--batch 16] [--seq 128] [--steps 16] [--json out.json]

Both sides start from the same encoder weights (``load_encoder(--encoder)``, seeded; the Trainer's
``BertForMaskedLM`` gets the encoder's state dict, its prediction head tied to the word embeddings
as metalm's) and train on the same training sentences of the corpus (``--corpus``, default the
State of the Union folder, read and tokenised once through ``metalm.objectives.task.load_objective``):
metalm's ``BatchStream`` order is computed once and the Trainer reads the same rows in that order
(``train_sampling_strategy="sequential"``), so every step of both sides sees the same sentences,
padded to the longest in the batch, ``[CLS] ... [SEP]``, at most ``--seq`` tokens. Both mask 15% of
the non-special tokens (80% [MASK], 10% random, 10% kept), use fused AdamW (lr 5e-5, weight decay
0.01 off biases and LayerNorm, linear warm-up over 10% of the steps then decay), clip gradients at
norm 1 and run in fp32:

* **metalm**: ``metalm.train.loop.train_loop`` with the ``multitask`` algorithm over one ``mlm``
  objective (``ObjectiveTask``: its head projects only the masked positions onto the vocabulary);
* **Hugging Face**: ``transformers.Trainer`` on ``BertForMaskedLM`` with
  ``DataCollatorForLanguageModeling(mlm_probability=0.15)``, ``report_to="none"``, no evaluation,
  no saving, no logging, no progress bar;
* and both again on length-grouped batches: metalm's ``train.group_by_length``
  (``BatchStream`` with lengths: pools of 50 batches sorted by length, batches shuffled, as the
  Trainer's ``group_by_length`` sampler forms them), the Trainer reading the same batches.

Each row runs in its own fresh process (``_measure.run_fresh``), in ``--rounds`` rounds whose order
rotates. Tokens/s = non-padding input tokens (``attention_mask`` ones, [CLS] and
[SEP] included) of the timed steps / their wall time, from the end of the ``--warmup``-th step to
the end of the last (data loading, masking, forward, backward, clipping, optimiser and scheduler
steps all inside). Every step's token count is checked equal between metalm and the Trainer.
Target: metalm ≥ 1.8× the Trainer, on random and on length-grouped batches (``--sides`` picks rows).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PRELOAD = [*_measure.PRELOAD, "transformers.trainer", "transformers.data.data_collator", "metalm.train.loop",
           "metalm.objectives.task", "metalm.builders"]
SIDES = ("metalm", "hf_trainer", "metalm_grouped", "hf_grouped")
SIDE_NAMES = {"metalm": "metalm (mlm objective, train_loop)", "hf_trainer": "HF Trainer + DataCollatorForLanguageModeling",
              "metalm_grouped": "metalm, `train.group_by_length: true`",
              "hf_grouped": "HF Trainer on the same length-grouped batches"}
PAIRS = (("metalm", "hf_trainer"), ("metalm_grouped", "hf_grouped"))
LR, WEIGHT_DECAY, WARMUP_RATIO, MASK_PROB = 5e-5, 0.01, 0.1, 0.15


def _setup(cfg: dict):
    """Seeded MultiTaskModel with an ``mlm`` head, the mlm ObjectiveTask, and the device."""
    import torch

    from metalm.builders import add_heads, build_model, build_objectives
    from metalm.schema import CorpusConfig, DataConfig, EncoderConfig, ObjectiveConfig

    _measure.quiet_transformers()
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    model, tokenizer = build_model(EncoderConfig(name=cfg["encoder"]), seed=cfg["seed"])
    corpus = CorpusConfig(paths=(cfg["corpus"],), max_sentences=cfg["max_sentences"])
    tasks = build_objectives([ObjectiveConfig(objective="mlm", corpus=corpus, mask_prob=MASK_PROB)], tokenizer,
                             data=DataConfig(cache_dir=None), max_length=cfg["seq"], seed=cfg["seed"])
    add_heads(model, tasks, seed=cfg["seed"])
    return model, tokenizer, tasks["mlm"], torch.device(cfg["device"])


def _timed(stamps: list[float], tokens: list[int], warmup: int) -> dict:
    """Tokens/s over steps ``warmup+1..N`` from the end-of-step times and per-step token counts."""
    seconds = stamps[-1] - stamps[warmup - 1]
    timed_tokens = sum(tokens[warmup:len(stamps)])
    return {"tokens_per_s": timed_tokens / seconds, "seconds": seconds, "timed_tokens": timed_tokens,
            "step_time_s": seconds / (len(stamps) - warmup), "tokens": tokens[:len(stamps)],
            "steps": len(stamps)}


def run_metalm(cfg: dict) -> dict:
    """``train_loop`` over the mlm objective for ``steps`` steps; end-of-step times and tokens per step."""
    from metalm.builders import build_optimization
    from metalm.learn.algorithms import build_algorithm
    from metalm.learn.samplers import CategoricalSampler
    from metalm.schema import OptimConfig
    from metalm.train.loop import train_loop

    model, _, task, device = _setup(cfg)
    model.to(device)
    tokens, stamps = [], []
    batch = task.batch

    def counting(split, indices):
        out = batch(split, indices)
        if split == "train":
            tokens.append(int(out["attention_mask"].sum()))
        return out

    task.batch = counting
    optimizer, scheduler = build_optimization(model, OptimConfig(lr=LR, weight_decay=WEIGHT_DECAY,
                                                                 warmup_ratio=WARMUP_RATIO), steps=cfg["steps"])

    def on_step(done: int) -> None:
        _measure.synchronize(device)
        stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as run_dir:
        train_loop(model=model, tasks={"mlm": task}, algorithm=build_algorithm("multitask"),
                   sampler=CategoricalSampler({"mlm": 1.0}, seed=cfg["seed"]), optimizer=optimizer,
                   scheduler=scheduler, steps=cfg["steps"], batch_size=cfg["batch"], seed=cfg["seed"],
                   run_dir=run_dir, clip_norm=1.0, log_every=0, progress=False, tensorboard=False, on_step=on_step,
                   group_by_length=cfg["side"] == "metalm_grouped")
    return _timed(stamps, tokens, cfg["warmup"])


def run_hf_trainer(cfg: dict) -> dict:
    """``transformers.Trainer`` on ``BertForMaskedLM`` over the rows metalm's loop would draw, in its order."""
    import torch
    from transformers import (BertForMaskedLM, DataCollatorForLanguageModeling, Trainer, TrainerCallback,
                              TrainingArguments)
    from transformers.trainer_callback import PrinterCallback

    from metalm.train.loop import make_streams

    encoder_model, tokenizer, task, device = _setup(cfg)
    encoder = encoder_model.encoder
    torch.manual_seed(cfg["seed"])
    model = BertForMaskedLM(encoder.config)
    missing, unexpected = model.bert.load_state_dict(encoder.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise RuntimeError(f"encoder weights do not fit BertForMaskedLM: missing {missing}, unexpected {unexpected}")
    if model.cls.predictions.decoder.weight is not model.bert.embeddings.word_embeddings.weight:
        raise RuntimeError("BertForMaskedLM's decoder is not tied to the word embeddings")
    del encoder_model, encoder
    # The rows metalm's train_loop draws (the same seeded stream, length-grouped or not), in order.
    stream = make_streams({"mlm": task}, batch_size=cfg["batch"], seed=cfg["seed"],
                          group_by_length=cfg["side"] == "hf_grouped")["mlm"]
    ids, v = task.splits["train"]["ids"], task.vocab
    rows = [task.rows["train"][i] for _ in range(cfg["steps"]) for i in stream.next_indices()]
    examples = [{"input_ids": [v.cls_id] + list(ids[r][:cfg["seq"] - 2]) + [v.sep_id]} for r in rows]
    tokens, stamps = [], []

    class Counting(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            tokens.append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, num_items_in_batch)

    class Stamps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            _measure.synchronize(device)
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out_dir:
        args = TrainingArguments(
            output_dir=out_dir, per_device_train_batch_size=cfg["batch"], max_steps=cfg["steps"], learning_rate=LR,
            weight_decay=WEIGHT_DECAY, warmup_steps=int(math.ceil(WARMUP_RATIO * cfg["steps"])),
            lr_scheduler_type="linear", optim="adamw_torch_fused", max_grad_norm=1.0, seed=cfg["seed"],
            train_sampling_strategy="sequential", report_to="none", eval_strategy="no", save_strategy="no",
            logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
            dataloader_pin_memory=device.type == "cuda", use_cpu=device.type == "cpu")
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=MASK_PROB)
        trainer = Counting(model=model, args=args, train_dataset=examples, data_collator=collator,
                           callbacks=[Stamps()])
        trainer.remove_callback(PrinterCallback)  # the end-of-training metrics line, printed to stdout
        trainer.train()
    if trainer.args.gradient_accumulation_steps != 1 or len(stamps) != cfg["steps"]:
        raise RuntimeError(f"the Trainer ran {len(stamps)} steps, expected {cfg['steps']}")
    return _timed(stamps, tokens, cfg["warmup"])


RUNNERS = {"metalm": run_metalm, "hf_trainer": run_hf_trainer, "metalm_grouped": run_metalm,
           "hf_grouped": run_hf_trainer}


def _measure_side(cfg: dict) -> dict:
    return RUNNERS[cfg["side"]](cfg)


def run(args: argparse.Namespace, command: str) -> dict:
    device = _measure.resolve_device(args.device)
    machine = _measure.machine(device, args.threads)
    ctx = _measure.context(PRELOAD)
    base = dict(encoder=args.encoder, batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup,
                corpus=args.corpus, max_sentences=args.max_sentences, seed=args.seed, device=device,
                threads=args.threads)
    started = time.perf_counter()
    sides = args.sides
    per_side: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(args.rounds):
        for side in [sides[(i + r) % len(sides)] for i in range(len(sides))]:  # the order rotates
            print(f"  round {r + 1}/{args.rounds}: {side} ...", end=" ", file=sys.stderr, flush=True)
            out = _measure.run_fresh(ctx, _measure_side, dict(base, side=side), side)
            print(f"{out['tokens_per_s']:,.0f} tokens/s", file=sys.stderr, flush=True)
            per_side[side].append(out)
    for pair in PAIRS:
        same = [out["tokens"] for s in pair if s in per_side for out in per_side[s]]
        if any(tokens != same[0] for tokens in same):
            raise RuntimeError(f"{' and '.join(pair)} processed different tokens per step (different batches)")
    wall = time.perf_counter() - started
    rate = {s: statistics.median(o["tokens_per_s"] for o in outs) for s, outs in per_side.items()}
    step = {s: statistics.median(o["step_time_s"] for o in outs) for s, outs in per_side.items()}
    timed = {s: statistics.median(o["timed_tokens"] for o in outs) for s, outs in per_side.items()}
    ratios = {f"{a}/{b}": rate[a] / rate[b] for a, b in PAIRS if a in rate and b in rate}
    timed_steps = args.steps - args.warmup
    checks = [_measure.target("MLM tokens/s: metalm / HF Trainer, the same random batches", ratios.get("metalm/hf_trainer"),
                              1.8, at_least=True),
              _measure.target("MLM tokens/s: metalm / HF Trainer, the same length-grouped batches",
                              ratios.get("metalm_grouped/hf_grouped"), 1.8, at_least=True)]
    base_side = "hf_trainer" if "hf_trainer" in rate else None
    lines = [f"## MLM pre-training throughput: {args.encoder}, batch {args.batch}, at most {args.seq} tokens, "
             f"{timed_steps} timed steps after {args.warmup} warm-up, {args.rounds} rounds (median)", "",
             "| implementation | tokens/s | s/step | tokens/step (timed, median) | × HF Trainer |",
             "|---|---:|---:|---:|---:|"]
    for s in sides:
        times = f"{rate[s] / rate[base_side]:.2f}" if base_side else "n/a"
        lines.append(f"| {SIDE_NAMES[s]} | {rate[s]:,.0f} | {step[s]:.3f} | {timed[s] / timed_steps:,.0f} | {times} |")
    lines += ["", f"- command: `{command}` (cwd {os.getcwd()})",
              f"- machine: {_measure.machine_line(machine)} (load at start)",
              f"- corpus: {args.corpus} (training sentences, at most {args.max_sentences}). The HF Trainer reads "
              "the rows metalm's seeded stream draws, in its order (`train_sampling_strategy=\"sequential\"`): "
              "random batches, or length-grouped ones (`train.group_by_length`, 50 batches per length-sorted "
              "pool, as the Trainer's own `group_by_length` forms them); tokens checked equal per step",
              "- tokens/s: non-padding input tokens ([CLS]/[SEP] included) / wall time of the timed steps, each "
              "run in a fresh process, the order rotating per round; all: 15% masking (80/10/10), fused AdamW "
              "lr 5e-5 wd 0.01, linear warm-up 10%, clip 1.0, fp32",
              *[_measure.target_line(t) for t in checks], f"- wall time: {wall:.1f} s"]
    return {"name": "mlm_throughput", "text": "\n".join(lines), "targets": checks,
            "json": {"command": command, "cwd": os.getcwd(), "machine": machine,
                     "settings": base | {"rounds": args.rounds, "sides": sides},
                     "tokens_per_s": rate, "step_time_s": step, "ratios": ratios,
                     "timed_tokens": timed, "tokens_per_step": {s: outs[0]["tokens"] for s, outs in per_side.items()},
                     "runs": {s: [{k: o[k] for k in ("tokens_per_s", "seconds", "step_time_s", "timed_tokens")}
                                  for o in outs] for s, outs in per_side.items()},
                     "wall_time_s": wall, "targets": checks}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _measure.add_common_args(p)
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per run, warm-up included (default 16; quick: 4)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3; quick: 1)")
    p.add_argument("--rounds", type=int, default=None, help="rounds over both sides, alternating (default 2; quick: 1)")
    p.add_argument("--corpus", default=None, help="corpus path (default ../shared/data/corpus/sotu; quick: lee_background.cor)")
    p.add_argument("--max-sentences", type=int, default=None, help="training sentences read (default 4000; quick: 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)}")
    args = p.parse_args(argv)
    args.sides = [x.strip() for x in args.sides.split(",") if x.strip()]
    if not args.sides or any(x not in SIDES for x in args.sides):
        p.error(f"--sides: choose from {', '.join(SIDES)}")
    root = Path(os.environ.get("METALM_DATA") or PROJECT_ROOT.parent / "shared" / "data")
    _measure.fill_defaults(args, quick=dict(encoder="tiny", batch=4, seq=32, steps=4, warmup=1, rounds=1,
                                            corpus=str(root / "corpus" / "lee_background.cor"), max_sentences=200),
                           full=dict(encoder="minilm", batch=16, seq=128, steps=16, warmup=3, rounds=2,
                                     corpus=str(root / "corpus" / "sotu"), max_sentences=4000))
    if args.warmup < 1 or args.steps <= args.warmup or args.rounds < 1:
        p.error("need --warmup >= 1, --steps > --warmup and --rounds >= 1")
    return args


def main(argv=None) -> int:
    return _measure.script_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
