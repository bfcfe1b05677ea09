"""The GPU path, for `pytest -m gpu` on a CUDA machine (scripts/gpu_check.sh runs it); skipped on CPU.

CUDA against the CPU reference (fp32 to float tolerance, bf16 autocast to bf16 tolerance), each kernel path
against the PyTorch path (SDPA backends with document masks, mamba_ssm's Triton scan with and without a
document index), one DeepSpeed step through synergy-train on NCCL, cached generation, a compiled step, and
synergy-plan's activation estimate against the memory CUDA really allocates.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_configs import tiny_test_config, yaml_model_config

from data_pipeline.vocab import EOD_ID
from synergy_dist.model.config import MambaConfig
from synergy_dist.model.mamba import Mamba2
from synergy_dist.model.synergy import SynergyLM

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh on a GPU)"),
]
REPO = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")
BF16_RTOL = 2e-2  # bf16 keeps 8 bits of mantissa; sums over a few hundred terms drift by about 1%


@pytest.fixture(autouse=True)
def exact_float32():
    """fp32 comparisons mean fp32: no TF32 matmuls (PyTorch's default for convolutions is TF32 on Ampere+)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def packed_ids(batch: int = 2, length: int = 512, seed: int = 0) -> torch.Tensor:
    """Text-like bytes with EODs inside the rows, so document isolation is on the path."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(32, 127, (batch, length), generator=g)
    ids[:, length // 3] = EOD_ID
    ids[0, 2 * length // 3] = EOD_ID
    return ids


def models(cfg):
    torch.manual_seed(0)
    cpu = SynergyLM(cfg).eval()
    gpu = SynergyLM(cfg).eval()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.to(CUDA)


@pytest.mark.parametrize("name", ["tiny-cpu", "tiny-moe-cpu"])
def test_cuda_fp32_logits_equal_cpu(name):
    cfg = yaml_model_config(name)
    cfg.middle.moe.expert_parallel_size = 1
    cpu, gpu = models(cfg)
    ids = packed_ids()
    with torch.no_grad():
        expected = cpu(ids, labels=ids)
        got = gpu(ids.to(CUDA), labels=ids.to(CUDA))
    torch.testing.assert_close(got.logits.cpu(), expected.logits, rtol=1e-4, atol=1e-4)
    assert float(got.loss) == pytest.approx(float(expected.loss), rel=1e-5)


def test_cuda_bf16_autocast_stays_within_bf16_tolerance_of_fp32():
    cpu, gpu = models(yaml_model_config("tiny-cpu"))
    ids = packed_ids()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        got = gpu(ids.to(CUDA), labels=ids.to(CUDA))
    with torch.no_grad():
        expected = cpu(ids, labels=ids)
    assert float(got.loss) == pytest.approx(float(expected.loss), rel=BF16_RTOL)
    # the routers run in float32 under the precision policy: boundary decisions barely move
    agree = (got.logits.float().argmax(-1).cpu() == expected.logits.argmax(-1)).float().mean()
    assert agree > 0.97


@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"])
@pytest.mark.parametrize("packed", [False, True], ids=["one-document", "packed"])
def test_sdpa_kernels_equal_the_math_path(backend, packed):
    """Each SDPA backend alone (no fallback) against the math path, bf16 autocast; packed rows take the
    block-diagonal document masks, which a backend without arbitrary masks (flash) refuses: reported as a skip."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _, gpu = models(tiny_test_config(layers="A", middle="A"))
    ids = (packed_ids() if packed else torch.randint(32, 127, (2, 512))).to(CUDA)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with sdpa_kernel([SDPBackend.MATH]):
            expected = gpu(ids).logits.float()
        try:
            with sdpa_kernel([getattr(SDPBackend, backend)]):
                got = gpu(ids).logits.float()
        except RuntimeError as err:  # a backend this GPU, build or mask does not support
            pytest.skip(f"{backend} unavailable here: {str(err).splitlines()[0]}")
    torch.testing.assert_close(got, expected, rtol=BF16_RTOL, atol=5e-2)


@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None, reason="mamba_ssm is not installed")
@pytest.mark.parametrize("documents", [False, True], ids=["one-document", "packed"])
def test_mamba_ssm_triton_scan_equals_the_pytorch_scan(documents):
    torch.manual_seed(0)
    cfg = MambaConfig(d_state=64, head_dim=64, chunk_size=64)
    kernel = Mamba2(256, cfg).to(CUDA)
    reference = Mamba2(256, MambaConfig(**{**cfg.__dict__, "kernel": "torch"})).to(CUDA)
    reference.load_state_dict(kernel.state_dict())
    x = torch.randn(2, 1000, 256, device=CUDA)
    seq_idx = None
    if documents:
        seq_idx = torch.zeros(2, 1000, dtype=torch.long, device=CUDA)
        seq_idx[:, 300:] += 1
        seq_idx[0, 777:] += 1
    assert kernel._use_kernel(x.view(2, 1000, 4, 64)), "mamba_ssm imported but its kernel path is not taken"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, expected = kernel(x, seq_idx=seq_idx), reference(x, seq_idx=seq_idx)
    torch.testing.assert_close(got.float(), expected.float(), rtol=BF16_RTOL, atol=2e-2)


