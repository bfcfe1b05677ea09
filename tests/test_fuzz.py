"""Seeded fuzz tests of the two readers of user files: the config loader (random YAML, random dotted
overrides, random value types) and the shard reader (random byte flips and truncations of a real
shard). Bounded and fast (a few seconds): a failure prints the seed and the case that broke."""

from __future__ import annotations

import random
import string
from pathlib import Path

import pytest
import yaml

from data_pipeline.shards import (
    MANIFEST_NAME,
    CorruptShardError,
    ManifestError,
    ShardInfo,
    ShardReader,
    load_manifest,
    make_manifest,
    save_manifest,
    write_shard,
)
from synergy_dist.config import Config, ConfigError, config_from_dict, load_config, to_plain

CONFIG_CASES = 300
REPO = Path(__file__).resolve().parents[1]


def _leaf_paths(node, prefix=()) -> list[tuple[str, ...]]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _leaf_paths(v, prefix + (k,))] or [prefix]
    if isinstance(node, list) and node and isinstance(node[0], dict):
        return [p for i, v in enumerate(node) for p in _leaf_paths(v, prefix + (str(i),))]
    return [prefix]


KEYS = [".".join(p) for p in _leaf_paths(to_plain(Config())) if p]
SECTIONS = sorted({k.split(".")[0] for k in KEYS})


def random_value(rng: random.Random, depth: int = 0):
    kinds = ["int", "float", "str", "bool", "none", "special"] + (["list", "dict"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.choice([0, 1, -1, 2, 7, 256, 10**30, -(10**30)]) * rng.choice([1, 1, 3])
    if kind == "float":
        return rng.choice([0.0, 0.5, -0.5, 1e-30, 1e30, 3e-4, 2.0])
    if kind == "str":
        return "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 8)))
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "special":
        return rng.choice([float("nan"), float("inf"), float("-inf"), "", ".", "[", "{a: 1}", "\x00", "1e", "0x1f"])
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(KEYS).split(".")[-1]: random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def random_override(rng: random.Random) -> str:
    key = rng.choice(KEYS)
    parts = key.split(".")
    if rng.random() < 0.2:  # damage the key: cut it, add a part, a list index, an empty part
        parts = rng.choice([parts[: rng.randint(1, len(parts))], parts + [rng.choice(["x", "0", "9", ""])],
                            parts[:1] + ["stages", str(rng.randint(0, 3))] + parts[1:]])
    if rng.random() < 0.3:
        raw = "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 12)))
    else:
        raw = yaml.safe_dump(random_value(rng), default_flow_style=True).strip().removesuffix("...").strip()
    return ".".join(parts) + rng.choice(["=", "=", "=", ""]) + raw


def mutate_text(rng: random.Random, text: str) -> str:
    chars = list(text)
    for _ in range(rng.randint(1, 6)):
        at = rng.randrange(len(chars))
        op = rng.random()
        if op < 0.4:
            del chars[at]
        elif op < 0.8:
            chars.insert(at, rng.choice(string.printable + "\t\x00é"))
        else:
            chars[at] = rng.choice(":-[]{}#&*!|>'\"%@`,?")
    return "".join(chars)


@pytest.mark.parametrize("seed", range(3))
def test_config_loader_fuzz_raises_only_config_errors(tmp_path, seed):
    rng = random.Random(seed)
    texts = [p.read_text() for p in sorted((REPO / "configs").glob("*.yaml"))]
    accepted = 0
    for case in range(CONFIG_CASES // 3):
        path = tmp_path / f"case{case}.yaml"
        mode = rng.random()
        if mode < 0.05:  # not text at all
            path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(0, 64))))
        elif mode < 0.4:
            path.write_text(mutate_text(rng, rng.choice(texts)))
        elif mode < 0.7:
            tree = {rng.choice(SECTIONS + ["bogus"]): random_value(rng) for _ in range(rng.randint(0, 3))}
            path.write_text(yaml.safe_dump(tree))
        else:
            path.write_text(rng.choice(texts))
        overrides = [random_override(rng) for _ in range(rng.randint(0, 3))]
        try:
            cfg = load_config(path, overrides)
        except ConfigError:
            continue
        except Exception as err:  # noqa: BLE001 - the point of the test
            pytest.fail(f"seed {seed} case {case}: {type(err).__name__}: {err}\n--- yaml ---\n{path.read_bytes()!r}"
                        f"\n--- overrides --- {overrides}")
        accepted += 1
        assert isinstance(cfg, Config)
        assert config_from_dict(cfg.to_dict()) == cfg  # what was accepted round-trips
    assert accepted > 0  # the fuzz reaches valid configs too, not only the first check


