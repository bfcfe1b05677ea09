"""The precision policy under bf16 (synergy_dist/model/precision.py): the boundary routers, the residual
projections, the smoothing and the MoE gate keep float32 weights and compute in float32 under autocast; the
trainer's bf16 engine (dense and MoE, every ZeRO stage) keeps them float32; a hand cast is refused with the fix;
on a trained checkpoint bf16 and fp32 forwards agree on >= 99.5% of boundary decisions, and on all of them with
a float32 encoder (`encoder_fp32`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import train_launch as tl
import yaml
from model_configs import tiny_test_config, two_stage_config
from safetensors.torch import load_file

from data_pipeline.shards import iter_shard_documents
from synergy_dist.evaluate import RouteRecorder, window_batch, windows
from synergy_dist.export import export
from synergy_dist.loading import load_model
from synergy_dist.model.chunking import smooth
from synergy_dist.model.config import MoEConfig
from synergy_dist.model.moe.gating import ExpertGate
from synergy_dist.model.precision import Float32Linear, PrecisionError, float32_names, keep_fp32
from synergy_dist.model.ssd import ssd_scan
from synergy_dist.model.synergy import SynergyLM

HERE = Path(__file__).resolve().parent
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)  # what DeepSpeed's torch_autocast does on CPU


def moe_config():
    cfg = tiny_test_config()
    cfg.middle.moe_every, cfg.middle.moe = 1, MoEConfig(n_experts=4, top_k=2, d_ff=32)
    return cfg


def policy_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    kept = float32_names(model)
    return {name: p for name, p in model.named_parameters() if name in kept}


# ---------------------------------------------------------------- which modules, and their runtime check
@pytest.mark.parametrize("router", ["cosine", "gate"])
def test_policy_covers_routers_residuals_and_expert_gates(router):
    cfg = moe_config()
    cfg.stages[0].router.kind = router
    model = SynergyLM(cfg)
    names = set(policy_parameters(model))
    router_params = {"cosine": {"body.router.q_proj.weight", "body.router.k_proj.weight"},
                     "gate": {"body.router.score.weight", "body.router.score.bias"}}[router]
    gates = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, ExpertGate)}
    assert len(gates) == 2 and names == router_params | {"body.residual.weight"} | gates
    assert all(p.dtype == torch.float32 for p in model.parameters())
    two = set(policy_parameters(SynergyLM(two_stage_config())))
    assert two == {f"body.{inner}{part}.weight" for inner in ("", "inner.")
                   for part in ("router.q_proj", "router.k_proj", "residual")}


@pytest.mark.parametrize("part, message", [
    ("body.router", "boundary router q_proj weight is torch.bfloat16, it must stay torch.float32"),
    ("body.residual", "stage 0 residual projection weight is torch.bfloat16, it must stay torch.float32"),
])
def test_a_hand_cast_to_bf16_is_refused_naming_module_cause_and_fix(part, message):
    torch.manual_seed(0)
    model = SynergyLM(tiny_test_config())
    model.get_submodule(part).to(torch.bfloat16)
    ids = torch.randint(0, 256, (1, 24))
    with pytest.raises(PrecisionError) as err:
        model(ids)
    text = str(err.value)
    assert text.startswith(message)
    assert "model.to(torch.bfloat16)" in text and "DeepSpeed's \"bf16\"" in text  # the cause
    assert "precision.dtype=bf16" in text and "keep_fp32(model)" in text  # the fix


def test_keep_fp32_restores_the_policy_after_a_blanket_cast_and_the_bf16_model_runs():
    torch.manual_seed(0)
    model = SynergyLM(moe_config()).to(torch.bfloat16)
    ids = torch.randint(0, 256, (2, 40))
    with pytest.raises(PrecisionError, match="boundary router q_proj weight is torch.bfloat16"):
        model(ids)
    assert keep_fp32(model) == len(policy_parameters(model))
    assert all(p.dtype == torch.float32 for p in policy_parameters(model).values())
    kept = float32_names(model)
    assert {p.dtype for n, p in model.named_parameters() if n not in kept} == {torch.bfloat16}
    moe = [m for m in model.modules() if hasattr(m, "load_since_update")]
    assert moe and all(m.load_since_update.dtype == torch.float64 for m in moe)
    out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert keep_fp32(model) == 0  # idempotent


def test_a_float32_encoder_is_under_the_policy_and_keep_fp32_restores_it():
    cfg = tiny_test_config()
    cfg.stages[0].encoder_fp32 = True
    torch.manual_seed(0)
    model = SynergyLM(cfg)
    encoder = {f"body.encoder.{name}" for name, _ in model.body.encoder.named_parameters()}
    assert encoder and encoder <= set(policy_parameters(model))
    ids = torch.randint(0, 256, (2, 40))
    with torch.autocast(**BF16):
        hidden, _ = model.body.encoder(model.embed(ids))
        assert hidden.dtype == torch.float32 and model(ids).logits.dtype == torch.bfloat16
    model.to(torch.bfloat16)
    refused = r"^stage 0 float32 encoder blocks\.0\.mixer_norm\.weight is torch\.bfloat16"
    with pytest.raises(PrecisionError, match=refused):
        model(ids)
    assert keep_fp32(model) == len(policy_parameters(model))
    assert torch.isfinite(model(ids, labels=ids).loss)


def test_float64_weights_are_allowed_and_compute_in_float64():
    layer = Float32Linear(4, 3, bias=True, role="test projection").double()
    assert layer(torch.randn(2, 4, dtype=torch.float64)).dtype == torch.float64
    assert keep_fp32(layer) == 0  # wider than float32: left alone


# ---------------------------------------------------------------- float32 arithmetic under autocast
def test_router_residual_smoothing_and_scan_are_float32_under_autocast():
    """Inside autocast(bf16) each policy computation gives bitwise the result of plain float32."""
    torch.manual_seed(0)
    for router in ("cosine", "gate"):
        model = SynergyLM(tiny_test_config(router=router))
        for p in model.parameters():  # a trained-looking residual (it starts at zero)
            p.data.add_(0.05 * torch.randn_like(p))
        stage = model.body
        hidden = torch.randn(2, 30, 32)
        force = torch.zeros(2, 30, dtype=torch.bool)
        force[:, 0] = True
        valid = torch.ones(2, 30, dtype=torch.bool)
        plain = stage.router(hidden, None, force, valid)
        with torch.autocast(**BF16):
            mixed = stage.router(hidden, None, force, valid)
            residual = stage.residual(hidden)
        assert mixed.prob.dtype == torch.float32 and torch.equal(mixed.prob, plain.prob)
        assert torch.equal(mixed.boundary, plain.boundary)
        assert residual.dtype == torch.float32 and torch.equal(residual, stage.residual(hidden))
    z, confidence, previous = torch.randn(2, 70, 32), torch.rand(2, 70), torch.randn(2, 32)
    with torch.autocast(**BF16):
        smoothed = smooth(z, confidence, previous, 1e-4)
        scanned, state = ssd_scan(torch.randn(1, 50, 2, 4).clone(), -torch.rand(1, 50, 2), torch.ones(1, 50, 3),
                                  torch.ones(1, 50, 3), 16)
    assert torch.equal(smoothed, smooth(z, confidence, previous, 1e-4))
    assert scanned.dtype == torch.float32 and state.dtype == torch.float32


def assert_bf16_export_keeps_the_policy(run_dir: Path, output: Path) -> None:
    out = export(run_dir, output, dtype="bf16")
    weights = load_file(str(out / "model.safetensors"))
    model, _, _ = load_model(out)
    kept = float32_names(model)
    assert kept and all(weights[k].dtype == torch.float32 for k in kept)
    assert {v.dtype for k, v in weights.items() if k not in kept and v.is_floating_point()} == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # loading upcasts the rest


@pytest.mark.slow
def test_a_bf16_export_keeps_the_policy_modules_float32(tmp_path, trained):
    assert_bf16_export_keeps_the_policy(Path(trained["run"]["dir"]), tmp_path / "bf16")


# ---------------------------------------------------------------- the trainer's bf16 engine
@pytest.mark.slow
@pytest.mark.parametrize("moe, zero", [(False, 0), (False, 1), (False, 2), (False, 3), (True, 0), (True, 2)],
                         ids=["dense-zero0", "dense-zero1", "dense-zero2", "dense-zero3", "moe-zero0", "moe-zero2"])
def test_the_bf16_engine_keeps_policy_parameters_float32(tmp_path, moe, zero):
    """precision.dtype=bf16 through the Trainer on CPU: after a step and a checkpoint the policy's parameters in
    engine.module are float32 while the bulk computes in bf16; routers and residuals compute in float32, and so
    does the encoder where `encoder_fp32` is set (the ZeRO-1 and ZeRO-3 runs)."""
    encoder_fp32 = zero in (1, 3)
    cfg = tl.tiny_config(tmp_path / "run", tmp_path / "sample", moe=moe, precision={"dtype": "bf16"},
                         deepspeed={"zero_stage": zero}, train={"max_steps": 1, "lr": 3e-3, "sample_bytes": 0})
    cfg["model"]["stages"][0]["encoder_fp32"] = encoder_fp32
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    done = subprocess.run([sys.executable, str(HERE / "precision_probe.py"), "--config", str(config_path)],
                          cwd=str(tl.REPO), env=tl.child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    kept = report["float32_modules"]
    assert {"body.router.q_proj.weight", "body.router.k_proj.weight", "body.residual.weight"} <= set(kept)
    assert moe == any(name.endswith(".router.weight") for name in kept)  # the MoE gates
    assert set(kept.values()) == {"torch.float32"}
    assert report["ds_precision"] == {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}
    assert report["compute"]["head"] == "torch.bfloat16"  # a bf16 run
    assert report["compute"]["body.router.q_proj"] == report["compute"]["body.residual"] == "torch.float32"
    assert report["compute"]["encoder"] == ("torch.float32" if encoder_fp32 else "torch.bfloat16")
    assert encoder_fp32 == ("body.encoder.blocks.0.mixer.in_proj.weight" in kept)
    assert (Path(cfg["run"]["dir"]) / "checkpoints" / "step_00000001" / "COMPLETE").is_file()


# ---------------------------------------------------------------- a trained checkpoint: bf16 vs fp32 decisions
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """The tiny cosine-router model trained in fp32 on the bundled corpus until its boundary rate is near the
    target (200 steps, ~15 s of training)."""
    base = tmp_path_factory.mktemp("precision")
    cfg = tl.tiny_config(base / "run", base / "sample", train={"max_steps": 200, "lr": 3e-3, "sample_bytes": 0},
                         checkpoint={"every_steps": 0, "keep_last": 1}, log={"every_steps": 50, "tensorboard": False})
    status = tl.run(cfg)
    assert status == 0, tl.output_of(cfg)[-4000:]
    return cfg


def stage0_routing(model: torch.nn.Module, inputs: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, ...]:
    """Stage-0 (prob, boundary, valid), fp32 or as the trainer runs bf16 (fp32 weights under autocast)."""
    with torch.no_grad(), RouteRecorder(model) as recorder, torch.autocast(**BF16, enabled=bf16):
        model(inputs)
        return recorder.calls[0]


def float32_encoder(model: SynergyLM, cfg) -> torch.nn.Module:
    """The stage-0 encoder of `model` as encoder_fp32 builds it, with the same weights."""
    cfg.model.stages[0].encoder_fp32 = True
    encoder = SynergyLM(cfg.model).body.encoder
    encoder.load_state_dict(model.body.encoder.state_dict())
    return encoder.eval()


@pytest.mark.slow
def test_bf16_and_fp32_forwards_agree_on_boundary_decisions_of_a_trained_checkpoint(trained):
    """The routers compute in float32 either way, so with a bf16 encoder decisions differ only through that
    encoder, and only where the router is undecided (p within 0.01 of 0.5): on this briefly trained tiny model
    99.81% agree (12 of 6,400), so the bound asserted there is 99.5%. With `encoder_fp32` every decision
    agrees (issue 11 asks for >= 99.9%; docs/MODEL.md, 'Precision policy')."""
    model, cfg, _ = load_model(Path(trained["run"]["dir"]))
    documents = iter_shard_documents(Path(trained["data"]["sample_dir"]) / "valid")
    rows = [row for row, _ in zip(windows(documents, cfg.data.seq_len), range(100))]
    inputs, _ = window_batch(rows)
    prob, exact, valid = stage0_routing(model, inputs, bf16=False)
    _, mixed, _ = stage0_routing(model, inputs, bf16=True)
    decisions = int(valid.sum())
    flipped = (exact != mixed) & valid
    assert decisions >= 4000
    assert 1 - int(flipped.sum()) / decisions >= 0.995, f"{int(flipped.sum())} of {decisions} decisions differ"
    assert bool(((prob[flipped] - 0.5).abs() < 0.01).all()), prob[flipped]

    # with the encoder in float32 too (encoder_fp32) everything below the router is float32: equal decisions
    model.body.encoder = float32_encoder(model, cfg)
    _, mixed, _ = stage0_routing(model, inputs, bf16=True)
    assert torch.equal(mixed, exact)


@pytest.mark.slow
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_a_bf16_run_killed_and_resumed_trains_bitwise_like_an_uninterrupted_one(tmp_path, moe):
    """The checkpoint of a bf16 run (fp32 parameters under autocast, ZeRO-2) restores everything it needs."""
    sections = dict(moe=moe, precision={"dtype": "bf16"}, deepspeed={"zero_stage": 2},
                    train={"max_steps": 4, "lr": 3e-3, "sample_bytes": 0})
    reference = tl.tiny_config(tmp_path / "reference", tmp_path / "sample", **sections)
    assert tl.run(reference) == 0, tl.output_of(reference)[-4000:]
    cfg = tl.tiny_config(tmp_path / "resumed", tmp_path / "sample", **sections)
    proc = tl.start(cfg, "single", 1, ["debug.hang_after_step=3"])
    tl.wait_for_step(proc, cfg, 3)
    tl.kill_group(proc)
    assert tl.run(cfg) == 0, tl.output_of(cfg)[-4000:]
    assert "resumed from " + str(Path(cfg["run"]["dir"]) / "checkpoints" / "step_00000002") in tl.output_of(cfg)
    assert tl.losses_by_step(cfg) == tl.losses_by_step(reference)  # bitwise: floats compare exactly
    assert_bf16_export_keeps_the_policy(Path(cfg["run"]["dir"]), tmp_path / "export")  # MoE gates included


def test_a_float64_model_keeps_float64_through_the_policy_modules():
    """fp64 reference runs (document isolation's exactness tests) are not narrowed to float32 by the policy."""
    torch.manual_seed(0)
    model = SynergyLM(moe_config()).double()
    seen = {}

    def recorder(name: str):
        def record(module, args, out):
            seen.setdefault(name, (args[0].dtype, (out[0] if isinstance(out, tuple) else out).dtype))
        return record

    for name in ("body.router.q_proj", "body.residual", "body.decoder"):
        model.get_submodule(name).register_forward_hook(recorder(name))
    assert model(torch.randint(0, 256, (1, 40))).logits.dtype == torch.float64
    assert seen == {name: (torch.float64, torch.float64) for name in seen} and len(seen) == 3
