"""Experiments: method x target x data fraction x seed sweeps, tables and plots."""


class SweepFailed(RuntimeError):
    """Jobs of a sweep failed on every attempt; the message names their cells and logs."""
