"""Host synchronisations inside a training step's forward and backward, counted on CPU.

On a GPU every op that needs a tensor's value on the host (`.item()`, `bool(t)`, `.tolist()`, `nonzero`) stalls the
host until the device catches up. A dispatch mode sees most of them on CPU too: `aten._local_scalar_dense` is what
item/bool run, `aten.nonzero` the data-dependent shapes; `.tolist()` is counted by wrapping it. The dense step has
exactly three, none per layer: the input id range check and the document index (once per forward) and the concept
count of downsampling (once per stage); an MoE layer adds one, its experts' slice sizes (docs/TRAINING.md). Counted
as on an accelerator: on CPU, blockwise attention also reads its blocks' document starts on the host (free there).
tests/test_gpu.py counts on CUDA as it runs."""

from __future__ import annotations

import collections
import traceback

import pytest
import torch
from model_configs import two_stage_config, yaml_model_config
from torch.utils._python_dispatch import TorchDispatchMode

from data_pipeline.vocab import EOD_ID
from synergy_dist.model import layers
from synergy_dist.model.synergy import SynergyLM

SYNCING_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique2",
               "aten.repeat_interleave.Tensor")


class SyncCounter(TorchDispatchMode):
    """Counts syncing ops by the project function that issued them. `Tensor.tolist` reads the data without
    dispatching an op (on a GPU it copies to the host first), so it is counted by wrapping it."""

    def __init__(self):
        super().__init__()
        self.sites: collections.Counter[str] = collections.Counter()
        self.tolist = torch.Tensor.tolist

    def record(self) -> None:
        ours = [f for f in traceback.extract_stack() if "/synergy_dist/" in f.filename]
        where = ours[-1] if ours else None
        self.sites[f"{where.filename.split('/synergy_dist/')[-1]}:{where.name}" if where else "torch"] += 1

    def __enter__(self):
        original = self.tolist

        def counted_tolist(tensor):
            self.record()
            return original(tensor)

        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self.tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(SYNCING_OPS):
            self.record()
        return func(*args, **(kwargs or {}))


def step_sites(cfg) -> collections.Counter:
    torch.manual_seed(0)
    model = SynergyLM(cfg).train()
    ids = torch.randint(32, 127, (2, 256))
    ids[:, 90] = EOD_ID  # packed windows: document isolation on
    with SyncCounter() as counter:
        model(ids, labels=ids).loss.backward()
    return counter.sites


@pytest.fixture
def as_on_an_accelerator(monkeypatch):
    """Blockwise attention as it runs on a GPU: key ranges from positions only. On CPU it also reads its blocks'
    document starts (one `tolist` per attention layer on packed windows > 128 units), free on CPU."""
    monkeypatch.setattr(layers, "skips_earlier_documents", lambda device: False)


def attention_bytes_config():
    """tiny-cpu with attention at the byte level: 256-byte packed windows run by blocks of 128 queries."""
    cfg = yaml_model_config("tiny-cpu")
    cfg.stages[0].encoder.pattern = cfg.stages[0].decoder.pattern = "AA"
    return cfg


@pytest.mark.parametrize("name", ["tiny-cpu", "two-stage", "attention-bytes"])
def test_a_dense_step_synchronises_once_per_forward_and_stage(name, as_on_an_accelerator):
    cfg = {"tiny-cpu": lambda: yaml_model_config("tiny-cpu"), "two-stage": two_stage_config,
           "attention-bytes": attention_bytes_config}[name]()
    sites = step_sites(cfg)
    assert sites == {"model/synergy.py:_check_ids": 1, "model/synergy.py:_document_index": 1,
                     "model/chunking.py:downsample": len(cfg.stages)}, sites


@pytest.mark.parametrize("scoring, capacity", [("softmax", None), ("sigmoid_bias", 1.25)])
def test_an_moe_step_adds_one_sync_per_moe_layer_and_none_in_statistics(scoring, capacity, as_on_an_accelerator):
    """The padded middle routes every slot and masks padding out, so the one sync per MoE layer is the experts'
    slice sizes (dropless or with capacity, softmax or the sequence-wise balance loss alike)."""
    cfg = yaml_model_config("tiny-moe-cpu")
    cfg.middle.moe.expert_parallel_size = 1
    cfg.middle.moe.scoring = scoring
    if capacity:
        cfg.middle.moe.dropless, cfg.middle.moe.capacity_factor_train = False, capacity
    sites = step_sites(cfg)
    moe_layers = len(cfg.middle.moe_layer_indices())
    assert sites == {"model/synergy.py:_check_ids": 1, "model/synergy.py:_document_index": 1,
                     "model/chunking.py:downsample": 1, "model/moe/layer.py:_run_experts": moe_layers}, sites


def test_blockwise_attention_is_the_same_with_and_without_skipping_earlier_documents(monkeypatch):
    cfg = attention_bytes_config()
    torch.manual_seed(0)
    model = SynergyLM(cfg).eval()
    ids = torch.randint(32, 127, (2, 400))
    ids[:, [90, 200, 330]] = EOD_ID
    with torch.no_grad():
        on_cpu = model(ids).logits
        monkeypatch.setattr(layers, "skips_earlier_documents", lambda device: False)
        positions_only = model(ids).logits
    torch.testing.assert_close(positions_only, on_cpu, rtol=1e-5, atol=1e-5)
