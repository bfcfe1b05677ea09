"""synergy-bench: measured speed and memory of the data pipeline, the model and the trainer.

Every benchmark measures its comparisons in the same run and reports ratios, the machine and the
date (results.py). Figures are never asserted in tests; tests check the harness and its arithmetic.
The research comparisons (quality table, other libraries) live in the checkout's benchmarks/ folder.
"""
