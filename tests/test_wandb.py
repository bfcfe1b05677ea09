"""Weights & Biases logging (log.wandb): a real training run in WANDB_MODE=offline sends every number of
metrics.jsonl to one W&B run, whose offline files we read back with wandb's own record format; a resumed run
appends to the same run id (kept in the run directory). Without the wandb package the option fails before any
compute, naming the extra to install."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import train_launch as tl

from synergy_dist.cli.train import main as train_main
from synergy_dist.config import ConfigError, config_from_dict, validate_for_world

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

BLOCK = 32768  # the .wandb file is a LevelDB-style log of protobuf Records in 32 KiB blocks


def wandb_records(path: Path):
    """The Records of an offline .wandb file: header ':W&B' + magic + version, then chunks of
    (crc32, length, type) + data; type 1 = a whole record, 2/3/4 = its first/middle/last piece."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def offline_runs(run_dir: Path) -> list[dict]:
    """Each offline run under RUN_DIR/wandb, oldest first: its id, project, name and logged rows by step."""
    runs = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        run, rows = {}, {}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = {"id": record.run.run_id, "project": record.run.project, "name": record.run.display_name}
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                rows.setdefault(row["_step"], {}).update(row)
        runs.append({**run, "rows": rows})
    return runs


def test_metrics_go_to_one_wandb_run_resumed_after_a_restart(tmp_path):
    cfg = tl.tiny_config(tmp_path / "run", tmp_path / "sample", data={"sample_dir": ""},  # the shared sample cache
                         train={"max_steps": 2, "lr": 3e-3, "sample_bytes": 0},
                         log={"every_steps": 1, "tensorboard": False, "wandb": True, "wandb_project": "synergy-test",
                              "wandb_run_name": "tiny"})
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")  # inherited by the training processes
    try:
        assert tl.run(cfg) == 0, tl.output_of(cfg)[-3000:]
        cfg["train"]["max_steps"] = 4  # the restart resumes from the step-2 checkpoint
        assert tl.run(cfg) == 0, tl.output_of(cfg)[-3000:]
    finally:
        for key in ("WANDB_MODE", "WANDB_SILENT"):
            os.environ.pop(key)
    run_dir = Path(cfg["run"]["dir"])
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    first, resumed = offline_runs(run_dir)
    assert first["id"] == resumed["id"] == run_id
    assert first["project"] == "synergy-test" and first["name"] == "tiny"
    assert sorted(first["rows"]) == [1, 2] and sorted(resumed["rows"]) == [3, 4]
    # every number metrics.jsonl holds for a step is in the W&B row of that step, with the same value
    for record in tl.metrics(cfg):
        row = {**first["rows"], **resumed["rows"]}[record["step"]]
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        assert numbers and {k: row[k] for k in numbers} == pytest.approx(numbers, rel=1e-6)


def test_without_wandb_the_option_fails_before_any_compute(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    message = ("log.wandb=true needs the wandb package; install the extra (pip install 'synergy-dist[wandb]') or "
               "set log.wandb=false")
    cfg = config_from_dict({"run": {"dir": str(tmp_path / "run")}, "log": {"wandb": True}})
    with pytest.raises(ConfigError) as err:
        validate_for_world(cfg, 1, "cpu")
    assert str(err.value) == message
    assert train_main([f"run.dir={tmp_path / 'run'}", "log.wandb=true"]) == 2
    assert capsys.readouterr().err == f"synergy-train: configuration error: {message}\n"
    assert not (tmp_path / "run").exists()  # nothing was built or written


def test_an_empty_wandb_project_is_refused():
    with pytest.raises(ConfigError, match=r"^log\.wandb_project is empty; name a W&B project or set log\.wandb=false$"):
        config_from_dict({"log": {"wandb": True, "wandb_project": ""}})
