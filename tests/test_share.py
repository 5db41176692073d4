"""Sharing: the sentence-transformers export embeds as metalm does; the model card carries the
config; the upload goes through HfApi's create_repo / upload_folder with the exported folder."""

from __future__ import annotations

import json

import pytest
import torch

from metalm.builders import build_model
from metalm.cli import main
from metalm.config import ConfigError
from metalm.schema import EncoderConfig
from metalm.share import export_sentence_transformers, model_card, push_to_hub

SENTENCES = ["a short one", "a somewhat longer sentence with more words in it", "third"]
CONFIG = {"encoder": {"name": "tiny", "max_length": 32},
          "train": {"algorithm": "maml", "tasks": ["sst2", "mrpc"], "steps": 7, "inner_steps": 2,
                    "inner_lr": 0.001, "sampler": {"kind": "proportional"}}}


def _saved_model(tmp_path, tokenizer, pooling):
    model, _ = build_model(EncoderConfig(name="tiny", pooling=pooling), seed=3)
    model.add_task("sst2", "classification", 2)
    run = tmp_path / "run"
    model.save_pretrained(run / "final", tokenizer=tokenizer)
    (run / "config.json").write_text(json.dumps(CONFIG))
    return model.eval(), run / "final"


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_sentence_transformers_export_gives_metalm_embeddings(tmp_path, tokenizer, pooling):
    from sentence_transformers import SentenceTransformer

    model, folder = _saved_model(tmp_path, tokenizer, pooling)
    out = export_sentence_transformers(folder, tmp_path / "st")
    assert not (tmp_path / "st.tmp").exists()
    loaded = SentenceTransformer(str(out), device="cpu")
    assert loaded.max_seq_length == 32
    theirs = loaded.encode(SENTENCES, convert_to_tensor=True, batch_size=2)
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        ours = model.embed(batch)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # the other pooling gives different vectors, so the comparison above can fail
    other = "cls" if pooling == "mean" else "mean"
    cfg = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert cfg[f"pooling_mode_{'cls_token' if pooling == 'cls' else 'mean_tokens'}"] is True
    assert cfg[f"pooling_mode_{'cls_token' if other == 'cls' else 'mean_tokens'}"] is False


def test_model_card_carries_method_config_and_table(tmp_path, tokenizer):
    _, folder = _saved_model(tmp_path, tokenizer, "mean")
    card = model_card(folder, table="| method | MRPC |\n|---|---|\n| MAML | 81.0 |")
    text = str(card)
    assert card.data.library_name == "sentence-transformers" and "metalm" in card.data.tags
    assert "algorithm `maml`" in text and "k = 2 inner steps" in text and "`proportional` sampler" in text
    assert json.loads(text.split("```json\n")[1].split("```")[0]) == CONFIG
    assert "| MAML | 81.0 |" in text


class FakeHub:
    """Stands in for huggingface_hub.HfApi at its API boundary: records what would be sent."""

    def __init__(self):
        self.calls, self.files = [], {}

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        from pathlib import Path

        self.calls.append(("upload_folder", repo_id, kwargs))
        root = Path(folder_path)
        self.files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

        class Info:
            commit_url = f"https://huggingface.co/{repo_id}/commit/abc"
        return Info()


def test_push_uploads_the_export_with_its_card(tmp_path, tokenizer):
    _, folder = _saved_model(tmp_path, tokenizer, "mean")
    hub = FakeHub()
    url = push_to_hub(folder, "me/enc", private=True, api=hub)
    assert url.endswith("/commit/abc")
    assert hub.calls[0] == ("create_repo", "me/enc", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert {"README.md", "modules.json", "1_Pooling/config.json", "config.json", "model.safetensors"} <= set(hub.files)
    assert b'"algorithm": "maml"' in hub.files["README.md"]


def test_export_refuses_a_folder_that_is_not_a_model(tmp_path, capsys):
    with pytest.raises(ConfigError, match="not a metalm model folder"):
        export_sentence_transformers(tmp_path, tmp_path / "out")
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "not a metalm model folder" in capsys.readouterr().err


def test_export_command(tmp_path, tokenizer, capsys):
    _, folder = _saved_model(tmp_path, tokenizer, "mean")
    assert main(["export", str(folder), "--out", str(tmp_path / "st")]) == 0
    assert "SentenceTransformer(" in capsys.readouterr().out
    assert (tmp_path / "st" / "modules.json").is_file()
