"""Checkpoints: saving and finding them (store.py), DeepSpeed's files (deepspeed_files.py), full model
weights (consolidate.py), and resuming on another geometry (elastic.py, expert_layout.py)."""
