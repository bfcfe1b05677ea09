"""synergy-export --format hf: a transformers directory that runs the project's own model source.

On the shared 2-rank expert-parallel MoE run (eval_helpers): the exported modules are the project's files with
only their imports made relative; logits equal the native model's; greedy generate equals synergy-generate,
through the project's generation cache; left-padded batches; the byte tokenizer; loading in a process where
this project and DeepSpeed cannot be imported; bad input.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import eval_helpers as eh
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_pipeline.vocab import EOD_ID, PAD_ID
from synergy_dist.cli.export import main as export_main
from synergy_dist.cli.generate import main as generate_main
from synergy_dist.hf.source import flat_name, model_sources, module_file, relative_imports
from synergy_dist.loading import load_model

PROMPTS = [b"def main():\n    ", b"The ", b"import os\nimport sys\n\nclass Reader:"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    return eh.trained_run(tmp_path_factory.getbasetemp() / "eval_run")


def cli(main, *argv: str) -> tuple[int, str, str]:
    """A command's main() in this process: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def hf_dir(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "export"
    status, stdout, stderr = cli(export_main, run["run"]["dir"], "--output", str(out), "--format", "hf")
    assert status == 0, stderr
    assert "AutoModelForCausalLM.from_pretrained" in stdout
    return out


@pytest.fixture(scope="module")
def native(run):
    return load_model(run["run"]["dir"])[0]


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=True)


@pytest.fixture(scope="module")
def tokenizer(hf_dir):
    return AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=True)


def test_exported_modules_are_the_projects_source_with_relative_imports(hf_dir):
    sources = model_sources()
    assert {"synergy_dist.model.synergy", "synergy_dist.model.moe.layer", "data_pipeline.vocab"} <= set(sources)
    exported = {p.name for p in hf_dir.glob("*.py")}
    assert exported == {flat_name(m) + ".py" for m in sources}
    for module, text in sources.items():
        assert text == module_file(module).read_text()
        mine, theirs = text.splitlines(), (hf_dir / f"{flat_name(module)}.py").read_text().splitlines()
        assert len(mine) == len(theirs)
        for ours, written in zip(mine, theirs):
            if ours != written:  # only imports of the project differ, and only in their module path
                assert ours.lstrip().startswith(("from synergy_dist.", "from data_pipeline.")), ours
                assert written == relative_imports(ours) and written.lstrip().startswith("from ."), written


def test_the_model_imports_deepspeed_only_where_it_is_optional(hf_dir):
    """Module-level imports of the exported files never name DeepSpeed; the MoE layer's is in a try block (it only
    borrows DeepSpeed's type), expert parallelism's inside functions that an export (1 rank) never calls."""
    for path in hf_dir.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "deepspeed" for n in names), (path.name, names)


def test_config_and_files(hf_dir, run):
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model"]["middle"]["moe"]["expert_parallel_size"] == 1  # trained with 2, merged on export
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_synergy.SynergyForCausalLM"
    assert config["max_position_embeddings"] == run["data"]["seq_len"]
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (EOD_ID, EOD_ID, PAD_ID)
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == [PAD_ID]  # synergy-generate never produces PAD either


def test_logits_equal_the_native_model(hf_model, native):
    ids = torch.tensor([[EOD_ID, *b"def add(a, b):\n    return a + b\n", EOD_ID, *b"x = 1"]])
    with torch.no_grad():
        assert torch.allclose(hf_model(ids).logits, native(ids).logits, rtol=0, atol=1e-5)
    assert hf_model.dtype == torch.float32 and not hf_model.training


