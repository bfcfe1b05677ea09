"""Write a SynergyLM as a transformers model directory (synergy-export --format hf).

    write_hf_model(model_cfg, weights, Path("exported/tiny-hf"), max_length=512)

DIR/config.json (SynergyConfig: the model config, auto_map to the remote code), generation_config.json (greedy
decoding as synergy-generate does it: stop at EOD, never produce PAD), model.safetensors (float32, keys under
`model.`), tokenizer_config.json (the byte tokenizer) and the model's source as flat modules (source.py). Load it
where transformers is installed, without this project or DeepSpeed:

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig

from data_pipeline.vocab import EOD_ID, PAD_ID
from synergy_dist.hf.configuration import SynergyConfig
from synergy_dist.hf.source import flat_name, write_model_source
from synergy_dist.hf.tokenizer import SynergyByteTokenizer
from synergy_dist.model.config import ModelConfig

HF_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
PREFIX = "model."  # SynergyForCausalLM holds the SynergyLM as .model


def hf_config(model_cfg: ModelConfig, max_length: int) -> SynergyConfig:
    """The transformers config of a single-process SynergyLM (expert_parallel_size 1)."""
    config = SynergyConfig(model=dataclasses.asdict(model_cfg), vocab_size=model_cfg.vocab_size,
                           max_position_embeddings=max_length)
    config.architectures = ["SynergyForCausalLM"]
    config.auto_map = {"AutoConfig": f"{flat_name('synergy_dist.hf.configuration')}.SynergyConfig",
                       "AutoModelForCausalLM": f"{flat_name('synergy_dist.hf.modeling')}.SynergyForCausalLM"}
    return config


def write_hf_model(model_cfg: ModelConfig, weights: dict[str, torch.Tensor], output: Path, max_length: int,
                   metadata: dict[str, str] | None = None) -> Path:
    """Write the directory; `weights` is a SynergyLM state dict (float32). Returns `output`."""
    output.mkdir(parents=True, exist_ok=True)
    hf_config(model_cfg, max_length).save_pretrained(output)
    GenerationConfig(bos_token_id=EOD_ID, eos_token_id=EOD_ID, pad_token_id=PAD_ID,
                     suppress_tokens=list(range(PAD_ID, model_cfg.vocab_size))).save_pretrained(output)
    # every tensor its own copy: a tied head and embedding are stored twice, so no key is missing on load
    tensors = {PREFIX + k: v.detach().to(torch.float32).clone().contiguous() for k, v in weights.items()}
    save_file(tensors, str(output / HF_WEIGHTS), metadata={"format": "pt", **(metadata or {})})
    write_tokenizer(output)
    write_model_source(output)
    return output


def write_tokenizer(output: Path) -> None:
    SynergyByteTokenizer().save_pretrained(output)
    path = output / TOKENIZER_CONFIG
    values = json.loads(path.read_text())
    values["auto_map"] = {"AutoTokenizer": [f"{flat_name('synergy_dist.hf.tokenizer')}.SynergyByteTokenizer", None]}
    path.write_text(json.dumps(values, indent=2) + "\n")