def test_cached_generation_on_gpu_equals_recomputation_and_the_cpu():
    cpu, gpu = models(yaml_model_config("tiny-cpu"))
    prompt = b"def main(argv):\n    "
    out_gpu = gpu.generate(prompt, 48, temperature=0)
    assert out_gpu == cpu.generate(prompt, 48, temperature=0)
    # the cache's last logits equal a full forward over everything generated
    ids = torch.tensor([[EOD_ID, *prompt, *out_gpu[:-1]]], device=CUDA)
    cache = gpu.new_cache()
    with torch.no_grad():
        cached, _, _ = gpu._run(ids[:, :-8], cache)
        for t in range(ids.shape[1] - 8, ids.shape[1]):
            cached, _, _ = gpu._run(ids[:, t:t + 1], cache)
        full = gpu(ids).logits
    torch.testing.assert_close(cached[0, -1], full[0, -1], rtol=1e-4, atol=1e-4)


def test_compiled_step_equals_eager_on_gpu():
    from synergy_dist.train.compile import compile_blocks

    _, eager = models(yaml_model_config("tiny-cpu"))
    _, compiled = models(yaml_model_config("tiny-cpu"))
    compile_blocks(compiled, "inductor")
    ids = packed_ids().to(CUDA)
    for model in (eager, compiled):
        model.train()
        loss = model(ids, labels=ids).loss
        loss.backward()
        model.loss = float(loss)
    assert compiled.loss == pytest.approx(eager.loss, rel=1e-4)
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_plan_activation_estimate_against_cuda_memory():
    """synergy-plan's activation figure for base-100m's model at 2 x 8192 bytes, bf16, against what CUDA allocates
    between the end of the forward and the start of backward (an estimate: within a factor of 1.5)."""
    from synergy_dist.plan import activation_bytes

    cfg = yaml_model_config("base-100m")
    torch.manual_seed(0)
    model = SynergyLM(cfg).to(CUDA).train()
    ids = torch.randint(32, 127, (2, 8192), device=CUDA)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before
    bytes_per_concept = [float(s.bytes_per_concept) for s in out.stats.stages]
    estimate = activation_bytes(cfg, 8192, 2, "bf16", False, bytes_per_concept, working_set=False)
    print(f"activations held {held / 2**30:.2f} GiB, synergy-plan estimate {estimate / 2**30:.2f} GiB")
    assert 1 / 1.5 < estimate / held < 1.5


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_one_deepspeed_step_on_nccl(tmp_path):
    sys.path.insert(0, str(REPO / "tests"))
    import train_launch as tl

    cfg = tl.tiny_config(tmp_path / "run", tmp_path / "shards",
                         train={"max_steps": 3, "lr": 3e-3, "sample_bytes": 32},
                         deepspeed={"zero_stage": 2}, precision={"dtype": "bf16"})
    import yaml

    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="4", PYTHONUNBUFFERED="1")
    port = str(tl.free_port())
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                             "--master_port", port, "-m", "synergy_dist.cli.train", "--config", str(config_path)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "cuda" in log, log[-2000:]  # the start line names the device
    losses = tl.losses_by_step(cfg)
    assert sorted(losses) == [1, 2, 3] and all(torch.isfinite(torch.tensor(v)) for v in losses.values())


def test_bf16_flops_ceiling_is_measured():
    from synergy_dist.bench.device import matmul_ceiling

    flops = sorted(matmul_ceiling(CUDA, torch.bfloat16, 4096, repeats=5))[2]
    print(f"bf16 4096^3 matmul: {flops / 1e12:.0f} TFLOP/s on {torch.cuda.get_device_name()}")
    assert flops > 1e12


def test_a_cuda_step_synchronises_only_where_the_cpu_count_says():
    """tests/test_host_sync.py counts on CPU with blockwise attention forced to its accelerator ranges; on CUDA
    the model takes those ranges itself: the same three syncs, plus one per MoE layer (its experts' sizes)."""
    from test_host_sync import SyncCounter, attention_bytes_config

    for cfg, moe_layers in ((attention_bytes_config(), 0), (yaml_model_config("tiny-moe-cpu"), 3)):
        if moe_layers:
            cfg.middle.moe.expert_parallel_size = 1
        torch.manual_seed(0)
        model = SynergyLM(cfg).train().to(CUDA)
        ids = packed_ids(2, 256).to(CUDA)
        with SyncCounter() as counter:
            model(ids, labels=ids).loss.backward()
        expected = {"model/synergy.py:_check_ids": 1, "model/synergy.py:_document_index": 1,
                    "model/chunking.py:downsample": 1}
        if moe_layers:
            expected["model/moe/layer.py:_run_experts"] = moe_layers
        assert counter.sites == expected, counter.sites