def test_greedy_generate_equals_synergy_generate_through_the_cache(hf_model, tokenizer, native, run):
    calls = []
    original = hf_model.model._run

    def recording(ids, cache):
        calls.append((ids.shape[1], cache is not None))
        return original(ids, cache)

    hf_model.model._run = recording
    try:
        for prompt in PROMPTS[:2]:
            calls.clear()
            enc = tokenizer(tokenizer.bos_token + prompt.decode(), return_tensors="pt")
            assert enc.input_ids[0].tolist() == [EOD_ID, *prompt]
            out = hf_model.generate(**enc, max_new_tokens=24, do_sample=False)
            new = out[0, enc.input_ids.shape[1]:].tolist()
            generated = bytes(i for i in new if i < 256)
            assert generated == native.generate(prompt, 24, temperature=0)
            # one prefill of the prompt, then one byte per call, every call with the project's cache
            assert calls == [(len(prompt) + 1, True)] + [(1, True)] * (len(calls) - 1) and len(calls) >= len(new)
    finally:
        hf_model.model._run = original
    status, stdout, stderr = cli(generate_main, "--checkpoint", run["run"]["dir"], "--prompt", PROMPTS[0].decode(),
                                 "--max-bytes", "24", "--temperature", "0")
    assert status == 0, stderr
    # the command ends its output with a newline
    assert stdout == native.generate(PROMPTS[0], 24, temperature=0).decode("utf-8", errors="replace") + "\n"


def left_padded(tokenizer, prompts: list[bytes]):
    texts = [tokenizer.bos_token + p.decode() for p in prompts]
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True)


def test_left_padded_batch_forward_equals_each_row_alone(hf_model, tokenizer):
    enc = left_padded(tokenizer, PROMPTS)
    assert enc.input_ids[1, 0] == PAD_ID and enc.attention_mask[1, 0] == 0
    with torch.no_grad():
        batch = hf_model(**enc).logits
        for i, prompt in enumerate(PROMPTS):
            alone = hf_model(torch.tensor([[EOD_ID, *prompt]])).logits[0]
            assert torch.allclose(batch[i, -alone.shape[0]:], alone, rtol=0, atol=1e-5), i


def test_left_padded_rows_without_eod_equal_each_row_alone(hf_model, tokenizer):
    """lm-eval's contexts carry no EOD: padding before them must not leak in either."""
    tokenizer.padding_side = "left"
    texts = [p.decode() for p in PROMPTS]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    assert enc.attention_mask[:, 0].min() == 0
    with torch.no_grad():
        batch = hf_model(**enc).logits
        for i, prompt in enumerate(PROMPTS):
            alone = hf_model(torch.tensor([list(prompt)])).logits[0]
            assert torch.allclose(batch[i, -alone.shape[0]:], alone, rtol=0, atol=1e-5), i


def test_left_padded_batch_generate_equals_each_prompt_alone(hf_model, tokenizer, native):
    enc = left_padded(tokenizer, PROMPTS)
    out = hf_model.generate(**enc, max_new_tokens=16, do_sample=False)
    for i, prompt in enumerate(PROMPTS):
        new = out[i, enc.input_ids.shape[1]:].tolist()
        assert bytes(t for t in new if t < 256) == native.generate(prompt, 16, temperature=0), i


def test_tokenizer_is_bytes_and_round_trips(tokenizer, tmp_path):
    text = "héllo, wörld ✓"
    ids = tokenizer(text).input_ids
    assert ids == list(text.encode("utf-8"))  # no special token added
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([EOD_ID, *b"a", PAD_ID], skip_special_tokens=True) == "a"
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (EOD_ID, EOD_ID, PAD_ID)
    assert len(tokenizer) == 258
    tokenizer.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(str(tmp_path / "tok"), trust_remote_code=True)
    assert again(text).input_ids == ids and again.decode(ids) == text and again.eos_token_id == EOD_ID
    with pytest.raises(ValueError, match=r"^token id 300 is outside the byte vocabulary: ids 0\.\.255 are bytes, "
                                         r"256 is <eod>, 257 is <pad>$"):
        tokenizer.decode([104, 300])


def test_save_pretrained_round_trip_carries_the_source(hf_model, tmp_path):
    """transformers copies remote code it loaded along when saving: the saved directory loads the same model."""
    hf_model.save_pretrained(tmp_path / "saved")
    assert {p.name for p in (tmp_path / "saved").glob("*.py")} == {flat_name(m) + ".py" for m in model_sources()} - \
        {"tokenization_synergy.py"}
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"), trust_remote_code=True)
    ids = torch.tensor([[EOD_ID, *PROMPTS[2]]])
    with torch.no_grad():
        a, b = again(ids).logits, hf_model(ids).logits
        assert torch.allclose(a, b, rtol=0, atol=1e-6), (a - b).abs().max()  # float32 rounding only


