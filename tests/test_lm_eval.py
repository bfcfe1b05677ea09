"""lm-evaluation-harness on exported SynergyLMs, offline, with the task folder tests/lm_eval_tasks (lm-eval's own
YAML format over local jsonl files): rolling perplexity equals synergy-eval's bits per byte; multiple choice
of a model trained on the right answers beats chance; generate_until returns the model's greedy continuation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import eval_helpers as eh
import pytest
import torch
from model_configs import tiny_test_config

from data_pipeline.vocab import EOD_ID
from synergy_dist.eval_checkpoint import evaluate_checkpoint
from synergy_dist.export import export
from synergy_dist.hf.export import write_hf_model
from synergy_dist.model.synergy import SynergyLM

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
EVAL_LEN = 1024  # one window holds every test document, for lm-eval and synergy-eval alike
TRAIN_STEPS = 100


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No network: the tasks read local files and the models are local directories."""
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key)
        else:
            os.environ[key] = value


def lm_eval(model_dir: Path, tasks: list[str], monkeypatch) -> dict:
    """lm-eval's simple_evaluate with the hf model type, as `lm_eval --model hf --model_args ...` runs it."""
    from lm_eval import simple_evaluate  # heavy (~several seconds); only these tests need it
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(TASKS)  # the task files name their jsonl files relative to this folder
    return simple_evaluate(
        model="hf", model_args=f"pretrained={model_dir},trust_remote_code=True,max_length={EVAL_LEN}",
        tasks=tasks, task_manager=TaskManager(include_path=str(TASKS)), batch_size=1, device="cpu",
        log_samples=True, bootstrap_iters=0)


def test_rolling_perplexity_equals_synergy_eval_bits_per_byte(tmp_path_factory, monkeypatch):
    """The shared 2-rank MoE run (expert parallel 2), exported: lm-eval scores each document from EOD, as
    synergy-eval's window does (document isolation keeps the documents of one window apart)."""
    run = eh.trained_run(tmp_path_factory.getbasetemp() / "eval_run")
    out = export(Path(run["run"]["dir"]), tmp_path_factory.mktemp("lm_eval") / "moe_hf", fmt="hf")
    ours = evaluate_checkpoint(run["run"]["dir"], [str(TASKS / "documents.jsonl")], seq_len=EVAL_LEN)
    results = lm_eval(out, ["synergy_rolling"], monkeypatch)
    theirs = results["results"]["synergy_rolling"]["bits_per_byte,none"]
    assert abs(theirs - ours["overall"]["bpb"]) < 1e-4, (theirs, ours["overall"]["bpb"])
    n_bytes = sum(len(json.loads(line)["text"].encode()) for line in (TASKS / "documents.jsonl").open())
    assert ours["overall"]["bytes"] == n_bytes


def colour_rows() -> list[dict]:
    return [json.loads(line) for line in (TASKS / "colours.jsonl").open()]


def colour_lines() -> list[bytes]:
    """The training text: each question with its right answer (lm-eval puts one space between them)."""
    return [f"{r['question']} {r['choices'][r['answer']]}\n".encode() for r in colour_rows()]


def native_accuracy(model: SynergyLM) -> float:
    """The multiple-choice accuracy from the native model's log-likelihoods of " " + choice after the question."""
    correct = 0
    for row in colour_rows():
        context = row["question"].encode()
        scores = []
        for choice in row["choices"]:
            ids = list(context + f" {choice}".encode())
            with torch.no_grad():
                logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            scores.append(sum(float(logp[t - 1, ids[t]]) for t in range(len(context), len(ids))))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == row["answer"])
    return correct / len(colour_rows())


@pytest.fixture(scope="module")
def colours_model(tmp_path_factory) -> tuple[SynergyLM, Path]:
    """A tiny hierarchy trained on the right answers, each sentence a document, in shuffled order."""
    torch.manual_seed(0)
    model = SynergyLM(tiny_test_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    lines, generator = colour_lines(), torch.Generator().manual_seed(0)
    for _ in range(TRAIN_STEPS):
        rows = []
        for _ in range(8):
            order = torch.randperm(len(lines), generator=generator).tolist()
            rows.append([t for i in order for t in (EOD_ID, *lines[i])][:129])
        ids = torch.tensor(rows)
        optimizer.zero_grad()
        model(ids[:, :-1], ids[:, 1:]).loss.backward()
        optimizer.step()
    model.eval()
    out = write_hf_model(model.cfg, model.state_dict(), tmp_path_factory.mktemp("lm_eval") / "colours", EVAL_LEN)
    return model, out


def test_multiple_choice_beats_chance_and_generate_until_is_greedy(colours_model, monkeypatch):
    model, out = colours_model
    results = lm_eval(out, ["synergy_choice", "synergy_generate"], monkeypatch)
    accuracy = results["results"]["synergy_choice"]["acc,none"]
    assert accuracy == native_accuracy(model) and accuracy >= 0.5  # chance: 0.25 (4 choices)
    samples = results["samples"]["synergy_generate"]
    assert len(samples) == len(colour_lines())
    for sample in samples:
        context = sample["arguments"][0][0]
        response = sample["resps"][0][0]
        # lm-eval reads the context as is (no EOD first) and cuts the continuation at the first newline
        ids = list(context.encode())
        with torch.no_grad():
            for _ in range(8):
                next_id = int(model(torch.tensor([ids])).logits[0, -1, :EOD_ID].argmax())
                ids.append(next_id)
        expected = bytes(ids[len(context.encode()):]).decode("utf-8", errors="replace").split("\n")[0]
        assert response == expected, (context, response, expected)
    # the metric is lm-eval's own reading of those responses (how good they are depends on the tiny model)
    matches = [sample["resps"][0][0] == sample["target"] for sample in samples]
    assert results["results"]["synergy_generate"]["exact_match,none"] == pytest.approx(sum(matches) / len(matches))
