"""Sharing a trained encoder: a sentence-transformers folder, a model card, a Hub upload.

A metalm model folder (a run's ``final/``) holds the encoder in Hugging Face format
(``encoder/``), the task heads and ``heads.json`` (which records the pooling). Its run folder, one
level up, holds the run's ``config.json``.

- ``export_sentence_transformers`` writes a folder that ``SentenceTransformer(folder)`` loads: the
  encoder and tokenizer at the root, ``modules.json``, ``sentence_bert_config.json`` and
  ``1_Pooling/config.json`` with the pooling metalm trained with, so it embeds as metalm does.
- ``model_card`` builds a ``huggingface_hub.ModelCard``: YAML metadata, how the encoder was trained
  (the method and the whole config), and optionally the study table it came from.
- ``push_to_hub`` uploads the folder with its card (``HfApi.create_repo`` then ``upload_folder``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from metalm.config import ConfigError
from metalm.models.multitask import HEADS_META

CARD_FILE = "README.md"


def _check_model_folder(model_dir: Path) -> dict:
    if not (model_dir / HEADS_META).is_file() or not (model_dir / "encoder" / "config.json").is_file():
        raise ConfigError(f"{model_dir}: not a metalm model folder (expected encoder/config.json and {HEADS_META}; "
                          "a run's final/ folder is one)")
    return json.loads((model_dir / HEADS_META).read_text())


def run_config(model_dir: str | Path) -> dict | None:
    """The training config of the run that wrote ``model_dir`` (``<run>/config.json``), if there."""
    path = Path(model_dir).parent / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def describe_method(config: dict | None) -> str:
    if not config:
        return "not recorded (no config.json beside the model folder)"
    if "task" in config and "train" not in config:
        task = config["task"] if isinstance(config["task"], str) else config["task"].get("name")
        budget = f"{config['per_class']} per class" if config.get("per_class") else f"{config.get('fraction', 1.0):g}"
        return f"fine-tuned on `{task}` (training fraction {budget}, seed {config.get('seed')})"
    train = config.get("train") or {}
    parts = [f"algorithm `{train.get('algorithm', 'multitask')}`"]
    if train.get("tasks"):
        parts.append("tasks " + ", ".join(f"`{t}`" for t in train["tasks"]))
    if train.get("objectives"):
        parts.append("objectives " + ", ".join(f"`{o.get('objective')}`" for o in train["objectives"]))
    if train.get("steps"):
        parts.append(f"{train['steps']} steps")
    if train.get("inner_steps"):
        parts.append(f"k = {train['inner_steps']} inner steps at α = {train.get('inner_lr')}")
    sampler = (train.get("sampler") or {}).get("kind")
    if sampler:
        parts.append(f"`{sampler}` sampler")
    encoder = (config.get("encoder") or {}).get("name")
    start = f"from `{encoder}`: " if encoder else ""
    return start + "; ".join(parts)


def model_card(model_dir: str | Path, *, table: str | None = None, base_model: str | None = None,
               config: dict | None = None):
    """A ``huggingface_hub.ModelCard`` for a metalm model folder."""
    from huggingface_hub import ModelCard, ModelCardData

    model_dir = Path(model_dir)
    meta = _check_model_folder(model_dir)
    config = config if config is not None else run_config(model_dir)
    base = base_model or ((config or {}).get("encoder") or {}).get("name")
    data = ModelCardData(library_name="sentence-transformers", tags=["metalm", "meta-learning", "text-encoder"],
                         base_model=base if base and "/" in base else None)
    heads = ", ".join(f"`{n}` ({i['kind']})" for n, i in meta["tasks"].items()) or "none"
    body = [f"# {model_dir.parent.name or model_dir.name}", "",
            "A text encoder trained with [metalm](https://pypi.org/project/metalm/).", "",
            f"- Method: {describe_method(config)}",
            f"- Pooling: {meta['pooling']}",
            f"- Task heads in the metalm folder: {heads}", ""]
    if table:
        body += ["## Study", "", table.strip(), ""]
    if config is not None:
        body += ["## Training config", "", "```json", json.dumps(config, indent=1), "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def export_sentence_transformers(model_dir: str | Path, out_dir: str | Path, *, max_seq_length: int | None = None,
                                 table: str | None = None) -> Path:
    """Writes a sentence-transformers folder for a metalm model folder; returns ``out_dir``.

    Written to a temporary folder beside ``out_dir`` and renamed when complete.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    meta = _check_model_folder(model_dir)
    encoder = model_dir / "encoder"
    if not any((encoder / name).exists() for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        raise ConfigError(f"{encoder}: no tokenizer saved with the encoder; sentence-transformers needs one")
    hidden = json.loads((encoder / "config.json").read_text()).get("hidden_size")
    if max_seq_length is None:
        config = run_config(model_dir) or {}
        max_seq_length = int((config.get("encoder") or {}).get("max_length") or 128)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(encoder, tmp)
    (tmp / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}], indent=1))
    (tmp / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                               "do_lower_case": False}, indent=1))
    (tmp / "1_Pooling").mkdir()
    (tmp / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": meta["pooling"] == "cls",
        "pooling_mode_mean_tokens": meta["pooling"] == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}, indent=1))
    model_card(model_dir, table=table).save(tmp / CARD_FILE)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def push_to_hub(model_dir: str | Path, repo_id: str, *, table: str | None = None, private: bool = False,
                token: str | None = None, api: Any = None, commit_message: str | None = None) -> str:
    """Uploads a metalm model folder, exported for sentence-transformers and with its model card.

    Returns the URL of the commit. ``api`` defaults to ``huggingface_hub.HfApi(token=token)``.
    """
    import tempfile

    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_sentence_transformers(model_dir, Path(tmp) / "model", table=table)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                 commit_message=commit_message or f"metalm: upload {Path(model_dir).name}")
    return str(getattr(info, "commit_url", info))
