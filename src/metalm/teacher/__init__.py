"""A teacher that meta-learns the language-modelling objective (Shen, "Meta Language Modeling").

``objective`` holds the update rules (hard labels, soft labels, fixed-y denoising, MLM),
``model`` the pre-LayerNorm encoders, ``twomoons`` the Two Moons-as-text data, ``pretrain`` and
``finetune`` one run, ``study`` the Two Moons study (``metalm twomoons``).
"""