# ----------------------------------------------------------------------------- the shard reader

SHARD_CASES = 400


@pytest.fixture(scope="module")
def real_shard(tmp_path_factory) -> tuple[bytes, list[bytes], ShardInfo]:
    """A small shard written by the real writer: 30 documents in 256-byte frames."""
    rng = random.Random(7)
    docs = [bytes(rng.randrange(97, 123) for _ in range(rng.randrange(0, 120))) for _ in range(30)]
    path = tmp_path_factory.mktemp("fuzz") / "shard-000000.bin"
    info = write_shard(path, docs, frame_bytes=256)
    return path.read_bytes(), docs, info


def read_all(path: Path, info: ShardInfo | None) -> list[bytes]:
    reader = ShardReader(path, expected_bytes=info.file_bytes if info else None)
    try:
        return list(reader.documents())
    finally:
        reader.close()


@pytest.mark.parametrize("with_manifest_size", [True, False])
def test_shard_reader_fuzz_every_damage_is_caught(tmp_path, real_shard, with_manifest_size):
    """Random byte flips, truncations and appended bytes: the reader either raises CorruptShardError or
    returns the exact documents (a flip that leaves the content intact, e.g. a frame header flag). With
    the manifest's size (as the trainer reads) a changed length is caught before anything is read."""
    blob, docs, info = real_shard
    rng = random.Random(11 + with_manifest_size)
    path = tmp_path / "shard-000000.bin"
    outcomes = {"caught": 0, "intact": 0}
    for case in range(SHARD_CASES // 2):
        data = bytearray(blob)
        kind = rng.choice(["flip", "flip", "flips", "truncate", "append"])
        if kind == "flip":
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == "flips":
            for _ in range(rng.randint(2, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == "truncate":
            data = data[: rng.randrange(len(data))]
        else:
            data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        path.write_bytes(bytes(data))
        try:
            got = read_all(path, info if with_manifest_size else None)
        except CorruptShardError as err:
            assert str(err).startswith(f"shard {path}: ") and "\n" not in str(err)
            outcomes["caught"] += 1
            continue
        except Exception as err:  # noqa: BLE001 - the point of the test
            pytest.fail(f"case {case} ({kind}): {type(err).__name__}: {err}")
        assert got == docs, f"case {case} ({kind}): damaged data returned"
        outcomes["intact"] += 1
    assert outcomes["caught"] > 0.9 * sum(outcomes.values())


def test_manifest_fuzz_every_edit_is_caught(tmp_path, real_shard):
    """Random byte edits of a real manifest.json: ManifestError, or a manifest equal to the original
    (an edit of white space); never a different manifest, never another exception."""
    blob, _, info = real_shard
    directory = tmp_path / "set"
    directory.mkdir()
    (directory / info.name).write_bytes(blob)
    save_manifest(directory, make_manifest([info], source={"inputs": ["fuzz"]}))
    original = load_manifest(directory)
    text = (directory / MANIFEST_NAME).read_bytes()
    rng = random.Random(5)
    for case in range(SHARD_CASES // 2):
        data = bytearray(text)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.choice(b'0123456789abcdef" ,:{}[]\n\xff')
        (directory / MANIFEST_NAME).write_bytes(bytes(data))
        try:
            got = load_manifest(directory)
        except ManifestError as err:
            assert "\n" not in str(err)
            continue
        except Exception as err:  # noqa: BLE001 - the point of the test
            pytest.fail(f"case {case}: {type(err).__name__}: {err}\n{bytes(data)!r}")
        assert got == original, f"case {case}: an edited manifest was accepted: {bytes(data)!r}"
