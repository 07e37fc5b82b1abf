"""Sweep configs for `python -m experiments.sweep` (see kdjax/sweep.py for the fields)."""
