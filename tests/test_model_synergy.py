"""SynergyLM end to end: causality, gradients, cached generation, hierarchy variants, losses, groups."""

import math

import pytest
import torch
from model_configs import byte_transformer_config, tiny_test_config, two_stage_config

from data_pipeline.vocab import EOD_ID, IGNORE_INDEX, PAD_ID
from synergy_dist.model.accounting import flops_per_byte, param_counts
from synergy_dist.model.config import ModelConfig, MoEConfig, StackConfig
from synergy_dist.model.statistics import ModelStatistics
from synergy_dist.model.synergy import HierarchyStage, SynergyLM, sample_next

ROUTERS = ["cosine", "gate", "stride", "space"]
TEXT = b"The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! 0123"


def build(router="cosine", letters="MA", init_std=0.2, seed=0, moe=False) -> SynergyLM:
    """A tiny model; a large init std makes random-weight predictions diverse (more boundaries, varied bytes)."""
    torch.manual_seed(seed)
    cfg = tiny_test_config(router=router, layers=letters, middle=letters)
    cfg.init_std = init_std
    if moe:
        cfg.middle.moe_every = 1
        cfg.middle.moe = MoEConfig(n_experts=4, top_k=2, shared_expert=True, dropless=True)
    return SynergyLM(cfg)


def text_batch(batch=2, length=64, offset=0) -> torch.Tensor:
    data = list(TEXT * 4)
    rows = [data[offset + 7 * b: offset + 7 * b + length] for b in range(batch)]
    ids = torch.tensor(rows)
    ids[0, 20] = EOD_ID  # a document boundary inside the window
    return ids


VARIANTS = [(r, l) for r in ROUTERS for l in ("A", "M")] + [("cosine", "MA")]


