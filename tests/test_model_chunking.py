"""Routers, downsampling, smoothing and upsampling against slow loop references."""

import math

import pytest
import torch
from model_configs import tiny_test_config

from data_pipeline.vocab import EOD_ID
from synergy_dist.bench.loop import PlainLoop
from synergy_dist.config import config_from_dict
from synergy_dist.model.chunking import (
    BoundaryRouter,
    RouterState,
    downsample,
    ratio_loss,
    set_router_warmup,
    smooth,
    upsample,
)
from synergy_dist.model.config import RouterConfig, _validate_router
from synergy_dist.model.synergy import SynergyLM


def starts(ids: torch.Tensor) -> torch.Tensor:
    return torch.cat((torch.ones_like(ids[:, :1], dtype=torch.bool), ids[:, :-1] == EOD_ID), 1)


def test_ratio_loss_formula():
    n = 4.0
    at_target = ratio_loss(torch.tensor(0.25), torch.tensor(0.25), n)
    assert math.isclose(at_target.item(), 1.0, rel_tol=1e-6)
    for f, g in [(0.1, 0.3), (0.5, 0.5), (0.9, 0.2)]:
        loss = ratio_loss(torch.tensor(f), torch.tensor(g), n).item()
        # equivalent form 1 + (1 - N F)(1 - N G) / (N - 1)
        assert math.isclose(loss, 1 + (1 - n * f) * (1 - n * g) / (n - 1), rel_tol=1e-6)
    # gradient through G pushes the mean probability down when too many boundaries are taken
    g = torch.tensor(0.5, requires_grad=True)
    ratio_loss(torch.tensor(0.5), g, n).backward()
    assert g.grad > 0


def route(router, ids, state=None):
    x = torch.randn(1, ids.shape[1], 8)
    return router(x, ids, starts(ids), torch.ones_like(ids, dtype=torch.bool), state)


def test_space_router_opens_a_concept_at_each_word():
    router = BoundaryRouter(8, RouterConfig(kind="space"))
    ids = torch.tensor([list(b"Hello, big world!\n  x\xffy") + [EOD_ID] + list(b"ab")])
    out = route(router, ids)
    assert out.boundary[0].nonzero().flatten().tolist() == [0, 7, 11, 20, 24]
    assert out.prob[0, 24] == 1.0  # the byte after EOD starts a document


def test_stride_router_counts_inside_documents_and_across_calls():
    router = BoundaryRouter(8, RouterConfig(kind="stride", stride=3, target_bytes_per_concept=3.0))
    ids = torch.tensor([[1, 2, 3, 4, 5, EOD_ID, 6, 7, 8, 9, 10]])
    full = route(router, ids).boundary[0].nonzero().flatten().tolist()
    assert full == [0, 3, 6, 9]
    state, force = RouterState(), starts(ids)
    pieces = []
    for a, b in [(0, 4), (4, 5), (5, 8), (8, 11)]:  # incremental calls continue the document position
        valid = torch.ones(1, b - a, dtype=torch.bool)
        pieces.append(router(torch.zeros(1, b - a, 8), ids[:, a:b], force[:, a:b], valid, state).boundary)
    assert torch.cat(pieces, 1)[0].nonzero().flatten().tolist() == full


def test_cosine_router_starts_at_identity_and_forces_starts():
    router = BoundaryRouter(8, RouterConfig(kind="cosine"))
    x = torch.randn(1, 6, 8)
    x[0, 3] = x[0, 2] * 2.0  # same direction as the previous state: probability 0
    x[0, 4] = -x[0, 3]  # opposite direction: probability 1
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    out = router(x, ids, starts(ids), torch.ones(1, 6, dtype=torch.bool))
    cos = torch.nn.functional.cosine_similarity(x[0, 1:], x[0, :-1], dim=-1)
    torch.testing.assert_close(out.prob[0, 1:], (1 - cos) / 2, atol=1e-5, rtol=0)
    assert out.prob[0, 0] == 1.0 and out.boundary[0, 0]
    assert out.prob[0, 3] < 1e-5 and not out.boundary[0, 3]
    assert out.prob[0, 4] > 1 - 1e-5 and out.boundary[0, 4]


def test_gate_router_starts_near_target_rate():
    torch.manual_seed(0)
    router = BoundaryRouter(64, RouterConfig(kind="gate", target_bytes_per_concept=5.0))
    x = torch.randn(4, 2000, 64)
    out = router(x, None, torch.zeros(4, 2000, dtype=torch.bool), torch.ones(4, 2000, dtype=torch.bool))
    assert abs(out.boundary_rate.item() - 0.2) < 0.02


def test_invalid_positions_never_open_concepts():
    router = BoundaryRouter(8, RouterConfig(kind="stride", stride=1, target_bytes_per_concept=2.0))
    valid = torch.tensor([[True, True, True, False, False]])
    out = router(torch.zeros(1, 5, 8), None, torch.zeros(1, 5, dtype=torch.bool), valid)
    assert out.boundary.tolist() == [[True, True, True, False, False]]
    assert out.boundary_rate.item() == 1.0


