"""Shared fixtures: the offline data root, the offline MiniLM tokenizer and a fresh cache folder.

The data root is ``$METALM_DATA`` or ``<project root>/../shared/data``. Tests that need it are
skipped when it is missing (a fresh clone runs every other test), with one line at the end saying
how to point at the data; ``METALM_REQUIRE_DATA=1`` (set by CI) turns the skip into a failure, so a
misconfigured CI run cannot pass silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models run faster on one thread than two (no OpenMP hand-offs), and pinned numbers
    were recorded on one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA_ROOT = Path(os.environ.get("METALM_DATA") or PROJECT_ROOT.parent / "shared" / "data")


REQUIRE_DATA = os.environ.get("METALM_REQUIRE_DATA", "") not in ("", "0")
_MISSING = (f"offline data folder not found: {DATA_ROOT} "
            "(set METALM_DATA to the folder holding glue/, minbert/, senteval/, ner/)")
_skipped_for_data: list[str] = []


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not DATA_ROOT.is_dir():
        if REQUIRE_DATA:
            pytest.fail(_MISSING + "; METALM_REQUIRE_DATA is set", pytrace=False)
        _skipped_for_data.append("x")
        pytest.skip("needs the offline data folder (METALM_DATA)")
    return DATA_ROOT


def pytest_terminal_summary(terminalreporter):
    if _skipped_for_data:
        terminalreporter.write_line(
            f"metalm: tests that read real data were skipped: {_MISSING}", yellow=True)


@pytest.fixture(scope="session")
def tokenizer():
    from metalm.models.encoder import load_tokenizer

    return load_tokenizer("minilm")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """A cache folder that does not exist yet (the cache creates it when it writes)."""
    return tmp_path / "cache"


@pytest.fixture
def hf_datasets_cache(tmp_path: Path, monkeypatch) -> Path:
    """Keeps ``datasets.load_dataset``'s own cache inside the test's tmp folder."""
    import datasets

    folder = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", folder)
    return folder