@pytest.mark.parametrize("router,letters", VARIANTS)
def test_causality(router, letters):
    model = build(router, letters).eval()
    ids = text_batch()
    t = 40
    changed = ids.clone()
    changed[0, t + 1:] = torch.randint(0, 256, (ids.shape[1] - t - 1,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[0, : t + 1], b[0, : t + 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-5)  # other sequences of the batch are untouched
    assert (a[0, t + 2:] - b[0, t + 2:]).abs().max() > 1e-3  # the test can see a change when there is one


def test_causality_two_stage_and_dropless_moe():
    for model in (SynergyLM(two_stage_config()).eval(), build(moe=True).eval()):
        ids = text_batch(length=96)
        changed = ids.clone()
        changed[0, 61:] = (changed[0, 61:] + 1) % 256
        with torch.no_grad():
            a, b = model(ids).logits, model(changed).logits
        torch.testing.assert_close(a[0, :61], b[0, :61], atol=1e-5, rtol=1e-5)
        assert (a[0, 61:] - b[0, 61:]).abs().max() > 1e-3


@pytest.mark.parametrize("router", ROUTERS)
def test_gradients_reach_every_parameter(router):
    model = build(router, "MA", init_std=0.02, moe=(router == "cosine"))
    ids = text_batch()
    out = model(ids, labels=ids.roll(-1, 1))
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
    if router in ("cosine", "gate"):
        router_params = [p for n, p in model.named_parameters() if ".router." in n and "inner" not in n]
        assert router_params and all(p.grad.abs().sum() > 0 for p in router_params)


def test_router_gradient_comes_only_through_straight_through_and_ratio_loss():
    model = build("cosine", "MA", init_std=0.02)
    model.cfg.stages[0].router.ratio_loss_coef = 0.0
    model.body.cfg.router.straight_through = False
    model.body.cfg.router.smoothing = False
    ids = text_batch()
    model(ids, labels=ids).loss.backward()
    assert model.body.router.q_proj.weight.grad is None or model.body.router.q_proj.weight.grad.abs().sum() == 0
    model.zero_grad()
    model.body.cfg.router.straight_through = True
    model(ids, labels=ids).loss.backward()
    assert model.body.router.q_proj.weight.grad.abs().sum() > 0


def reference_generate(model, prompt: bytes, n: int, temperature: float, seed: int) -> bytes:
    """Decoding by full recomputation of the whole sequence at every step."""
    generator = torch.Generator().manual_seed(seed)
    seq, out = [EOD_ID, *prompt], []
    with torch.no_grad():
        for _ in range(n):
            nxt = sample_next(model(torch.tensor([seq])).logits[0, -1], temperature, None, None, generator)
            if nxt >= 256:
                break
            out.append(nxt)
            seq.append(nxt)
    return bytes(out)


@pytest.mark.parametrize("router,letters", VARIANTS)
def test_cached_generation_equals_full_recomputation(router, letters):
    model = build(router, letters).eval()
    prompt = b"Hello world, th"
    greedy = model.generate(prompt, 40, temperature=0)
    assert greedy == reference_generate(model, prompt, 40, 0.0, 0)
    sampled = model.generate(prompt, 40, temperature=1.0, seed=7)
    assert sampled == reference_generate(model, prompt, 40, 1.0, 7)
    assert len(set(sampled)) > 5  # varied output, so routers see varied input


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid_bias"])
@pytest.mark.parametrize("dropless", [True, False])
def test_cached_moe_logits_equal_full_recomputation(scoring, dropless):
    """Prefill then one byte at a time through the cache gives the logits of one full eval forward, also when
    training drops tokens by capacity (forwards with a cache and eval forwards route dropless)."""
    torch.manual_seed(0)
    cfg = tiny_test_config(router="cosine", layers="MA", middle="AM")
    cfg.init_std = 0.2
    cfg.middle.moe_every = 1
    cfg.middle.moe = MoEConfig(n_experts=4, top_k=1, scoring=scoring, dropless=dropless, capacity_factor_train=0.5,
                               min_capacity=0)
    model = SynergyLM(cfg)
    for module in model.modules():
        if hasattr(module, "selection_bias"):
            module.selection_bias.copy_(torch.randn(4))  # a trained-looking bias (sigmoid_bias selects with it)
    ids = torch.tensor([[EOD_ID, *TEXT[:48]]])
    with torch.no_grad():
        dropped = model.train()(ids).stats.moe["middle.0"].dropped_fraction.item()
        assert (dropped > 0) == (not dropless)  # the capacity config really drops in training
        model.eval()
        full = model(ids).logits
        cache = model.new_cache()
        steps = [model._run(ids[:, :17], cache)[0]]
        steps += [model._run(ids[:, t:t + 1], cache)[0] for t in range(17, ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("router", ["cosine", "space"])
def test_middle_steps_only_on_new_concepts(router):
    model = build(router, "MA").eval()
    middle = model.body.inner
    seen = []
    middle.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    routes = []
    model.body.router.register_forward_hook(lambda mod, args, out: routes.append(out.boundary))
    prompt = b"Some words and some more "
    generated = model.generate(prompt, 30, temperature=1.0, seed=1)
    assert len(generated) == 30
    prefill_concepts, decode_calls = seen[0], seen[1:]
    assert all(n == 1 for n in decode_calls)  # one concept per byte step at most
    assert len(decode_calls) < 30  # steps without a boundary skip the middle
    routes.clear()
    with torch.no_grad():
        model(torch.tensor([[EOD_ID, *prompt, *generated[:-1]]]))  # the last byte is never fed back
    assert prefill_concepts + len(decode_calls) == int(routes[0].sum())


def test_two_stage_hierarchy_generation_and_stats():
    torch.manual_seed(0)
    cfg = two_stage_config()
    cfg.init_std = 0.2
    model = SynergyLM(cfg).eval()
    assert isinstance(model.body.inner, HierarchyStage)
    ids = text_batch(length=96)
    out = model(ids, labels=ids)
    flat = out.stats.flatten()
    for s in (0, 1):
        assert f"stage{s}/bytes_per_concept" in flat and f"stage{s}/ratio_loss" in flat
    stage0, stage1 = out.stats.stages
    assert stage1.bytes_per_concept > stage0.bytes_per_concept
    total = stage0.compression * stage1.compression
    torch.testing.assert_close(total, stage1.bytes_per_concept)
    prompt = b"two stages of concepts "
    assert model.generate(prompt, 30, temperature=1.0, seed=3) == reference_generate(model, prompt, 30, 1.0, 3)


def test_byte_transformer_baseline_shares_the_code():
    torch.manual_seed(0)
    cfg = byte_transformer_config(d_model=32, depth=2, n_heads=2)
    cfg.init_std = 0.2
    model = SynergyLM(cfg).eval()
    out = model(text_batch(), labels=text_batch())
    assert out.stats.bytes_per_concept.item() == 1.0 and out.stats.ratio_loss.item() == 0.0
    assert math.isclose(out.loss.item(), out.stats.ce_loss.item(), rel_tol=1e-6)
    assert [g["name"] for g in model.param_groups(0.1)] == ["middle/no_decay", "middle/decay"]
    prompt = b"bytes only "
    assert model.generate(prompt, 25, temperature=0) == reference_generate(model, prompt, 25, 0.0, 0)


@pytest.mark.parametrize("pos", ["rope", "none"])
def test_rope_nope_switch(pos):
    """One NoPE attention layer sees the prefix as a set: reordering earlier bytes leaves the last prediction
    unchanged. With RoPE the order matters."""
    torch.manual_seed(0)
    cfg = ModelConfig(stages=[], d_middle=32, middle=StackConfig(pattern="A", n_heads=2, pos_encoding=pos))
    cfg.init_std = 0.3
    model = SynergyLM(cfg)
    assert all((b.mixer.rope is None) == (pos == "none") for b in model.body.blocks)
    ids = torch.tensor([list(b"abcdefghijklmnop")])
    shuffled = torch.cat((ids[:, :15].flip(1), ids[:, 15:]), 1)
    with torch.no_grad():
        spread = (model(ids).logits[0, -1] - model(shuffled).logits[0, -1]).abs().max().item()
    if pos == "none":
        assert spread < 1e-4
    else:
        assert spread > 1e-3


def test_document_start_opens_a_concept_for_every_router():
    for router in ROUTERS:
        model = build(router, "M").eval()
        routes = []
        model.body.router.register_forward_hook(lambda mod, args, out, routes=routes: routes.append(out))
        ids = text_batch()
        with torch.no_grad():
            model(ids)
        assert routes[0].boundary[:, 0].all()
        assert routes[0].boundary[0, 21] and routes[0].prob[0, 21] == 1.0  # ids[0, 20] is EOD


def test_loss_is_ce_plus_weighted_ratio_and_moe_losses():
    model = build("cosine", "MA", init_std=0.02, moe=True)
    ids = text_batch()
    labels = ids.roll(-1, 1)
    labels[:, -1] = IGNORE_INDEX
    out = model(ids, labels=labels)
    ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    layers = out.stats.moe
    moe = sum(0.01 * layers[f"middle.{i}"].aux_loss + 1e-3 * layers[f"middle.{i}"].z_loss for i in (0, 1))
    expected = ce + 0.03 * out.stats.ratio_loss + moe
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    is_byte = (labels >= 0) & (labels < 256)  # bits per byte counts byte targets only, not EOD
    byte_ce = torch.nn.functional.cross_entropy(out.logits[is_byte], labels[is_byte])
    assert (labels == EOD_ID).any()  # the test has an EOD target to leave out
    torch.testing.assert_close(out.stats.bpb.float(), byte_ce.detach() / math.log(2))
    assert out.stats.n_bytes.item() == int(is_byte.sum())
    assert out.stats.moe["middle.0"].tokens_per_expert.shape == (4,)
    assert model(ids).loss is None


def test_padding_is_not_counted():
    model = build("stride", "A").eval()
    ids = text_batch(batch=1, length=30)
    padded = torch.cat((ids, torch.full((1, 12), PAD_ID)), 1)
    with torch.no_grad():
        a, b = model(ids), model(padded)
    torch.testing.assert_close(a.logits, b.logits[:, :30], atol=1e-5, rtol=1e-5)
    assert a.stats.bytes_per_concept == b.stats.bytes_per_concept


def test_bad_inputs_fail_clearly():
    model = build()
    with pytest.raises(ValueError, match=r"input_ids has ids outside \[0, 258\)"):
        model(torch.tensor([[1, 300]]))
    with pytest.raises(ValueError, match=r"labels shape \(1, 3\) != input_ids shape \(1, 2\)"):
        model(torch.tensor([[1, 2]]), labels=torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="SynergyLM needs a ModelConfig"):
        SynergyLM({"d_middle": 8})


def test_param_groups_split_parts_decay_and_experts():
    model = build("cosine", "MA", moe=True)
    groups = model.param_groups(0.1)
    names = {g["name"]: g for g in groups}
    assert set(names) == {"stage0/decay", "stage0/no_decay", "middle/decay", "middle/no_decay", "middle/decay/experts"}
    multipliers = model.cfg.lr_multipliers()
    assert names["stage0/decay"]["lr_mult"] == multipliers[0] and names["middle/decay"]["lr_mult"] == multipliers[1]
    assert all(g["weight_decay"] == (0.1 if "/decay" in g["name"] else 0.0) for g in groups)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(set(map(id, grouped))) == len(list(model.parameters()))
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.embed.weight) in no_decay and id(model.body.router.q_proj.weight) in no_decay
    assert all(getattr(p, "allreduce", True) is False for p in names["middle/decay/experts"]["params"])


def test_accounting_counts_and_flops():
    model = build("cosine", "MA", moe=True)
    counts = param_counts(model)
    parts = [v for k, v in counts.items() if k not in ("total", "experts", "active")]
    assert sum(parts) == counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["experts"] > 0 and counts["active"] == counts["total"] - counts["experts"] // 2  # top-2 of 4
    cfg = model.cfg
    assert flops_per_byte(cfg, 1024, 6.0) < flops_per_byte(cfg, 1024, 3.0)
    assert flops_per_byte(cfg, 1024, 3.0) == 3 * flops_per_byte(cfg, 1024, 3.0, training=False)
    assert flops_per_byte(cfg, 1024, None) == flops_per_byte(cfg, 1024, [cfg.stages[0].router.target_bytes_per_concept])
    assert flops_per_byte(cfg, 1024, [torch.tensor(3.0)]) == flops_per_byte(cfg, 1024, 3.0)  # aux values work
    # byte transformer: 2 x matmul params per byte (qkv/out 4 d^2, SwiGLU 3 d h, head) + causal attention
    bt = byte_transformer_config(d_model=64, depth=2, n_heads=4)
    d, h, L = 64, 176, 128
    expected = 2 * (2 * (4 * d * d + 3 * d * h) + d * 258) + 2 * 2 * 2 * d * (L + 1) / 2
    assert math.isclose(flops_per_byte(bt, L, None, training=False), expected)


def test_all_padding_batch_gives_finite_loss_and_still_runs_the_middle():
    model = build("cosine", "MA", moe=True)
    calls = []
    model.body.inner.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[1]))
    ids = torch.full((2, 16), PAD_ID)
    out = model(ids, labels=torch.full((2, 16), IGNORE_INDEX))
    assert torch.isfinite(out.loss) and out.stats.ce_loss == 0.0
    assert calls == [1]  # one padding slot: MoE collectives are entered on every rank
    out.loss.backward()


def test_moe_in_an_encoder_is_named_and_weighted_by_its_own_config():
    torch.manual_seed(0)
    cfg = tiny_test_config()
    cfg.stages[0].encoder.moe_layers = [0]
    cfg.stages[0].encoder.moe = MoEConfig(n_experts=2, top_k=1, aux_loss_coef=0.5, z_loss_coef=0.25)
    model = SynergyLM(cfg)
    ids = text_batch()
    out = model(ids, labels=ids)
    aux, z = out.stats.moe["stage0.encoder.0"].aux_loss, out.stats.moe["stage0.encoder.0"].z_loss
    expected = out.stats.ce_loss + 0.03 * out.stats.ratio_loss + 0.5 * aux + 0.25 * z
    torch.testing.assert_close(out.loss.detach(), expected, atol=1e-5, rtol=1e-5)


def test_sampling_options_and_training_mode_is_restored():
    model = build("cosine", "MA").train()
    a = model.generate(b"abc", 30, temperature=0.9, top_k=5, seed=11)
    assert model.training
    assert a == model.generate(b"abc", 30, temperature=0.9, top_k=5, seed=11)  # seeded: reproducible
    assert a != model.generate(b"abc", 30, temperature=0.9, top_k=5, seed=12)
    pieces = list(model.generate_iter(b"abc", 10, temperature=0.9, top_p=0.5, seed=1))
    assert all(len(p) == 1 for p in pieces) and len(pieces) <= 10
    logits = torch.tensor([0.0, 5.0, 4.0, 1.0] + [-10.0] * 254)
    generator = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, 2, None, generator) for _ in range(50)}
    assert draws == {1, 2}  # top-k = 2 keeps exactly the two best ids
    draws = {sample_next(logits, 1.0, None, 0.5, generator) for _ in range(50)}
    assert draws == {1}  # the best id alone holds more than half of the mass
    assert sample_next(logits, 0.0, None, None, generator) == 1