def test_out_of_vocabulary_input_is_one_clear_error(hf_model):
    with pytest.raises(ValueError, match=r"^input_ids has ids outside \[0, 258\)$"):
        hf_model(torch.tensor([[EOD_ID, 300]]))


NOT_INSTALLED = ("synergy_dist", "data_pipeline", "deepspeed", "__editable__")


def site_packages_without_project(view: Path) -> Path:
    """A folder of links to everything installed next to torch and transformers except this project and
    DeepSpeed (their packages, metadata and editable-install hooks): with `python -S` and it as the only
    path, they are not installed as far as importlib (find_spec, metadata) can tell."""
    site = Path(torch.__file__).resolve().parents[1]
    view.mkdir()
    for entry in site.iterdir():
        if not entry.name.lower().replace("-", "_").startswith(NOT_INSTALLED) and entry.suffix != ".pth":
            (view / entry.name).symlink_to(entry)
    return view


LOAD = '''
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
import importlib.util
for name in ("synergy_dist", "data_pipeline", "deepspeed"):
    if importlib.util.find_spec(name) is not None:
        raise SystemExit(f"{name} is importable")
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
ids = tokenizer(tokenizer.bos_token + "def main():", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=8, do_sample=False)
loaded = sorted({m.split(".")[0] for m in sys.modules})
print(json.dumps({"logits": model(ids).logits.tolist(), "generated": out[0].tolist(), "modules": loaded}))
'''


def test_loads_where_neither_this_project_nor_deepspeed_can_be_imported(hf_dir, native, tmp_path):
    """The same interpreter with the installed packages less synergy_dist, data_pipeline and deepspeed (as if
    only torch, transformers and their dependencies were installed) loads, runs and generates with the export."""
    site = site_packages_without_project(tmp_path / "site")
    env = dict(eh.tl.child_env(), PYTHONPATH=str(site), HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-S", "-c", LOAD, str(hf_dir)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert not {"synergy_dist", "data_pipeline", "deepspeed"} & set(result["modules"])
    ids = torch.tensor([[EOD_ID, *b"def main():"]])
    with torch.no_grad():
        assert torch.allclose(torch.tensor(result["logits"]), native(ids).logits, rtol=0, atol=1e-5)
    assert bytes(result["generated"][ids.shape[1]:]) == native.generate(b"def main():", 8, temperature=0)


def test_bad_input_is_one_clear_line(run, tmp_path):
    checkpoints = Path(run["run"]["dir"]) / "checkpoints"
    incomplete = tmp_path / "step_00000004"
    shutil.copytree(sorted(checkpoints.iterdir())[-1], incomplete)
    (incomplete / "COMPLETE").unlink()
    cases = [
        ([str(incomplete)], f"checkpoint '{incomplete}' is incomplete: no completion marker (killed while saving?); "
                            "export a complete checkpoint, or the run directory (its newest complete one)"),
        ([run["run"]["dir"], "--dtype", "bf16"], "--format hf writes float32 weights (the precision policy keeps "
                                                 "some float32); drop --dtype, or cast after loading"),
    ]
    for argv, message in cases:
        status, _, stderr = cli(export_main, *argv, "--output", str(tmp_path / "out"), "--format", "hf")
        assert status == 2 and stderr == f"synergy-export: {message}\n", stderr
    assert not (tmp_path / "out").exists()


def test_cached_forward_continues_where_the_cache_stopped(hf_model):
    """forward(use_cache=True) returns the project's cache; the next call reads one byte after it and gives the
    logits of a full forward over all the bytes (a hierarchy: the next byte may or may not open a concept)."""
    ids = torch.tensor([[EOD_ID, *PROMPTS[2]]])
    with torch.no_grad():
        full = hf_model(ids).logits
        first = hf_model(ids[:, :-3], use_cache=True)
        cache = first.cache
        assert type(cache).__name__ == "SynergyCache" and cache.get_seq_length() == ids.shape[1] - 3
        steps = [hf_model(ids[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(ids.shape[1] - 3,
                                                                                             ids.shape[1])]
    assert cache.get_seq_length() == ids.shape[1]
    assert torch.allclose(torch.cat([first.logits, *steps], dim=1), full, rtol=0, atol=1e-5)
