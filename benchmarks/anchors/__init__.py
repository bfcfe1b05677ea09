"""Anchor measurements run in their own processes (and, for MosaicML streaming, its own venv).

Each script here is standalone: it imports nothing from synergy_dist, takes its settings as
command-line arguments, measures after its imports are done, and prints one JSON object on its
last stdout line.
"""