def test_linear_width_change_allows_a_narrower_middle():
    torch.manual_seed(0)
    cfg = tiny_test_config(router="gate")
    cfg.d_middle, cfg.width_change, cfg.init_std = 24, "linear", 0.2
    cfg.middle.n_heads = 2
    cfg.validate()
    model = SynergyLM(cfg).eval()
    assert model.body.width.up.weight.shape == (24, 32) and model.body.width.down.weight.shape == (32, 24)
    prompt = b"narrow middle "
    assert model.generate(prompt, 25, temperature=1.0, seed=2) == reference_generate(model, prompt, 25, 1.0, 2)


def test_tied_head_shares_the_embedding():
    torch.manual_seed(0)
    cfg = tiny_test_config()
    untied = param_counts(SynergyLM(cfg))
    cfg.tie_embeddings = True
    model = SynergyLM(cfg)
    counts = param_counts(model)
    assert model.head.weight is model.embed.weight
    assert counts["head"] == 0 and counts["total"] == untied["total"] - 258 * 32
    grouped = [p for g in model.param_groups(0.1) for p in g["params"]]
    assert len(grouped) == len(set(map(id, grouped))) == len(list(model.parameters()))
    with pytest.raises(ValueError, match=r"prompt must be bytes, got str; encode text with \.encode\('utf-8'\)"):
        model.generate("text", 3)


