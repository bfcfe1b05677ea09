"""Document isolation: packed documents never see each other, in training and in cached generation.

A document starts at its EOD. Document B's logits and loss are the same whether document A precedes it in the
window or B starts the window, for every layer type, router, one and two stages, dense and MoE middles; B's loss
has no gradient on A's positions; cached generation reads a new document as if it started the sequence.
"""

import pytest
import torch
import torch.nn.functional as F
from model_configs import tiny_test_config

from data_pipeline.vocab import EOD_ID
from synergy_dist.model.chunking import smooth
from synergy_dist.model.config import MambaConfig, ModelConfig, MoEConfig, RouterConfig, StackConfig, StageConfig
from synergy_dist.model.layers import DOCUMENT_BLOCK, Attention
from synergy_dist.model.ssd import ssd_scan
from synergy_dist.model.synergy import SynergyLM

ROUTERS = ["cosine", "gate", "stride", "space"]
LETTERS = ["A", "M", "MA", "AM"]
TAIL = list(b"end of an earlier document. ")  # the window starts inside a document (document 0 of the window)
DOC_A = list(b"Document A talks about apples, pears and plums.")
DOC_B = list(b"B: the quick brown fox jumps over the lazy dog 42 times!")
FP64_TOL, FP32_TOL = 1e-9, 1e-5


def two_stage_test_config(router: str, letters: str) -> ModelConfig:
    """A tiny two-stage hierarchy (bytes -> concepts -> super-concepts -> middle) with the given layer letters."""
    mamba = MambaConfig(d_state=8, head_dim=8, chunk_size=8)
    stack = dict(pattern=letters, n_heads=2, mlp_ratio=2.0, mamba=mamba)
    inner_router = "cosine" if router == "space" else router  # the space router only works on bytes

    def stage(width, kind):
        return StageConfig(d_model=width, encoder=StackConfig(**stack), decoder=StackConfig(**stack),
                           router=RouterConfig(kind=kind, target_bytes_per_concept=2.0, stride=2))

    return ModelConfig(stages=[stage(16, router), stage(24, inner_router)], d_middle=32,
                       middle=StackConfig(pattern=letters, pos_encoding="none", n_heads=2, mlp_ratio=2.0, mamba=mamba))


def build(router: str, letters: str, stages: int = 1, moe: bool = False, isolation: bool = True) -> SynergyLM:
    """A tiny model with a large init std (many boundaries, varied predictions); float64 unless MoE (fp32 gates)."""
    torch.manual_seed(0)
    cfg = tiny_test_config(router, letters, letters) if stages == 1 else two_stage_test_config(router, letters)
    cfg.init_std = 0.2
    cfg.document_isolation = isolation
    if moe:
        cfg.middle.moe_every = 1
        cfg.middle.moe = MoEConfig(n_experts=4, top_k=2, shared_expert=True, dropless=True)
    model = SynergyLM(cfg)
    return model if moe else model.double()


def windows() -> tuple[torch.Tensor, torch.Tensor, int]:
    """(packed: [tail] EOD A EOD B, alone: EOD B, index of B's EOD in the packed window)."""
    packed = TAIL + [EOD_ID] + DOC_A + [EOD_ID] + DOC_B
    return torch.tensor([packed]), torch.tensor([[EOD_ID] + DOC_B]), len(TAIL) + 1 + len(DOC_A)