def test_downsample_and_upsample_match_loops():
    torch.manual_seed(0)
    B, T, D = 3, 17, 4
    x = torch.randn(B, T, D)
    boundary = torch.rand(B, T) < 0.3
    boundary[:, 0] = True
    boundary[2, 5:] = False
    chunks = downsample(x, boundary)
    M = int(boundary.sum(1).max())
    assert chunks.x.shape == (B, M, D)
    for b in range(B):
        pos = boundary[b].nonzero().flatten()
        torch.testing.assert_close(chunks.x[b, : len(pos)], x[b, pos])
        assert chunks.valid[b].tolist() == [i < len(pos) for i in range(M)]
        assert (chunks.x[b, len(pos):] == 0).all()
        assert chunks.positions[b, : len(pos)].tolist() == pos.tolist()
    z = torch.randn(B, M, D)
    prob = torch.rand(B, T)
    up = upsample(z, boundary, prob, None, straight_through=True)
    for b in range(B):
        k = -1
        for t in range(T):
            k += int(boundary[b, t])
            torch.testing.assert_close(up[b, t], z[b, k])  # the STE factor is 1 in the forward pass


def test_straight_through_gradient_reaches_probabilities():
    boundary = torch.tensor([[True, False, True, False]])
    prob = torch.tensor([[0.9, 0.2, 0.7, 0.4]], requires_grad=True)
    z = torch.ones(1, 2, 1)
    up = upsample(z, boundary, prob, None, straight_through=True)
    up.sum().backward()
    # d/dp of c = p (boundary) or 1 - p (no boundary)
    assert prob.grad.tolist() == [[1.0, -1.0, 1.0, -1.0]]


def test_smoothing_matches_the_ema_loop():
    torch.manual_seed(0)
    z = torch.randn(2, 70, 3)
    P = torch.rand(2, 70) * 0.5 + 0.5
    previous = torch.randn(2, 3)
    out = smooth(z, P, previous, 1e-4)
    ref, state = [], previous
    for k in range(70):
        state = P[:, k, None] * z[:, k] + (1 - P[:, k, None]) * state
        ref.append(state)
    torch.testing.assert_close(out, torch.stack(ref, 1), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------- the router warm-up


def _warming(kind: str, warmup: int) -> BoundaryRouter:
    torch.manual_seed(0)
    return BoundaryRouter(8, RouterConfig(kind=kind, target_bytes_per_concept=3.0, warmup_steps=warmup))


@pytest.mark.parametrize("kind", ["cosine", "gate"])
def test_router_warmup_hands_a_fixed_stride_over_to_the_learned_router(kind):
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, EOD_ID, 8, 9, 10, 11, 12, 13]])
    x = torch.randn(1, ids.shape[1], 8)
    force, valid = starts(ids), torch.ones_like(ids, dtype=torch.bool)
    plain, warming = _warming(kind, 0), _warming(kind, 40)
    warming.load_state_dict(plain.state_dict())  # the share is not saved: the same weights
    learned = plain(x, ids, force, valid)

    set_router_warmup(warming, 0)  # step 0: the stride alone decides, every 3 bytes of each document
    start = warming(x, ids, force, valid)
    assert start.boundary[0].nonzero().flatten().tolist() == [0, 3, 6, 8, 11]
    # the ratio loss still trains the learned router on its own decisions, as without a warm-up
    assert torch.equal(start.ratio_loss, learned.ratio_loss)

    set_router_warmup(warming, 10)  # a quarter of the way: p = 0.75 stride + 0.25 learned
    stride = torch.tensor([[1, 0, 0, 1, 0, 0, 1, 0, 1, 0, 0, 1, 0, 0]], dtype=torch.float32)  # document positions % 3
    torch.testing.assert_close(warming(x, ids, force, valid).prob,
                               torch.where(force, 1.0, 0.75 * stride + 0.25 * learned.prob))
    for step in (40, 1000):  # over: exactly the learned router
        set_router_warmup(warming, step)
        after = warming(x, ids, force, valid)
        assert torch.equal(after.prob, learned.prob) and torch.equal(after.boundary, learned.boundary)
        assert torch.equal(after.ratio_loss, learned.ratio_loss)


def test_router_warmup_schedule_and_its_callers():
    router = _warming("cosine", 50)
    shares = []
    for step in (0, 25, 49, 50, 80):
        set_router_warmup(router, step)
        shares.append(router.stride_share.item())
    assert shares == pytest.approx([1.0, 0.5, 0.02, 0.0, 0.0])
    assert "stride_share" not in router.state_dict()  # a resumed run sets it from its step
    assert not hasattr(_warming("cosine", 0), "stride_share")
    with pytest.raises(ValueError, match=r"warmup_steps=-1 must be a whole number of steps >= 0"):
        _validate_router("model.stages.0.router", RouterConfig(warmup_steps=-1), is_byte_level=True)


def test_the_benchmark_loop_sets_the_warmup_of_each_step():
    cfg = tiny_test_config("cosine")
    cfg.stages[0].router.warmup_steps = 4
    torch.manual_seed(0)
    model = SynergyLM(cfg)
    loop = PlainLoop(model, model.param_groups(0.0), config_from_dict({"train": {"max_steps": 8}}))
    ids = torch.randint(0, 256, (2, 24))
    rates = []

    def loss_fn(batch):
        out = model(batch, labels=batch)
        rates.append(out.stats.boundary_rate.item())
        return out.loss, None

    for step in range(2):
        loop.step(step, [ids], loss_fn)
    assert rates[0] == pytest.approx(1 / 3)  # step 0: a boundary every 3 bytes of each row, nothing else
    assert next(m for m in model.modules() if isinstance(m, BoundaryRouter)).stride_share.item() == 0.75
