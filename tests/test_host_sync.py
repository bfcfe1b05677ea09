"""Host synchronisations inside a training step's forward and backward, counted on CPU.

On a GPU every op that needs a tensor's value on the host (`.item()`, `bool(t)`, `.tolist()`, `nonzero`) stalls the
host until the device catches up. A dispatch mode sees them on CPU too: `aten._local_scalar_dense` is what
item/bool/tolist run, `aten.nonzero` the data-dependent shapes. The dense step has exactly three, none per layer:
the input id range check and the document index (once per forward) and the concept count of downsampling (once
per stage). Remaining, listed in docs/TRAINING.md: one `nonzero` per MoE layer (the valid tokens it routes) and,
on packed windows longer than DOCUMENT_BLOCK units, one per attention layer (the blockwise key ranges)."""

from __future__ import annotations

import collections
import traceback

import pytest
import torch
from model_configs import two_stage_config, yaml_model_config
from torch.utils._python_dispatch import TorchDispatchMode

from data_pipeline.vocab import EOD_ID
from synergy_dist.model.synergy import SynergyLM

SYNCING_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique2",
               "aten.repeat_interleave.Tensor")


class SyncCounter(TorchDispatchMode):
    """Counts syncing ops by the project source line that issued them."""

    def __init__(self):
        super().__init__()
        self.sites: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(SYNCING_OPS):
            ours = [f for f in traceback.extract_stack() if "/synergy_dist/" in f.filename]
            where = ours[-1] if ours else None
            self.sites[f"{where.filename.split('/synergy_dist/')[-1]}:{where.name}" if where else "torch"] += 1
        return func(*args, **(kwargs or {}))


def step_sites(cfg) -> collections.Counter:
    torch.manual_seed(0)
    model = SynergyLM(cfg).train()
    ids = torch.randint(32, 127, (2, 256))
    ids[:, 90] = EOD_ID  # packed windows: document isolation on
    with SyncCounter() as counter:
        model(ids, labels=ids).loss.backward()
    return counter.sites


@pytest.mark.parametrize("name", ["tiny-cpu", "two-stage"])
def test_a_dense_step_synchronises_once_per_forward_and_stage(name):
    cfg = yaml_model_config("tiny-cpu") if name == "tiny-cpu" else two_stage_config()
    sites = step_sites(cfg)
    assert sites == {"model/synergy.py:_check_ids": 1, "model/synergy.py:_document_index": 1,
                     "model/chunking.py:downsample": len(cfg.stages)}, sites


def test_an_moe_step_adds_one_sync_per_moe_layer_and_none_in_statistics():
    cfg = yaml_model_config("tiny-moe-cpu")
    cfg.middle.moe.expert_parallel_size = 1
    sites = step_sites(cfg)
    moe_layers = len(cfg.middle.moe_layer_indices())
    assert sites == {"model/synergy.py:_check_ids": 1, "model/synergy.py:_document_index": 1,
                     "model/chunking.py:downsample": 1, "model/moe/layer.py:forward": moe_layers}, sites
