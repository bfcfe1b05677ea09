"""synergy-generate: streams what the model generates (UTF-8 decoded incrementally), greedy equals the
model's greedy generate, a seed makes sampling reproducible, prompts from --prompt or stdin.

Batched generation: row i of a batch equals prompt i generated alone, byte for byte (greedy and seeded), for
every router, layer type, one and two stages, dense and MoE; the batched cache gives each row the logits of
its own full recomputation (left padding, rows that stop, several documents in a row); several prompts from
the command line come back as JSON lines in order."""

from __future__ import annotations

import contextlib
import io
import json

import eval_helpers as eh
import pytest
import torch
from model_configs import byte_transformer_config, tiny_test_config

from data_pipeline.vocab import EOD_ID, PAD_ID
from synergy_dist.cli.generate import main
from synergy_dist.generation import generate_batches, stream
from synergy_dist.loading import load_model
from synergy_dist.model.config import MambaConfig, ModelConfig, MoEConfig, RouterConfig, StackConfig, StageConfig
from synergy_dist.model.synergy import SynergyLM


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    return eh.trained_run(tmp_path_factory.getbasetemp() / "eval_run")


@pytest.fixture(scope="module")
def model(run):
    return load_model(run["run"]["dir"])[0]


def generate_cli(*argv: str, stdin: str | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        if stdin is not None:
            with _stdin(stdin):
                status = main(list(argv))
        else:
            status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def _stdin(text: str):
    import sys

    saved, sys.stdin = sys.stdin, io.StringIO(text)
    try:
        yield
    finally:
        sys.stdin = saved


def test_greedy_equals_the_models_greedy_generate(run, model):
    expected = model.generate(b"The function", 40, temperature=0)
    status, out, _ = generate_cli("--checkpoint", run["run"]["dir"], "--prompt", "The function", "--temperature", "0",
                                  "--max-bytes", "40")
    assert status == 0
    assert out == expected.decode("utf-8", errors="replace") + "\n"
    assert 0 < len(expected) <= 40


def test_a_seed_reproduces_the_sample_and_matches_the_model(run, model):
    argv = ["--checkpoint", run["run"]["dir"], "--prompt", "def ", "--max-bytes", "48",
            "--top-k", "40", "--top-p", "0.95"]
    first = generate_cli(*argv, "--seed", "3")[1]
    again = generate_cli(*argv, "--seed", "3")[1]
    other = generate_cli(*argv, "--seed", "4")[1]
    assert first == again
    assert first != other  # a barely trained model samples near-uniform bytes: 48 of them never coincide
    direct = model.generate(b"def ", 48, temperature=1.0, top_k=40, top_p=0.95, seed=3)
    assert first == direct.decode("utf-8", errors="replace") + "\n"


def test_stdin_prompt_and_echo(run, model):
    expected = model.generate("naïve".encode(), 20, temperature=0).decode("utf-8", errors="replace")
    status, out, _ = generate_cli("--checkpoint", run["run"]["dir"], "--temperature", "0", "--max-bytes", "20",
                                  "--echo", stdin="naïve\n")  # echo's trailing newline is not part of the prompt
    assert status == 0 and out == "naïve" + expected + "\n"


class ScriptedModel:
    """Yields fixed bytes one at a time, like SynergyLM.generate_iter."""

    def __init__(self, data: bytes):
        self.data = data

    def generate_iter(self, prompt, max_new_bytes, **sampling):
        for b in self.data[:max_new_bytes]:
            yield bytes([b])


class RecordingOut(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_stream_writes_each_character_once_it_is_complete():
    text = "a€b😀c"  # 1-, 3-, 1-, 4-, 1-byte characters
    out = RecordingOut()
    produced = stream(ScriptedModel(text.encode()), b"", out, max_bytes=100)
    assert produced == text.encode()
    assert [w for w in out.writes if w] == ["a", "€", "b", "😀", "c"]  # never half a character


def test_stream_cut_inside_a_character_ends_with_a_replacement_character():
    out = RecordingOut()
    produced = stream(ScriptedModel("x€".encode()), b"", out, max_bytes=2)  # 'x' and the first byte of the euro
    assert produced == b"x\xe2" and out.getvalue() == "x\ufffd"


@pytest.mark.parametrize("argv,message", [
    (["--max-bytes", "-1"], "--max-bytes -1 must be >= 0"),
    (["--top-k", "0"], "--top-k 0 must be >= 1"),
    (["--top-p", "1.5"], "--top-p 1.5 must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature -1.0 must be >= 0 (0 = greedy)"),
])
def test_bad_options_fail_with_a_clear_message(tmp_path, argv, message):
    status, _, err = generate_cli("--checkpoint", str(tmp_path), "--prompt", "x", *argv)
    assert status == 2 and message in err


def test_missing_checkpoint_fails_with_a_clear_message(tmp_path):
    status, _, err = generate_cli("--checkpoint", str(tmp_path / "none"), "--prompt", "x")
    assert status == 2 and "does not exist; pass a run directory" in err


# ---------------------------------------------------------------------------------------------- batched generation
KINDS = [  # (router, layer letters, stages, MoE middle): every router, layer type, depth and middle at least once
    ("cosine", "MA", 1, False), ("gate", "A", 2, False), ("stride", "M", 1, True), ("space", "MA", 2, True),
    ("cosine", "A", 1, True), ("stride", "MA", 2, False), ("gate", "M", 1, False), ("space", "A", 1, False),
]
PROMPTS = [b"Hello world, th", b"ab", b"", b"The quick brown fox jumps "]


def tiny_model(router: str, letters: str, stages: int, moe: bool) -> SynergyLM:
    """A tiny model with a large init std (many boundaries, varied bytes)."""
    torch.manual_seed(0)
    mamba = MambaConfig(d_state=8, head_dim=8, chunk_size=8)
    stack = dict(pattern=letters, n_heads=2, mlp_ratio=2.0, mamba=mamba)

    def stage(width: int, kind: str) -> StageConfig:
        return StageConfig(d_model=width, encoder=StackConfig(**stack), decoder=StackConfig(**stack),
                           router=RouterConfig(kind=kind, target_bytes_per_concept=2.0, stride=2))

    widths = [16, 24][:stages]
    kinds = [router] + ["cosine" if router == "space" else router] * (stages - 1)  # space works on bytes only
    cfg = ModelConfig(stages=[stage(w, k) for w, k in zip(widths, kinds)], d_middle=32, init_std=0.2,
                      middle=StackConfig(pattern=letters, pos_encoding="none", n_heads=2, mlp_ratio=2.0, mamba=mamba))
    if moe:
        cfg.middle.moe_every = 1
        cfg.middle.moe = MoEConfig(n_experts=4, top_k=2, shared_expert=True, dropless=True)
    return SynergyLM(cfg).eval()


def make_eod_likely(model: SynergyLM, log_odds: float) -> None:
    """Give EOD the probability sigmoid(log_odds) at every step, so that rows stop at different steps."""
    def hook(module, args, logits):
        logits = logits.clone()
        logits[..., EOD_ID] = float("-inf")
        logits[..., EOD_ID] = logits.logsumexp(dim=-1) + log_odds
        return logits
    model.head.register_forward_hook(hook)


@pytest.mark.parametrize("router,letters,stages,moe", KINDS)
def test_each_row_of_a_batch_equals_its_prompt_generated_alone(router, letters, stages, moe):
    model = tiny_model(router, letters, stages, moe)
    model = model if moe else model.double()  # float64: no near-tie of float32 round-off can flip a byte
    greedy = model.generate(PROMPTS, 12, temperature=0)
    assert greedy == [model.generate(p, 12, temperature=0) for p in PROMPTS]
    make_eod_likely(model, -1.0)
    sampled = model.generate(PROMPTS, 12, temperature=1.0, top_k=100, seed=7)
    assert sampled == [model.generate(p, 12, temperature=1.0, top_k=100, seed=7) for p in PROMPTS]
    assert min(map(len, sampled)) < 12 and len(set(map(len, sampled))) > 1  # rows stopped at different steps
    seeds = [3, None, 5, 3]  # one seed per row
    assert model.generate(PROMPTS, 12, seed=seeds) == [model.generate(p, 12, seed=s) for p, s in zip(PROMPTS, seeds)]


@pytest.mark.parametrize("stages", [1, 2])
def test_only_the_rows_that_open_a_concept_run_the_inner_network(stages):
    model = tiny_model("cosine", "MA", stages, False)
    opened, inner_rows = [], []
    model.body.router.register_forward_hook(lambda mod, args, out: opened.append(out.boundary.sum(dim=1)))
    model.body.inner.register_forward_hook(lambda mod, args, out: inner_rows.append(args[0].shape[0]))
    model.generate(PROMPTS, 12, temperature=1.0, seed=1)
    decode_opened = [int((n > 0).sum()) for n in opened[1:]]  # each decode call: rows with a new concept
    assert 0 < min(n for n in decode_opened if n) < len(PROMPTS)  # some steps open concepts in some rows only
    assert inner_rows[1:] == [n for n in decode_opened if n]  # the inner network ran on exactly those rows


ROWS = [  # several documents in a row, different lengths
    [EOD_ID, *b"Hello world, this is", EOD_ID, *b"next doc"],
    [EOD_ID, *b"ab"],
    [EOD_ID, EOD_ID, *b"The quick brown fox jumps"],
    [EOD_ID, *b"x y z", EOD_ID, EOD_ID, *b"q"],
]


def batched_logits(model: SynergyLM, rows: list[list[int]]) -> list[torch.Tensor]:
    """Each row's logits through one cache: the first half of every row left-padded in one call, then one
    column per call (PAD for rows that ended)."""
    cache, half = model.new_cache(), [len(r) // 2 for r in rows]
    width = max(half)
    ids = torch.full((len(rows), width), PAD_ID)
    for i, (row, n) in enumerate(zip(rows, half)):
        ids[i, width - n:] = torch.tensor(row[:n])
    logits = model._run(ids, cache)[0]
    pieces = [[logits[i, width - n:]] for i, n in enumerate(half)]
    for t in range(max(len(r) - n for r, n in zip(rows, half))):
        column = [[r[n + t] if n + t < len(r) else PAD_ID] for r, n in zip(rows, half)]
        logits = model._run(torch.tensor(column), cache)[0]
        for i, (row, n) in enumerate(zip(rows, half)):
            if n + t < len(row):
                pieces[i].append(logits[i])
    return [torch.cat(p) for p in pieces]


def windowed_model() -> SynergyLM:
    torch.manual_seed(0)
    cfg = tiny_test_config("cosine", "MA", "AM")
    cfg.init_std = 0.2
    cfg.stages[0].encoder.sliding_window, cfg.stages[0].decoder.sliding_window, cfg.middle.sliding_window = 3, 4, 2
    return SynergyLM(cfg)


@pytest.mark.parametrize("kind", KINDS + ["byte_transformer", "sliding_window"],
                         ids=lambda kind: kind if isinstance(kind, str) else "-".join(map(str, kind)))
def test_a_batched_cache_gives_each_row_its_own_logits(kind):
    """Padding enters no cache or state: each row's logits equal its full recomputation alone (float64)."""
    if kind == "byte_transformer":
        torch.manual_seed(0)
        model = SynergyLM(byte_transformer_config(d_model=32, depth=2, n_heads=2))
    elif kind == "sliding_window":
        model = windowed_model()
    else:
        model = tiny_model(*kind)
    moe = isinstance(kind, tuple) and kind[3]
    model = (model if moe else model.double()).eval()  # MoE gates compute in float32
    with torch.no_grad():
        for row, got in zip(ROWS, batched_logits(model, ROWS)):
            expected = model(torch.tensor([row])).logits[0]
            torch.testing.assert_close(got, expected, atol=(1e-5 if moe else 1e-9) * expected.abs().max().item(),
                                       rtol=0)


def test_batched_generation_refuses_prompts_that_are_not_bytes():
    model = tiny_model("cosine", "MA", 1, False)
    with pytest.raises(ValueError, match=r"^prompts\[1\] must be bytes, got str; encode text with"):
        model.generate([b"a", "b"], 3)
    with pytest.raises(ValueError, match=r"^2 seeds for 3 prompts; give one seed per prompt$"):
        model.generate([b"a", b"b", b"c"], 3, seed=[1, 2])


@pytest.mark.parametrize("prompts,batch_size,message", [
    ([b"a", 3], 2, "prompt 1 is int; pass bytes or str"),
    (b"abc", 2, "prompts must be a list of bytes or str, got a single bytes; wrap it in a list"),
    ([b"a"], 0, "batch_size=0 must be an integer >= 1"),
])
def test_generate_batches_refuses_bad_input(prompts, batch_size, message):
    with pytest.raises(ValueError) as err:
        list(generate_batches(tiny_model("cosine", "MA", 1, False), prompts, 4, batch_size))
    assert str(err.value) == message


def test_several_prompts_come_back_as_json_lines_in_order(run, model, tmp_path):
    prompts = ["The function", "def ", "naïve", ""]
    expected = [model.generate(p.encode(), 16, temperature=0) for p in prompts]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    outputs = []
    for argv in (["--prompts-file", str(path), "--batch-size", "3"],
                 [arg for p in prompts for arg in ("--prompt", p)]):
        status, out, _ = generate_cli("--checkpoint", run["run"]["dir"], *argv, "--temperature", "0",
                                      "--max-bytes", "16")
        assert status == 0
        outputs.append(out)
    records = [json.loads(line) for line in outputs[0].splitlines()]
    assert records == [{"prompt": p, "completion": e.decode("utf-8", errors="replace")}
                       for p, e in zip(prompts, expected)]
    assert outputs[1] == outputs[0]
    status, out, _ = generate_cli("--checkpoint", run["run"]["dir"], "--prompt", "def ", "--jsonl",
                                  "--temperature", "0", "--max-bytes", "16")
    assert status == 0 and json.loads(out) == records[1]


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0"], "synergy-generate: --batch-size 0 must be >= 1\n"),
    (["--prompts-file", "EMPTY"],
     "synergy-generate: --prompts-file 'EMPTY' holds no prompts; write one prompt per line\n"),
    (["--prompts-file", "MISSING"],
     "synergy-generate: --prompts-file 'MISSING' does not exist; pass a file with one prompt per line\n"),
    (["--prompts-file", "EMPTY", "--prompt", "x"],
     "synergy-generate: --prompt and --prompts-file both given; pass the prompts one way\n"),
])
def test_bad_prompt_options_fail_with_one_clear_line(tmp_path, argv, message):
    (tmp_path / "EMPTY").write_bytes(b"")
    argv = [str(tmp_path / a) if a in ("EMPTY", "MISSING") else a for a in argv]
    status, out, err = generate_cli("--checkpoint", str(tmp_path), *argv)
    assert status == 2 and out == "" and err == message.replace("'EMPTY'", f"'{tmp_path / 'EMPTY'}'").replace(
        "'MISSING'", f"'{tmp_path / 'MISSING'}'")
