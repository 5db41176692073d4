"""One writer per run folder: a live lock refuses a second run, a dead holder's lock is taken over,
an existing run needs --resume or --overwrite, and an unwritable folder fails before loading data."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from metalm.cli import main
from metalm.config import ConfigError
from metalm.train.lock import LOCK, RunFolderBusy, check_writable, run_lock


def test_a_live_holder_refuses_a_second_run(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / LOCK).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                 "started": "now"}))
        with pytest.raises(RunFolderBusy, match=f"in use by process {holder.pid}"):
            with run_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holders_lock_is_taken_over_and_released(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "then"}))
    notes = []
    with run_lock(tmp_path, note=notes.append) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK).exists()
    assert notes and f"from process {dead.pid}" in notes[0]


def test_a_lock_from_another_host_is_not_taken_over(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    with pytest.raises(RunFolderBusy, match="on elsewhere"):
        with run_lock(tmp_path):
            pass


def test_nested_lock_of_the_same_folder_is_refused(tmp_path):
    with run_lock(tmp_path):
        with pytest.raises(RunFolderBusy, match="already in use by this process"):
            with run_lock(tmp_path):
                pass


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_folder(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="not writable"):
            check_writable(tmp_path / "run")
    finally:
        tmp_path.chmod(0o700)


def test_unwritable_folder_as_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        check_writable(tmp_path / "file" / "run")


def test_train_into_an_existing_run_needs_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    argv = ["train", "train_glue", "encoder.name=tiny", f"output_dir={out}", "data.root=/nonexistent"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "already holds a run; use --resume to continue it, --overwrite to replace it" in err
    # --overwrite empties it, then fails on the missing data (not on the folder)
    assert main(argv + ["--overwrite"]) == 2
    assert not (out / "config.json").exists()
    assert "already holds a run" not in capsys.readouterr().err


@pytest.mark.parametrize("name", ["tinyy", "/no/such/folder", "./missing", "no-such-org/no-such-model-xyz"])
def test_an_unknown_encoder_is_one_error_line_naming_what_is_known(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["finetune", "finetune_rte", f"encoder.name={name}", f"output_dir={tmp_path / 'ft'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"encoder {name!r}" in err and "minilm" in err and "tiny" in err


def test_duplicate_yaml_keys_are_errors_but_merges_may_override(tmp_path):
    from metalm.config import read_yaml

    (tmp_path / "dup.yaml").write_text("train:\n  steps: 10\n  lr: 1\n  steps: 20\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'steps' \(first on line 2, again on line 4\)"):
        read_yaml(tmp_path / "dup.yaml")
    (tmp_path / "merge.yaml").write_text("base: &b {steps: 10, lr: 1}\nrun: {<<: *b, steps: 20}\n")
    assert read_yaml(tmp_path / "merge.yaml")["run"] == {"steps": 20, "lr": 1}


@pytest.mark.parametrize("first, setting", [('\ufefftext\tlabel', "encoding: utf-8-sig"),
                                             ('"text"\t"label"', "quoting: csv")])
def test_a_bom_or_quoted_header_names_the_setting_to_use(tmp_path, first, setting):
    from metalm.data.errors import DataError
    from metalm.data.readers import label_parser, read_delimited

    path = tmp_path / "t.tsv"
    path.write_text(first + "\nfine\t1\n", encoding="utf-8")
    with pytest.raises(DataError, match=setting):
        read_delimited(path, columns={"text_a": "text", "label": "label"},
                       parse_label=label_parser("classification", ("0", "1")))


def test_relative_task_paths_resolve_against_the_data_root(tmp_path):
    from metalm.tasks.spec import resolve_path

    assert resolve_path("my/train.csv", root=tmp_path) == tmp_path / "my" / "train.csv"
    assert resolve_path("{root}/my/train.csv", root=tmp_path) == tmp_path / "my" / "train.csv"
    assert resolve_path(str(tmp_path / "abs.csv"), root="/elsewhere") == tmp_path / "abs.csv"


@pytest.mark.parametrize("body, message", [("good\t1\n\t0\n", "a non-empty text"),
                                           ("good\t1\nbad\t0\textra\n", "at most 2 tab-separated fields")])
def test_empty_texts_and_extra_fields_are_errors_unless_allowed(tmp_path, body, message):
    from metalm.data.errors import DataError
    from metalm.tasks.spec import TaskSpec, read_split

    (tmp_path / "t.tsv").write_text("text\tlabel\n" + body)
    strict = TaskSpec(name="t", kind="classification", files={"train": "t.tsv"},
                      columns={"text_a": "text", "label": "label"}, labels=("0", "1"))
    with pytest.raises(DataError, match=message) as err:
        read_split(strict, "train", root=tmp_path)
    assert "line 3" in str(err.value)
    from dataclasses import replace

    relaxed = replace(strict, allow_empty_text=True, allow_extra_fields=True)
    assert len(read_split(relaxed, "train", root=tmp_path)) == 2


def test_a_full_disk_during_a_run_is_one_error_line(tmp_path, capsys, monkeypatch):
    """ENOSPC while a checkpoint is written: exit code 2, one `metalm: error:` line naming the file,
    no temporary folder left; the traceback only with -v."""
    import errno as errnos

    import metalm.train.checkpoint as checkpoint

    rows = "\n".join(f"{'good' if i % 2 else 'bad'} day {i}\t{i % 2}" for i in range(24))
    (tmp_path / "toy.tsv").write_text("text\tlabel\n" + rows + "\n")
    (tmp_path / "run.yaml").write_text(
        "train:\n  tasks:\n    - {name: toy, kind: classification, files: {train: toy.tsv}, labels: ['0', '1'],\n"
        "       columns: {text_a: text, label: label}}\n  steps: 4\n  batch_size: 4\n  checkpoint_every: 2\n"
        "  evaluate: false\n"
        f"encoder: {{name: tiny, max_length: 16}}\ndata: {{root: {tmp_path}, cache_dir: {tmp_path / 'cache'}}}\n")

    def full(*args, **kwargs):
        raise OSError(errnos.ENOSPC, "No space left on device", args[1] if len(args) > 1 else None)

    monkeypatch.setattr(checkpoint, "save_file", full)
    for verbose in ([], ["-v"]):
        out = tmp_path / f"run{len(verbose)}"
        code = main(verbose + ["train", str(tmp_path / "run.yaml"), f"output_dir={out}"])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("metalm: error:")]
        assert code == 2 and len(lines) == 1, err
        assert "optimizer.safetensors: No space left on device" in lines[0]
        assert ("Traceback" in err) == bool(verbose)
        assert not list((out / "checkpoints").glob(".tmp-*"))


def test_yaml_tags_that_would_run_code_are_refused(tmp_path):
    """The config reader is a SafeLoader subclass: a python/object tag is a YAML error, never a call."""
    from metalm.config import read_yaml

    marker = tmp_path / "ran"
    (tmp_path / "evil.yaml").write_text(f"x: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(tmp_path / "evil.yaml")
    assert not marker.exists()
