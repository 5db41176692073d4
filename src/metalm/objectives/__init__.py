"""Pre-training objectives on unlabelled text (Wu et al. 2022 §4.1): corruption functions and
the corpus-backed task that binds them to a tokenised corpus."""
