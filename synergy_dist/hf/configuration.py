"""The transformers configuration of an exported SynergyLM: the project's ModelConfig, as a plain dict.

Exported as configuration_synergy.py (synergy_dist/hf/source.py); `SynergyConfig.model` rebuilds the network
with ModelConfig(**config.model), expert parallelism folded to 1.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

from data_pipeline.vocab import EOD_ID, PAD_ID, VOCAB_SIZE


class SynergyConfig(PreTrainedConfig):
    model_type = "synergy"

    model: dict | None = None  # the training config's `model` section (synergy_dist/model/config.py)
    vocab_size: int = VOCAB_SIZE
    # the training window: lm-evaluation-harness cuts rolling perplexity into windows of this length, as
    # synergy-eval does (docs/EVALUATION.md)
    max_position_embeddings: int = 2048
    bos_token_id: int | None = EOD_ID  # EOD before a text starts a document, as in training
    eos_token_id: int | None = EOD_ID
    pad_token_id: int | None = PAD_ID
