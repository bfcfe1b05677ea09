"""Byte-shard data pipeline: preprocess corpora into zstd shards and stream them."""