def assert_same(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Equal to `tol` relative to the largest magnitude (float32 rounding grows with the logits' scale)."""
    torch.testing.assert_close(actual, expected, atol=tol * max(1.0, expected.abs().max().item()), rtol=0)


def b_loss(logits: torch.Tensor, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Cross entropy of B's next-byte predictions (inputs start .. end-1 predict start+1 .. end)."""
    return F.cross_entropy(logits[0, start:-1].float(), ids[0, start + 1:], reduction="sum")


CASES = [(r, letters, stages, moe) for r in ROUTERS for letters in LETTERS for stages in (1, 2)
         for moe in (False, True)]


@pytest.mark.parametrize("router,letters,stages,moe", CASES)
def test_document_b_does_not_see_document_a(router, letters, stages, moe):
    model = build(router, letters, stages, moe).train()
    tol = FP32_TOL if moe else FP64_TOL
    packed, alone, start = windows()

    # training forward: B's logits and loss
    x = model.embed(packed).detach().requires_grad_(True)
    logits_packed, _, _ = model._run_embedded(x, packed, None)
    logits_alone = model(alone).logits
    assert_same(logits_packed[0, start:], logits_alone[0], tol)
    loss_packed, loss_alone = b_loss(logits_packed, packed, start), b_loss(logits_alone, alone, 0)
    assert_same(loss_packed, loss_alone, tol)

    # no gradient from B's loss reaches the tail or A, not even round-off; B's own inputs get one
    (grad,) = torch.autograd.grad(loss_packed, x)
    assert grad[0, start:].abs().max().item() > 0
    assert grad[0, :start].abs().max().item() == 0.0

    # cached generation: a new document inside a call and at a call's first byte, then byte-by-byte decoding
    model.eval()
    with torch.no_grad():
        reference = model(alone).logits[0]
        cache = model.new_cache()
        cut = start + 4  # call 1: tail, EOD, A; call 2: B's first bytes; then one byte per call
        pieces = [model._run(packed[:, :start], cache)[0], model._run(packed[:, start:cut], cache)[0]]
        pieces += [model._run(packed[:, t:t + 1], cache)[0] for t in range(cut, packed.shape[1])]
        cached = torch.cat(pieces, dim=1)[0, start:]
        assert_same(cached, reference, tol)

        cache = model.new_cache()  # `EOD A EOD B` prefilled in one call, then B continued by decoding
        prefix = packed[:, : start + 10]
        pieces = [model._run(prefix, cache)[0]] + [model._run(packed[:, t:t + 1], cache)[0]
                                                   for t in range(start + 10, packed.shape[1])]
        assert_same(torch.cat(pieces, dim=1)[0, start:], reference, tol)


@pytest.mark.parametrize("router", ROUTERS)
def test_float32_model_is_isolated_to_1e5(router):
    torch.manual_seed(0)
    cfg = tiny_test_config(router, "MA", "AM")
    cfg.init_std = 0.2
    model = SynergyLM(cfg).train()
    packed, alone, start = windows()
    with torch.no_grad():
        assert_same(model(packed).logits[0, start:], model(alone).logits[0], FP32_TOL)


@pytest.mark.parametrize("stages", [1, 2])
def test_without_isolation_documents_leak(stages):
    packed, alone, start = windows()
    spread = {}
    for isolation in (True, False):
        model = build("cosine", "MA", stages, isolation=isolation).eval()
        with torch.no_grad():
            spread[isolation] = (model(packed).logits[0, start:] - model(alone).logits[0]).abs().max().item()
    assert spread[True] < FP64_TOL
    assert spread[False] > 1e-3  # the previous document changes B's predictions when nothing isolates them


@pytest.mark.parametrize("router", ROUTERS)
def test_every_eod_is_its_own_concept_and_no_byte_takes_another_documents_concept(router):
    model = build(router, "M").eval()
    routes = []
    model.body.router.register_forward_hook(lambda mod, args, out: routes.append(out.boundary))
    packed, _, _ = windows()
    batch = torch.cat((packed, packed.roll(17, dims=1)))  # EODs at other positions in the second row
    with torch.no_grad():
        model(batch)
    boundary = routes[0]
    eod = batch == EOD_ID
    after_eod = torch.cat((torch.ones_like(eod[:, :1]), eod[:, :-1]), dim=1)
    assert boundary[eod].all() and boundary[after_eod].all()
    doc = eod.long().cumsum(dim=1)
    idx = torch.arange(batch.shape[1]).expand_as(batch)
    concept_start = torch.where(boundary, idx, torch.full_like(idx, -1)).cummax(dim=1).values  # what upsample hands
    assert (concept_start >= 0).all()
    assert torch.equal(torch.gather(doc, 1, concept_start), doc)


@pytest.mark.parametrize("chunk", [1, 3, 4, 16])
def test_ssd_scan_with_document_index_equals_separate_scans(chunk):
    torch.manual_seed(0)
    b, l, h, p, n = 2, 13, 2, 3, 4
    x, B, C = torch.randn(b, l, h, p, dtype=torch.float64), torch.randn(b, l, n, dtype=torch.float64), \
        torch.randn(b, l, n, dtype=torch.float64)
    log_a = -torch.rand(b, l, h, dtype=torch.float64)
    initial = torch.randn(b, h, p, n, dtype=torch.float64)
    starts = [[0, 4, 5, 9], [0, 8]]  # row 0: documents of 4, 1, 4, 4 steps; row 1: 8, 5
    seq_idx = torch.zeros(b, l, dtype=torch.long)
    for row, row_starts in enumerate(starts):
        for s in row_starts[1:]:
            seq_idx[row, s:] += 1
    y, final = ssd_scan(x, log_a, B, C, chunk, initial, seq_idx)
    for row, row_starts in enumerate(starts):
        bounds = row_starts + [l]
        for k, (s, e) in enumerate(zip(bounds, bounds[1:])):
            init = initial[row:row + 1] if k == 0 else None  # the initial state belongs to the first document
            y_doc, final_doc = ssd_scan(x[row:row + 1, s:e], log_a[row:row + 1, s:e], B[row:row + 1, s:e],
                                        C[row:row + 1, s:e], chunk, init)
            torch.testing.assert_close(y[row:row + 1, s:e], y_doc, atol=1e-12, rtol=0)
        torch.testing.assert_close(final[row:row + 1], final_doc, atol=1e-12, rtol=0)


def test_smoothing_restarts_exactly_at_a_document_start():
    torch.manual_seed(0)
    z = torch.randn(1, 5, 3, dtype=torch.float64)
    P = torch.tensor([[1.0, 0.3, 1.0, 0.6, 0.2]], dtype=torch.float64)  # the third concept starts a document
    seq_idx = torch.tensor([[0, 0, 1, 1, 1]])
    eps = 1e-4
    out = smooth(z, P, None, eps, seq_idx)
    torch.testing.assert_close(out[:, 2], (1 - eps) * z[:, 2], atol=0, rtol=0)  # nothing of concept 1 carried
    torch.testing.assert_close(out[:, 2:], smooth(z[:, 2:], P[:, 2:], None, eps), atol=1e-15, rtol=0)
    carried = smooth(z, P, None, eps)  # without the document index the clamp lets 1e-4 through
    assert (carried[:, 2] - out[:, 2]).abs().max() > 1e-6


@pytest.mark.parametrize("window", [0, 50])
def test_attention_over_long_packed_rows_equals_each_document_alone(window):
    """Rows longer than DOCUMENT_BLOCK run block by block; each document reads as if it were alone."""
    torch.manual_seed(0)
    attn = Attention(32, StackConfig(n_heads=2, sliding_window=window), 1e-5).double()
    length = 2 * DOCUMENT_BLOCK + 45
    starts = [[0, 7, 140, 141, 200], [0, 260]]
    seq_idx = torch.zeros(2, length, dtype=torch.long)
    for row, row_starts in enumerate(starts):
        for s in row_starts[1:]:
            seq_idx[row, s:] += 1
    x = torch.randn(2, length, 32, dtype=torch.float64)
    with torch.no_grad():
        y = attn(x, None, seq_idx)
        for row, row_starts in enumerate(starts):
            bounds = row_starts + [length]
            for s, e in zip(bounds, bounds[1:]):
                torch.testing.assert_close(y[row, s:e], attn(x[row:row + 1, s:e])[0], atol=1e-12, rtol=0)


def test_document_isolation_is_a_boolean_config_key():
    assert ModelConfig().document_isolation is True  # on by default
    assert ModelConfig(document_isolation=False).document_isolation is False
    with pytest.raises(ValueError, match="model.document_isolation='yes' must be true or false"):
        ModelConfig(document_isolation="yes")
