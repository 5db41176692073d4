"""Progress off a terminal: log lines with position, rate and ETA; a final line; nothing when disabled."""

from __future__ import annotations

import io
import re

from metalm.cli import set_threads
from metalm.schema import EncoderConfig, ExperimentConfig, MethodConfig
from metalm.train.progress import Progress


def test_lines_at_each_interval_with_eta_and_a_final_line():
    stream = io.StringIO()
    bar = Progress(range(2, 6), desc="train run", total=6, initial=2, interval=0, stream=stream)
    for step in bar:
        bar.set_postfix(loss=f"{1.0 / (step + 1):.4f}")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 5  # one per step at interval 0, then the final line
    assert re.fullmatch(r"metalm: train run 3/6 \(50%\), [\d.]+ (it/s|s/it), ETA \d+m\d\ds, loss=0.3333", lines[0])
    assert lines[3].startswith("metalm: train run 6/6 (100%)") and "loss=0.1667" in lines[3]
    assert "done in" in lines[-1]


def test_long_interval_gives_only_the_final_line_and_disabled_gives_none():
    stream = io.StringIO()
    list(Progress(range(10), desc="cells", interval=3600, stream=stream))
    assert stream.getvalue().count("\n") == 1 and "cells 10/10 (100%)" in stream.getvalue()
    quiet = io.StringIO()
    list(Progress(range(10), desc="cells", interval=0, stream=quiet, enabled=False))
    assert quiet.getvalue() == ""


def test_threads_default_to_one_for_tiny_encoders_and_follow_the_setting():
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        tiny = ExperimentConfig(methods=(MethodConfig(name="a"),), targets=("rte",), encoder=EncoderConfig(name="tiny"))
        assert set_threads(tiny) == 1
        torch.set_num_threads(2)
        assert set_threads(ExperimentConfig(methods=(MethodConfig(name="a"),), targets=("rte",),
                                            encoder=EncoderConfig(name="minilm"))) == 2
        assert set_threads(ExperimentConfig(methods=(MethodConfig(name="a"),), targets=("rte",), threads=2,
                                            encoder=EncoderConfig(name="tiny"))) == 2
    finally:
        torch.set_num_threads(before)
