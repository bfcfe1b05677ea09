"""SynergyLM as a transformers causal LM: `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`.

The network is the project's own SynergyLM (synergy_dist/model/synergy.py, exported next to this file as
modeling_synergy.py by synergy_dist/hf/source.py): logits are its logits, and `generate` carries its generation
cache (attention KV, Mamba state, router state of every stage) between calls instead of recomputing.

- `attention_mask`: positions marked 0 are fed as PAD (not routed, no loss); a left-padded row runs with its real
  bytes first, so each row of a batch equals the row alone, cached or not.
- `labels` follow transformers' convention (the inputs; shifted here); the loss is the project's training loss
  (cross entropy + the ratio and MoE losses).
"""

from __future__ import annotations

import copy

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from data_pipeline.vocab import IGNORE_INDEX, PAD_ID
from synergy_dist.hf.configuration import SynergyConfig
from synergy_dist.model.config import ModelConfig
from synergy_dist.model.synergy import SynergyLM, real_first


class SynergyCache:
    """The cache transformers' generate hands back to the model: SynergyLM.new_cache() and the positions it holds."""

    is_compileable = False
    is_croppable = False

    def __init__(self, state: dict):
        self.state = state
        self.seen = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen


class SynergyForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SynergyConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules: list[str] = []

    def __init__(self, config: SynergyConfig):
        super().__init__(config)
        self.model = SynergyLM(ModelConfig(**copy.deepcopy(config.model)))
        self.post_init()

    def _init_weights(self, module) -> None:
        """SynergyLM initialises itself; an export loads every weight."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        model.restore_computed_buffers()
        return model

    def restore_computed_buffers(self) -> None:
        """transformers builds the model on the meta device and loads only the saved tensors, leaving the buffers
        a module computes for itself (RoPE frequencies, router tables: persistent=False) empty. Take them from
        the model built for real once more, so that no formula is written twice."""
        with torch.device("cpu"):
            built = SynergyLM(ModelConfig(**copy.deepcopy(self.config.model)))
        computed = dict(built.named_buffers())
        for name, buffer in self.model.named_buffers():
            if name not in self.model.state_dict():
                buffer.copy_(computed[name])

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is SynergyCache, made by forward on the first cached call

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.model.head

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                cache: SynergyCache | None = None, use_cache: bool | None = None,
                labels: torch.LongTensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        ids = input_ids
        if attention_mask is not None:
            ids = input_ids.masked_fill(attention_mask[:, -input_ids.shape[1]:] == 0, PAD_ID)
        if use_cache and cache is None:
            cache = SynergyCache(self.model.new_cache())
        if cache is None:
            targets = None
            if labels is not None:  # transformers' labels are the inputs: the target of position t is t + 1
                targets = torch.cat((labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)), dim=1)
                targets = targets.masked_fill(targets == PAD_ID, IGNORE_INDEX)
            # left padding (lm-eval's generate_until batches): the model expects padding only after a row's real
            # bytes, so each row runs with its real bytes first and the logits go back to the caller's positions
            order = real_first(ids != PAD_ID)
            if order is not None:
                ids = ids.gather(1, order)
                targets = None if targets is None else targets.gather(1, order)
            out = self.model(ids, targets)
            logits = out.logits
            if order is not None:
                logits = torch.empty_like(logits).scatter_(1, order[..., None].expand_as(logits), logits)
            return CausalLMOutputWithPast(loss=out.loss, logits=logits)
        if labels is not None:
            raise ValueError("labels need an uncached forward: pass use_cache=False")
        self.model._check_ids(ids, "input_ids")
        logits, _, _ = self.model._run(ids, cache.state)
        cache.seen += ids.shape[1]
        return CausalLMOutputWithPast(logits=logits, cache=cache)
