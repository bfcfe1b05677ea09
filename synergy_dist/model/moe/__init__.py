"""Mixture-of-Experts feed-forward: gate and routing maths, losses, load statistics, experts, expert
parallelism, the layer."""