def test_sliding_window_and_qk_norm_model_generates_like_full_recomputation():
    torch.manual_seed(0)
    cfg = tiny_test_config(router="cosine", layers="A", middle="A")
    for stack in (cfg.stages[0].encoder, cfg.stages[0].decoder, cfg.middle):
        stack.sliding_window, stack.qk_norm = 4, True
    cfg.init_std = 0.2
    model = SynergyLM(cfg).eval()
    prompt = b"a window of four "
    assert model.generate(prompt, 30, temperature=1.0, seed=5) == reference_generate(model, prompt, 30, 1.0, 5)
    ids = text_batch()
    changed = ids.clone()
    changed[:, 30:] = (changed[:, 30:] + 7) % 256
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[:, :30], model(changed).logits[:, :30], atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    """Recomputing dense blocks in backward changes memory, not maths; MoE blocks are never recomputed."""
    ids = text_batch()
    results = []
    for enabled in (False, True):
        model = build(letters="MA", moe=True)
        model.train()
        model.set_activation_checkpointing(enabled)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t.numel()) or t, lambda t: t):
            out = model(ids[:, :-1], labels=ids[:, 1:])
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), grads, sum(saved)))
    (loss_a, grads_a, saved_a), (loss_b, grads_b, saved_b) = results
    assert saved_b < 0.8 * saved_a  # the forward kept fewer activations for backward
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7), name


