"""synergy-bench: measured speed and memory of the data pipeline and the model, with anchors.

Every benchmark measures its comparisons in the same run and reports ratios, the machine and the
date (report.py). Figures are never asserted in tests; tests check the harness and its arithmetic.
"""
