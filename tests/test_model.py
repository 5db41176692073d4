"""The multi-task model: save/load round trip, pooling that ignores padding, evaluation and output shapes."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

from metalm.builders import add_heads, build_model, build_tasks
from metalm.config import ConfigError
from metalm.models.encoder import NAMED_SIZES, resolve_pooling
from metalm.models.multitask import MultiTaskModel
from metalm.schema import DataConfig, EncoderConfig
from metalm.tasks.registry import WNUT_TAGS
from metalm.tasks.kinds import predict
from metalm.tasks.task import gather_tokens
from metalm.train.evaluate import evaluate, predict_split

TASKS = ["rte", "stsb", "wnut16"]



@pytest.fixture(scope="module")
def tasks(tokenizer, data_root, tmp_path_factory):
    data = DataConfig(root=str(data_root), cache_dir=str(tmp_path_factory.mktemp("model-cache")))
    return build_tasks(TASKS, tokenizer, data=data, max_length=32)


def _model(*, seed: int, pooling: str = "cls", tasks=None) -> MultiTaskModel:
    model, _ = build_model(EncoderConfig(name="tiny", pooling=pooling), seed=seed)
    if tasks is not None:
        add_heads(model, tasks, seed=seed)
    return model.eval()


def _batches(tasks, n: int = 6) -> dict:
    return {name: task.batch("dev", range(n)) for name, task in tasks.items()}


# --- (a) save_pretrained -> build_model(init=...) -------------------------------------------------

def test_save_and_load_gives_identical_logits(tasks, tokenizer, tmp_path):
    # Built with seed 7 and mean pooling, loaded with seed 0 and an EncoderConfig asking for cls:
    # equal logits show that the weights, heads and pooling all come from the folder.
    original = _model(seed=7, pooling="mean", tasks=tasks)
    folder = tmp_path / "model"
    original.save_pretrained(folder, tokenizer=tokenizer)
    assert (folder / "encoder" / "config.json").exists()
    assert (folder / "heads.safetensors").exists()
    meta = json.loads((folder / "heads.json").read_text())
    assert meta == {"pooling": "mean", "tasks": {
        "rte": {"kind": "pair_classification", "num_labels": 2},
        "stsb": {"kind": "regression", "num_labels": 1},
        "wnut16": {"kind": "token_classification", "num_labels": len(WNUT_TAGS)}}}

    loaded, loaded_tokenizer = build_model(EncoderConfig(pooling="cls"), seed=0, init=str(folder))
    loaded.eval()
    assert loaded.pooling == "mean"
    assert loaded.kinds == original.kinds and loaded.num_labels == original.num_labels
    assert list(loaded.heads) == TASKS
    assert loaded_tokenizer("a test")["input_ids"] == tokenizer("a test")["input_ids"]

    fresh = _model(seed=0, pooling="mean", tasks=tasks)  # what the same seed gives without the folder
    with torch.no_grad():
        for name, batch in _batches(tasks).items():
            expected = original(name, batch)
            torch.testing.assert_close(loaded(name, batch), expected, rtol=0, atol=1e-6, msg=name)
            assert not torch.allclose(fresh(name, batch), expected, atol=1e-3), name


def test_build_model_rejects_a_folder_without_heads_json(tmp_path):
    model = _model(seed=0)
    model.encoder.save_pretrained(tmp_path / "plain")  # a Hugging Face encoder, not a metalm folder
    with pytest.raises(ValueError, match=r"not a metalm model folder \(no heads.json\)") as info:
        build_model(EncoderConfig(), seed=0, init=str(tmp_path / "plain"))
    assert "encoder.name" in str(info.value)  # says what to do instead
    with pytest.raises(ValueError, match="no heads.json"):
        build_model(EncoderConfig(), seed=0, init=str(tmp_path / "missing"))


# --- (b) pooling ignores padding ------------------------------------------------------------------

@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_pooled_vector_is_independent_of_padding(tokenizer, pooling):
    model = _model(seed=0, pooling=pooling)
    model.add_task("probe", "classification", 2)
    model.heads["probe"] = nn.Identity()  # the model's output is then the pooled vector (B, H)
    model.eval()
    short = "A cat sat."
    longer = "A much longer sentence, with many more words in it, pads the short one in a batch."
    alone = tokenizer([short], return_tensors="pt")
    both = tokenizer([short, longer], padding=True, return_tensors="pt")
    assert both["input_ids"].shape[1] > alone["input_ids"].shape[1] + 5
    assert both["attention_mask"][0].sum() == alone["input_ids"].shape[1]

    with torch.no_grad():
        single = model("probe", alone)
        batched = model("probe", both)
    assert single.shape == (1, model.hidden_size) and batched.shape == (2, model.hidden_size)
    torch.testing.assert_close(batched[0], single[0], rtol=0, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)

    if pooling == "mean":
        # The check has teeth: averaging over every position (padding included) gives another vector.
        with torch.no_grad():
            hidden = model.encoder(**both).last_hidden_state
        assert not torch.allclose(hidden[0].mean(0), single[0], atol=1e-3)
        torch.testing.assert_close(single[0], model.encoder(**alone).last_hidden_state[0].mean(0).detach(),
                                   rtol=0, atol=1e-5)


# --- (b2) pooling follows the encoder (encoder.pooling: auto) ---------------------------------------

def _st_folder(path, tokenizer, modes: dict[str, bool] | None):
    """A tiny random BERT saved as a Hugging Face folder, with a sentence-transformers
    ``1_Pooling/config.json`` setting ``modes`` (none when ``modes`` is None)."""
    model = _model(seed=0)
    model.encoder.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if modes is not None:
        (path / "1_Pooling").mkdir()
        flags = {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
                 "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False, **modes}
        (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **flags}))
    return path


@pytest.mark.parametrize("modes, expected", [({"pooling_mode_mean_tokens": True}, "mean"),
                                             ({"pooling_mode_cls_token": True}, "cls"),
                                             (None, "cls")])
def test_auto_pooling_follows_the_sentence_transformers_config(tmp_path, tokenizer, caplog, modes, expected):
    folder = _st_folder(tmp_path / "enc", tokenizer, modes)
    with caplog.at_level(logging.INFO, logger="metalm.models.encoder"):
        assert resolve_pooling(str(folder), "auto") == expected
    reason = "pooling_mode_" if modes else "has no 1_Pooling"
    assert f"auto -> {expected}" in caplog.text and reason in caplog.text  # the log says why
    # ... through the builder too, and an explicit setting always wins over the folder.
    model, _ = build_model(EncoderConfig(name=str(folder)), seed=0)
    assert model.pooling == expected
    other = "cls" if expected == "mean" else "mean"
    assert resolve_pooling(str(folder), other) == other
    assert build_model(EncoderConfig(name=str(folder), pooling=other), seed=0)[0].pooling == other


@pytest.mark.parametrize("modes, named", [
    ({"pooling_mode_max_tokens": True}, "pooling_mode_max_tokens"),
    ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True},  # concatenated vectors
     "pooling_mode_cls_token, pooling_mode_mean_tokens")])
def test_auto_pooling_refuses_a_mode_metalm_lacks(tmp_path, tokenizer, modes, named):
    folder = _st_folder(tmp_path / "enc", tokenizer, modes)
    with pytest.raises(ConfigError, match="set encoder.pooling to cls or mean") as info:
        resolve_pooling(str(folder), "auto")
    assert str(folder / "1_Pooling" / "config.json") in str(info.value) and named in str(info.value)
    assert resolve_pooling(str(folder), "mean") == "mean"  # the way out the message names


def test_auto_pooling_of_named_sizes_hub_ids_and_minilm():
    assert all(resolve_pooling(name, "auto") == "cls" for name in NAMED_SIZES)
    assert resolve_pooling("bert-base-uncased", "auto") == "cls"  # a Hub id with no local folder
    assert resolve_pooling("minilm", "auto") == "mean"  # all-MiniLM-L6-v2 ships 1_Pooling with mean tokens
    assert resolve_pooling("minilm", "cls") == "cls"
    assert EncoderConfig().pooling == "auto"


def test_mean_pooling_formula():
    model = MultiTaskModel(nn.Identity(), pooling="mean")
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # (1, 3, 2), last position is padding
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(model._pool(hidden, mask), torch.tensor([[2.0, 3.0]]))
    with pytest.raises(ValueError, match="pooling"):
        MultiTaskModel(nn.Identity(), pooling="max")


# --- (c) evaluate ------------------------------------------------------------------------------------

def test_evaluate_token_classification_and_regression(tasks):
    model = _model(seed=0, tasks=tasks)
    model.train()
    ner = evaluate(model, tasks["wnut16"], "dev")
    assert model.training  # evaluation puts the model back in the mode it found
    assert set(ner) == {"entity_f1", "loss"}
    assert 0.0 <= ner["entity_f1"] <= 1.0
    assert ner["loss"] == pytest.approx(torch.log(torch.tensor(len(WNUT_TAGS))).item(), rel=0.2)  # untrained

    sts = evaluate(model, tasks["stsb"], "dev")
    assert set(sts) == {"pearson", "spearman", "loss"}
    assert all(-1.0 <= sts[k] <= 1.0 for k in ("pearson", "spearman"))
    assert sts["loss"] > 1.0  # labels are 0-5, an untrained head predicts about 0
    # Deterministic in eval mode, whatever the batch size.
    again = evaluate(model, tasks["stsb"], "dev", batch_size=17)
    assert again == pytest.approx(sts, abs=1e-5)

    rte = evaluate(model, tasks["rte"], "dev")
    assert set(rte) == {"accuracy", "loss"}
    correct = rte["accuracy"] * tasks["rte"].size("dev")  # a count of correct predictions
    assert tasks["rte"].size("dev") == 277 and correct == pytest.approx(round(correct), abs=1e-6)


@pytest.mark.parametrize("name", ["stsb", "wnut16"])
def test_predictions_come_back_in_file_order(tasks, name):
    # predict_split scores rows shortest first; an independent pass, one row at a time in file
    # order, gives the same prediction for each of the first 60 rows.
    model, task = _model(seed=0, tasks=tasks), tasks[name]
    assert len(set(task.lengths("dev")[:60].tolist())) > 5  # rows of many lengths: sorting reorders them
    preds, refs, _ = predict_split(model, task, "dev", batch_size=8)
    assert len(preds) == len(refs) == task.size("dev")
    with torch.no_grad():
        for i in range(60):
            batch = task.batch("dev", [i])
            p, y = predict(task.kind, model(name, batch)).numpy(), batch["labels"].numpy()
            if task.kind == "token_classification":
                (p,), (y,) = gather_tokens(p, y)
                assert preds[i] == p and refs[i] == y
            else:
                assert preds[i] == pytest.approx(p[0].item(), abs=1e-5) and refs[i] == y[0].item()


# --- (d) output shapes -------------------------------------------------------------------------------

def test_output_shapes(tasks):
    model = _model(seed=0, tasks=tasks)
    batches = _batches(tasks, n=5)
    with torch.no_grad():
        sentence = model("rte", batches["rte"])
        regression = model("stsb", batches["stsb"])
        tokens = model("wnut16", batches["wnut16"])
    assert sentence.shape == (5, 2)
    assert regression.shape in {(5,), (5, 1)}
    assert tokens.shape == (5, batches["wnut16"]["input_ids"].shape[1], len(WNUT_TAGS))
    assert batches["wnut16"]["labels"].shape == batches["wnut16"]["input_ids"].shape
    for name, batch in batches.items():
        loss = model.loss(name, batch)
        assert loss.shape == () and torch.isfinite(loss), name
