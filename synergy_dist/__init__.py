"""synergy-dist: pretraining tokenizer-free hierarchical byte-level language models."""

from pathlib import Path

__version__ = "0.1.0"

SAMPLE_CORPUS = Path(__file__).parent / "sample_data" / "sample.jsonl.zst"
