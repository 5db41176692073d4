"""Experiments: method x target x data fraction x seed sweeps, tables and plots."""
