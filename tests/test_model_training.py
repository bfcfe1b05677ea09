"""Short training runs of a tiny SynergyLM on the bundled sample corpus (real text, no network)."""

import json

import torch
import zstandard
from model_configs import tiny_test_config

import synergy_dist
from synergy_dist.model.synergy import SynergyLM


def sample_text(n_docs: int) -> bytes:
    with open(synergy_dist.SAMPLE_CORPUS, "rb") as f:
        raw = zstandard.ZstdDecompressor().stream_reader(f).read()
    docs = [json.loads(line)["text"] for line in raw.decode("utf-8").splitlines()[:n_docs]]
    return "\n".join(docs).encode("utf-8")


def train(model: SynergyLM, data: torch.Tensor, steps: int, lr: float, batch: int, length: int, seed: int = 0):
    groups = model.param_groups(weight_decay=0.0)
    opt = torch.optim.AdamW([{"params": g["params"], "lr": lr * g["lr_mult"], "weight_decay": g["weight_decay"]}
                             for g in groups])
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - length - 1, (batch,), generator=generator)
        x = torch.stack([data[s: s + length] for s in starts])
        y = torch.stack([data[s + 1: s + length + 1] for s in starts])
        out = model(x, labels=y)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return out


def test_tiny_model_overfits_a_few_kilobytes():
    torch.manual_seed(0)
    data = torch.tensor(list(sample_text(1)[:2048]))
    cfg = tiny_test_config(router="cosine", layers="MA", middle="A")
    cfg.stages[0].d_model, cfg.d_middle = 64, 96
    model = SynergyLM(cfg)
    windows = torch.stack([data[s: s + 129] for s in range(0, len(data) - 129, 120)])

    def bpb_on_the_text() -> float:
        model.eval()
        with torch.no_grad():
            return model(windows[:, :-1], labels=windows[:, 1:]).stats.bpb.item()

    assert bpb_on_the_text() > 7.0  # about log2(258) at init
    train(model, data, steps=200, lr=3e-3, batch=4, length=128)
    assert bpb_on_the_text() < 1.0


def test_realised_compression_tracks_the_target():
    torch.manual_seed(0)
    data = torch.tensor(list(sample_text(20)))
    cfg = tiny_test_config(router="cosine", layers="MA", middle="A")
    target = 4.0
    cfg.stages[0].router.target_bytes_per_concept = target
    model = SynergyLM(cfg)
    train(model, data, steps=300, lr=3e-3, batch=8, length=128)
    model.eval()
    generator = torch.Generator().manual_seed(1)
    realised = []
    with torch.no_grad():
        for _ in range(4):
            starts = torch.randint(0, len(data) - 129, (16,), generator=generator)
            realised.append(model(torch.stack([data[s: s + 128] for s in starts])).stats.bytes_per_concept.item())
    mean = sum(realised) / len(realised)
    assert abs(mean - target) / target < 0.2, realised
