"""The README's two opening commands and CI must not drift apart."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)
    lines = [line.strip() for block in blocks[:2] for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_readme_opens_with_main_job_and_test_command():
    main_job, tests = readme_commands()[:2]
    assert main_job.startswith("python3 -m venv .venv && .venv/bin/pip install torch==2.13.0")
    assert "synergy-train --config configs/tiny-cpu.yaml" in main_job
    assert tests.startswith("python3 -m venv .venv && .venv/bin/pip install torch==2.13.0")
    assert '.venv/bin/pip install -e ".[test]"' in tests


def test_ci_runs_exactly_the_readme_test_command():
    test_command = readme_commands()[1].split("&&")[-1].strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines, f"{test_command!r} is not a line of .ci/run"
    assert ci_lines.index(test_command) > max(i for i, l in enumerate(ci_lines) if "pip install" in l)
    # torch's CPU build must be pinned before the project pulls a torch range
    torch_line = next(i for i, l in enumerate(ci_lines) if "torch==2.13.0" in l)
    project_line = next(i for i, l in enumerate(ci_lines) if "-e " in l and "pip install" in l)
    assert torch_line < project_line


def test_sample_corpus_is_small_and_licensed():
    sample = ROOT / "synergy_dist" / "sample_data"
    assert (sample / "sample.jsonl.zst").stat().st_size < 400_000
    assert "Python Software Foundation" in (sample / "LICENSE-PSF.txt").read_text()


def architecture_paths() -> set[str]:
    """Every repository path named in backticks on docs/ARCHITECTURE.md."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    names = re.findall(r"`([A-Za-z_][\w./*-]*/[\w./*-]+)`", text)
    return {name for name in names if not name.startswith(("RUN_DIR", "checkpoints/"))}


def test_architecture_map_names_only_existing_files():
    missing = sorted(p for p in architecture_paths() if not list(ROOT.glob(p)))
    assert not missing, f"docs/ARCHITECTURE.md names paths that do not exist: {missing}"


def test_architecture_map_names_every_module():
    """The map is complete by construction: each source file of the packages and benchmarks is on it."""
    named = architecture_paths()
    sources = [p for pattern in ("synergy_dist/**/*.py", "data_pipeline/**/*.py", "benchmarks/**/*.py",
                                 "data_pipeline/*.c", "benchmarks/**/*.sh")
               for p in ROOT.glob(pattern) if p.name != "__init__.py"]
    unnamed = sorted(str(p.relative_to(ROOT)) for p in sources if str(p.relative_to(ROOT)) not in named)
    assert not unnamed, f"docs/ARCHITECTURE.md does not place these files: {unnamed}"


def test_no_document_points_outside_the_repository():
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        assert "DESIGN.md" not in doc.read_text(), f"{doc.name} points at a design file outside the repository"
