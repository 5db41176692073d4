"""The ``metalm`` command: argument and config parsing only; recipes do the work.

    metalm demo                                   the main job on embedded offline data
    metalm train CONFIG [key=value ...] [--resume] [--nproc N]
    metalm finetune CONFIG [key=value ...]
    metalm experiment CONFIG [key=value ...]
    metalm evaluate --model DIR --task TASK [--split dev]
    metalm tasks                                  list the built-in tasks
    metalm check CONFIG ...                       validate config files
    metalm twomoons [--quick|--size default|paper]  the Two Moons study of a meta-learned LM objective
    metalm lmtext [--quick] [--corpus FILE]       MLM vs soft labels on a real corpus (Shen, §4.3)
    metalm export MODEL --out DIR                 a sentence-transformers folder with a model card
    metalm push MODEL --repo ORG/NAME             upload it to the Hugging Face Hub

CONFIG is a YAML path or the name of a shipped config (``demo``, ``glue_rte``, ...).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from pathlib import Path

from metalm import config as cfg
from metalm.data.errors import DataError
from metalm.train.progress import quiet_libraries

SHIPPED = Path(__file__).parent / "configs"


def shipped_configs() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SHIPPED.glob("*.yaml"))}


def resolve_config(name: str) -> Path:
    path = Path(name)
    if path.exists():
        return path
    if name in shipped_configs():
        return shipped_configs()[name]
    raise cfg.ConfigError(f"config {name!r}: no such file, nor a shipped config ({', '.join(shipped_configs())})")


def config_class(data: dict):
    """Which schema a config file follows, from its top-level keys."""
    from metalm.schema import ExperimentConfig, FinetuneConfig, TrainConfig
    from metalm.tasks.spec import TaskSpec

    if "methods" in data:
        return ExperimentConfig
    if "train" in data:
        return TrainConfig
    if "task" in data:
        return FinetuneConfig
    if "kind" in data and "name" in data:
        return TaskSpec
    raise cfg.ConfigError("cannot tell the config's kind: expected a top-level 'methods' (experiment), "
                          "'train' (train), 'task' (finetune) or 'kind' (task definition)")


def _load(schema, name: str, overrides: list[str]):
    config = cfg.load(schema, resolve_config(name), overrides)
    set_threads(config)
    return config


# Random encoders this small run faster on one thread than on two (no OpenMP hand-offs).
ONE_THREAD_ENCODERS = ("tiny", "mini")


def set_threads(config) -> int:
    """Applies ``config.threads`` (or the default for its encoder) to torch; returns the count."""
    import torch

    threads = getattr(config, "threads", None)
    if threads is None and getattr(getattr(config, "encoder", None), "name", None) in ONE_THREAD_ENCODERS:
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def cmd_train(args) -> int | None:
    from metalm.recipes import run_train
    from metalm.schema import TrainConfig
    from metalm.train.distributed import launched_world_size

    if args.nproc is not None:
        return _relaunch(args.nproc, args.argv)
    config = _load(TrainConfig, args.config, args.overrides)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:  # under torchrun, rank 0 checks the folder; a refusal there stops every process
        _refuse_existing(Path(config.output_dir), ("config.json", "checkpoints", "final"), args,
                         resume_hint=" --resume to continue it,")
    final = run_train(config, resume=args.resume)
    if rank == 0:
        where = f" ({launched_world_size()} processes)" if launched_world_size() > 1 else ""
        print(f"final model: {final}{where}")


def _relaunch(nproc: int, argv: list[str]) -> int:
    """``metalm train ... --nproc N``: the same command under torchrun with N processes on this machine."""
    import subprocess

    if nproc < 1:
        raise cfg.ConfigError(f"--nproc: expected a number of processes >= 1, got {nproc}")
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--nproc":
            del argv[i:i + 2]
            break
        if arg.startswith("--nproc="):
            del argv[i]
            break
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "metalm", *argv]
    return subprocess.run(command).returncode


def _one_process(command: str) -> None:
    from metalm.train.distributed import launched_world_size

    if launched_world_size() > 1:
        raise cfg.ConfigError(f"metalm {command} runs in one process, not under torchrun: spread a sweep over "
                              "worker processes with executor: processes, or train a stage with "
                              "torchrun ... -m metalm train STAGE_CONFIG")


def _refuse_existing(out: Path, markers: tuple[str, ...], args, resume_hint: str = "") -> None:
    """Without --resume, a folder that already holds a run is an error unless --overwrite empties it."""
    import shutil

    if getattr(args, "resume", False) or not any((out / m).exists() for m in markers):
        return
    if not args.overwrite:
        raise cfg.ConfigError(f"{out} already holds a run; use{resume_hint} --overwrite to replace it, or "
                              "another output_dir")
    if (out / ".lock").exists():
        from metalm.train.lock import run_lock

        with run_lock(out):  # refuses if a live run holds it
            pass
    shutil.rmtree(out)


def cmd_finetune(args) -> None:
    from metalm.recipes import run_finetune
    from metalm.schema import FinetuneConfig
    from metalm.files import write_text_atomic
    from metalm.train.lock import run_lock

    _one_process("finetune")
    config = _load(FinetuneConfig, args.config, args.overrides)
    _refuse_existing(Path(config.output_dir), ("scores.json", "final"), args)
    with run_lock(config.output_dir):
        result = run_finetune(config)
        write_text_atomic(Path(config.output_dir) / "scores.json",
                          json.dumps({"scores": result.scores, "curve": result.curve,
                                      "train_size": result.train_size}, indent=1))
    print(json.dumps({"train_size": result.train_size, "scores": result.scores}, indent=1))


def cmd_experiment(args) -> None:
    from metalm.experiments.runner import run_experiment
    from metalm.schema import ExperimentConfig

    _one_process("experiment")
    _, paths = run_experiment(_load(ExperimentConfig, args.config, args.overrides))
    print()
    print(paths["markdown"].read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))


def cmd_demo(args) -> None:
    args.config = "demo"
    cmd_experiment(args)


def cmd_evaluate(args) -> None:
    from metalm.builders import build_model, build_tasks
    from metalm.schema import DataConfig, EncoderConfig
    from metalm.tasks.registry import get_task_spec
    from metalm.train.evaluate import evaluate

    # The run that wrote the model (its config.json one level up) gives the defaults: the same
    # sequence lengths and data settings score the same rows the same way.
    run = Path(args.model).parent / "config.json"
    trained = json.loads(run.read_text()) if run.is_file() else {}
    data = cfg.parse(DataConfig, cfg.apply_overrides(dict(trained.get("data") or {}), args.overrides), where="data")
    encoder = trained.get("encoder") or {}
    max_length = args.max_length or encoder.get("max_length") or 128
    pair_max_length = args.max_length or encoder.get("pair_max_length") or max_length
    model, tokenizer = build_model(EncoderConfig(), seed=0, init=args.model)
    spec = get_task_spec(args.task)
    if spec.name not in model.heads:
        raise cfg.ConfigError(f"model {args.model} has no head for task {spec.name} (has {sorted(model.heads)})")
    splits = [args.split] if args.split else list(spec.eval_splits)
    task = build_tasks([spec], tokenizer, data=data, max_length=max_length, pair_max_length=pair_max_length,
                       splits=splits)[spec.name]
    print(json.dumps({split: evaluate(model, task, split) for split in splits}, indent=1))


def cmd_tasks(args) -> None:
    from metalm.tasks.registry import REGISTRY

    width = max(map(len, REGISTRY))
    for name, spec in REGISTRY.items():
        print(f"{name:<{width}}  {spec.kind:<20} {', '.join(spec.metrics):<18} {spec.description}")


def cmd_check(args) -> None:
    # `key=value` after the configs, as every other command takes it (`--set key=value` also works).
    configs = [a for a in args.configs if "=" not in a or Path(a).exists()]
    overrides = [a for a in args.configs if a not in configs] + args.overrides
    if not configs:
        raise cfg.ConfigError("check: give at least one config before the key=value overrides")
    for name in configs:
        data = cfg.apply_overrides(cfg.read_yaml(resolve_config(name)), overrides)
        schema = config_class(data)
        cfg.parse(schema, data, where=str(name))
        print(f"{name}: valid {schema.__name__}")


def cmd_twomoons(args) -> None:
    from dataclasses import replace

    from metalm.teacher.study import SIZES, run_study

    size = SIZES["quick" if args.quick else args.size]
    if args.seeds is not None:
        size = replace(size, seeds=tuple(range(args.seeds)))
    out = args.out or f"runs/twomoons-{size.name}"
    paths = run_study(size, out, workers=args.workers)
    print()
    print(paths["markdown"].read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))


def cmd_lmtext(args) -> None:
    import torch

    from metalm.teacher.text import TEXT_SIZES, run_text

    torch.set_num_threads(args.threads)  # tiny models: one thread avoids OpenMP hand-offs
    data_root = Path(args.data or os.environ.get("METALM_DATA") or "../shared/data")
    corpus = Path(args.corpus) if args.corpus else data_root / "corpus" / "lee_background.cor"
    size = TEXT_SIZES["quick" if args.quick else "default"]
    tasks = tuple(t for t in args.tasks.split(",") if t)
    path = run_text(size, args.out or f"runs/lmtext-{size.name}", data_root=data_root, corpus=corpus, tasks=tasks)
    print()
    print(path.read_text())


def _table(path: str | None) -> str | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise cfg.ConfigError(f"--table {path}: no such file (a study's results.md)")
    return Path(path).read_text()


def cmd_export(args) -> None:
    from metalm.share import export_sentence_transformers

    out = export_sentence_transformers(args.model, args.out, max_seq_length=args.max_seq_length,
                                       table=_table(args.table))
    print(f"written: {out} (load it with sentence_transformers.SentenceTransformer({str(out)!r}))")


def cmd_push(args) -> None:
    from metalm.share import push_to_hub

    url = push_to_hub(args.model, args.repo, table=_table(args.table), private=args.private)
    print(f"uploaded: {url}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metalm", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(name, fn, help_text):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="YAML file or shipped config name")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
        p.set_defaults(fn=fn)
        return p

    train = with_config("train", cmd_train, "joint multi-task training")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in output_dir")
    train.add_argument("--nproc", type=int, default=None, metavar="N",
                       help="train on N processes of this machine (torchrun --standalone --nproc_per_node N)")
    with_config("finetune", cmd_finetune, "fine-tune on one target task").add_argument(
        "--overwrite", action="store_true", help="replace a fine-tune already in output_dir")
    with_config("experiment", cmd_experiment, "method x target x fraction x seed sweep, table and plot")
    demo = sub.add_parser("demo", help="the main job on embedded offline data (MiniLM, ~8 min on 2 cores)")
    demo.add_argument("overrides", nargs="*", help="key=value overrides of the demo config")
    demo.set_defaults(fn=cmd_demo)
    ev = sub.add_parser("evaluate", help="score a saved model on a task")
    ev.add_argument("--model", required=True, help="a metalm model folder (a run's final/)")
    ev.add_argument("--task", required=True, help="task name or YAML file")
    ev.add_argument("--split", default=None, help="split (default: the task's eval splits)")
    ev.add_argument("--max-length", type=int, default=None,
                    help="token limit (default: the training run's encoder.max_length / pair_max_length, else 128)")
    ev.add_argument("overrides", nargs="*", help="data settings, e.g. root=../data")
    ev.set_defaults(fn=cmd_evaluate)
    sub.add_parser("tasks", help="list built-in tasks").set_defaults(fn=cmd_tasks)
    check = sub.add_parser("check", help="validate config files (with key=value overrides, as a run takes them)")
    check.add_argument("configs", nargs="+", metavar="CONFIG [key=value ...]")
    check.add_argument("--set", dest="overrides", action="append", default=[], help="key=value")
    check.set_defaults(fn=cmd_check)
    moons = sub.add_parser("twomoons", help="Two Moons study of a teacher that meta-learns the LM objective "
                           "(Shen); resumable")
    moons.add_argument("--size", choices=("quick", "default", "paper"), default="default",
                       help="default: 9,600 pre-training samples per run, ~1 h on 2 cores; paper: 640,000")
    moons.add_argument("--quick", action="store_true", help="the CI size (same as --size quick)")
    moons.add_argument("--out", default=None, help="output folder (default runs/twomoons-<size>)")
    moons.add_argument("--workers", type=int, default=2, help="parallel runs, one torch thread each")
    moons.add_argument("--seeds", type=int, default=None, help="use seeds 0..N-1 instead of the size's")
    moons.set_defaults(fn=cmd_twomoons)
    text = sub.add_parser("lmtext", help="MLM vs a soft-label teacher on a real corpus, teacher outputs logged")
    text.add_argument("--quick", action="store_true", help="the CI size")
    text.add_argument("--data", default=None, help="data root (default $METALM_DATA or ../shared/data)")
    text.add_argument("--corpus", default=None, help="plain-text corpus (default <data>/corpus/lee_background.cor)")
    text.add_argument("--out", default=None, help="output folder (default runs/lmtext-<size>)")
    text.add_argument("--tasks", default="sst2,subj",
                      help="registered single-sentence classification tasks, comma-separated (default sst2,subj)")
    text.add_argument("--threads", type=int, default=1, help="torch threads")
    text.set_defaults(fn=cmd_lmtext)
    export = sub.add_parser("export", help="write a trained encoder as a sentence-transformers folder")
    export.add_argument("model", help="a metalm model folder (a run's final/)")
    export.add_argument("--format", choices=("sentence-transformers",), default="sentence-transformers")
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--max-seq-length", type=int, default=None, help="default: the run's encoder.max_length")
    export.add_argument("--table", default=None, help="a study's results.md to put in the model card")
    export.set_defaults(fn=cmd_export)
    push = sub.add_parser("push", help="upload a trained encoder with its model card to the Hugging Face Hub")
    push.add_argument("model", help="a metalm model folder (a run's final/)")
    push.add_argument("--repo", required=True, help="Hub repository id, e.g. my-org/my-encoder")
    push.add_argument("--private", action="store_true")
    push.add_argument("--table", default=None, help="a study's results.md to put in the model card")
    push.set_defaults(fn=cmd_push)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not args.verbose:
        quiet_libraries()
    from metalm.experiments import SweepFailed
    from metalm.train.loop import TrainingDiverged

    try:
        code = args.fn(args)
    except (cfg.ConfigError, DataError, TrainingDiverged, SweepFailed) as err:
        print(f"metalm: error: {err}", file=sys.stderr)
        _cause(err, args.verbose)
        return 2
    except OSError as err:
        if err.errno not in FILE_SYSTEM_ERRNOS:
            raise  # not the user's file system: an internal error keeps its traceback
        where = f"{err.filename}: " if err.filename else ""
        print(f"metalm: error: {where}{err.strerror or err} (checkpoints are written to a temporary folder and "
              "renamed into place, so the last one is intact; free space or fix the permissions, then --resume)",
              file=sys.stderr)
        _cause(err, args.verbose)
        return 2
    return code if isinstance(code, int) else 0


# Errors of the disk or the permissions the user set, reported as one line (the traceback with -v).
FILE_SYSTEM_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def _cause(err: BaseException, verbose: bool) -> None:
    if verbose:
        import traceback

        traceback.print_exception(err, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
