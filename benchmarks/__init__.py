"""Research benchmarks of synergy-dist, run from a checkout (not installed): the quality comparison
(`python -m benchmarks.quality`) and the comparisons with other libraries (`python -m benchmarks.data_anchors`,
anchors/). They build on synergy_dist (synergy_dist.bench for the shared measurement harness); nothing in
synergy_dist imports them.
"""
