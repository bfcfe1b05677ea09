"""train.compile: every block through torch.compile inside the DeepSpeed engine, routing eager.

The runs use the aot_eager backend (dynamo's graph capture and AOT autograd, no code generation): it is what
decides graph breaks and recompilations, and it compiles in seconds where inductor's C++ takes minutes on CPU.
Inductor's generated code is checked by one opt-in test (SYNERGY_TEST_INDUCTOR=1, about 90 s) and, on a GPU, by
tests/test_gpu.py; its speed by `synergy-bench model --compile` (docs/BENCHMARKS.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import train_launch as tl

from data_pipeline.vocab import EOD_ID
from synergy_dist.bench.device import step_batches
from synergy_dist.config import load_config
from synergy_dist.model.synergy import SynergyLM
from synergy_dist.train.compile import compile_blocks, compile_counts

pytestmark = pytest.mark.slow

STEPS = 20


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sample_shards")


def run(tmp_path: Path, sample_dir: Path, name: str, **train) -> list[dict]:
    cfg = tl.tiny_config(tmp_path / name, sample_dir, train={"max_steps": STEPS, "lr": 3e-3, "sample_bytes": 0,
                                                             **train},
                         checkpoint={"every_steps": 0}, data={"seq_len": 128, "sample_dir": str(sample_dir)})
    assert tl.run(cfg) == 0, tl.output_of(cfg)[-4000:]
    return tl.metrics(cfg)


def test_compiled_training_matches_eager_with_bounded_graphs(tmp_path, sample_dir):
    eager = run(tmp_path, sample_dir, "eager")
    compiled = run(tmp_path, sample_dir, "compiled", compile=True, compile_backend="aot_eager")
    assert [r["step"] for r in compiled] == [r["step"] for r in eager] == list(range(1, STEPS + 1))
    for a, b in zip(compiled, eager):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["step"]
    # real text: concept counts change every step and packed windows switch document isolation on and off, yet
    # the block forward compiles once per width (2) and document-index variant (2), plus at most a few
    # specialisations (a 1-concept middle); one graph per variant: nothing inside a block breaks its graph
    variants = [r["block_variants"] for r in compiled]
    assert variants == sorted(variants) and 4 <= variants[-1] <= 8
    assert compiled[-1]["compiled_graphs"] == variants[-1]


def test_compiled_blocks_keep_parameter_names_generation_and_one_graph_set_for_every_length():
    torch.manual_seed(0)
    # A stride-2 router makes 150-210 concepts of these windows, each row two documents: more than one
    # DOCUMENT_BLOCK, so the middle's attention runs blockwise, a loop that follows the length (compiled, it
    # specialised for every concept count).
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml",
                      ["model.stages.0.router.kind=stride", "model.stages.0.router.stride=2"])
    model, eager = SynergyLM(cfg.model), SynergyLM(cfg.model)
    eager.load_state_dict(model.state_dict())
    names = list(model.state_dict())
    # dynamo's capture without AOT autograd: what could rename parameters or change numbers, in a third of the time
    assert compile_blocks(model, "eager") == 7  # 2 + 2 Mamba blocks of the stage, 3 attention blocks
    assert list(model.state_dict()) == names
    graphs = []
    for length in (300, 340, 380, 420):
        ids = torch.randint(0, 256, (2, length))
        ids[:, length // 3] = EOD_ID
        torch.testing.assert_close(model(ids).logits, eager(ids).logits, rtol=1e-5, atol=1e-5)
        graphs.append(compile_counts()["compiled_graphs"])
    assert graphs[-1] == graphs[1], graphs  # after the first two lengths, no new graph for a new concept count
    assert model.generate(b"def ", 24, temperature=0) == eager.generate(b"def ", 24, temperature=0)


def test_unknown_backend_is_refused_by_the_config():
    with pytest.raises(ValueError, match="train.compile_backend='tvm' is not supported; use one of inductor"):
        load_config(None, ["train.compile_backend=tvm"])


@pytest.mark.skipif(not os.environ.get("SYNERGY_TEST_INDUCTOR"),
                    reason="inductor compiles the blocks' C++ for about 90 s on a CPU; SYNERGY_TEST_INDUCTOR=1 runs it")
def test_inductor_training_equals_eager_in_float64():
    # float64 so that any difference is the generated code's, not round-off: in float32 the router's discrete
    # boundaries amplify round-off until runs part (docs/TRAINING.md)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml").model
    batches = step_batches(seq_len=256, batch=2, n_steps=6, packed=True, device=torch.device("cpu"))

    def train(compiled: bool) -> list[float]:
        torch.manual_seed(0)
        model = SynergyLM(cfg).double()
        if compiled:
            compile_blocks(model, "inductor")
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for batch in batches:
            out = model(*batch)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(out.loss.item())
        return losses

    assert train(compiled=True) == pytest.approx(train(compiled=False), rel=1e-10)