def test_statistics_of_micro_batches_average_and_flatten_to_the_metric_keys():
    model = build("cosine", "MA", moe=True)
    first, second = text_batch(), text_batch(offset=5)
    second_labels = second.clone()
    second_labels[1, 30:] = IGNORE_INDEX  # fewer counted bytes than the first batch
    a, b = model(first, labels=first).stats, model(second, labels=second_labels).stats
    assert a.n_bytes != b.n_bytes
    mean = ModelStatistics.mean([a, b])
    # bits per byte is weighted by bytes: summed bits / summed bytes, not the mean of the two ratios
    torch.testing.assert_close(mean.bpb, (a.bpb * a.n_bytes + b.bpb * b.n_bytes) / (a.n_bytes + b.n_bytes))
    torch.testing.assert_close(mean.ce_loss, (a.ce_loss + b.ce_loss) / 2)
    torch.testing.assert_close(mean.stages[0].compression, (a.stages[0].compression + b.stages[0].compression) / 2)
    torch.testing.assert_close(mean.moe["middle.0"].tokens_per_expert,
                               (a.moe["middle.0"].tokens_per_expert + b.moe["middle.0"].tokens_per_expert) / 2)
    flat = mean.flatten()
    assert flat["stage0/compression"] == pytest.approx(mean.stages[0].compression.item())
    assert flat["bytes_per_concept"] == flat["stage0/bytes_per_concept"]
    assert isinstance(flat["moe/middle.0/tokens_per_expert"], list) and len(flat["moe/middle.0/tokens_per_expert"]) == 4
    assert "ce_loss" not in model(first).stats.flatten()  # no labels: no cross entropy
