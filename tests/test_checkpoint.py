"""Checkpoints are not trusted blindly (issue 28): every weights file carries its SHA-256 and is
verified on load, non-finite weights are refused, file names stay inside the folder, and any
malformed JSON (checkpoint or dataset index) is an error naming the file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from worldgen import checkpoint
from worldgen.checkpoint import CheckpointError
from worldgen.data import Dataset, DatasetError

HEADS = Path(__file__).resolve().parents[1] / "env" / "heads" / "default"


def _part(folder: Path) -> Path:
    checkpoint.save(folder, "tokenizer", {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}, {"model": {}})
    return folder / "tokenizer.json"


def _meta(path: Path) -> dict:
    return json.loads(path.read_text())


def test_saved_files_carry_their_sha256_and_load_back(tmp_path):
    meta = _meta(_part(tmp_path))
    assert set(meta["sha256"]) == set(meta["files"]) and all(len(h) == 64 for h in meta["sha256"].values())
    tensors, _ = checkpoint.load(tmp_path, "tokenizer")
    assert torch.equal(tensors["w"], torch.arange(6.0).reshape(2, 3))


def test_a_flipped_byte_is_refused(tmp_path):
    meta = _meta(_part(tmp_path))
    shard = tmp_path / meta["files"][0]
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x01  # a weight's byte: the file still parses as safetensors
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=f"{shard.name}.*SHA-256"):
        checkpoint.load(tmp_path, "tokenizer")


def test_non_finite_weights_are_refused(tmp_path):
    w = torch.zeros(4, 4)
    w[1, 2] = float("nan")
    checkpoint.save(tmp_path, "dynamics", {"action_embed.0.bias": w, "ok": torch.ones(2)}, {})
    with pytest.raises(CheckpointError, match=r"dynamics-.*action_embed\.0\.bias.*1 NaN"):
        checkpoint.load(tmp_path, "dynamics")
    checkpoint.save(tmp_path, "dynamics", {"x": torch.tensor([float("inf"), 1.0], dtype=torch.bfloat16)}, {})
    with pytest.raises(CheckpointError, match="infinite"):
        checkpoint.load(tmp_path, "dynamics")


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors", "..", "", "x.json", 7])
def test_file_names_stay_inside_the_folder(tmp_path, name):
    path = _part(tmp_path)
    meta = _meta(path)
    meta["files"] = [name]
    meta["sha256"] = {str(name): "0" * 64}
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        checkpoint.load(tmp_path, "tokenizer")


@pytest.mark.parametrize(
    "text",
    [
        "[]",
        pytest.param("[" * 100_000 + "]" * 100_000, id="nested-100000"),
        '{"files": "x"}',
        '{"config": []}',
        '{"files": [], "sha256": []}',
        "null",
        '{"files": ["a.safetensors"]}',
    ],
)
def test_malformed_json_names_the_file(tmp_path, text):
    path = _part(tmp_path)
    path.write_text(text)
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        checkpoint.load(tmp_path, "tokenizer")
    if text != '{"files": ["a.safetensors"]}':  # config() reads no weights: a missing hash is its business
        with pytest.raises(CheckpointError, match="tokenizer.json"):
            checkpoint.config(tmp_path, "tokenizer")


def test_checkpoint_without_hashes_loads_with_a_warning(tmp_path, caplog):
    """Checkpoints written before hashes existed still load, and say they are unverified."""
    path = _part(tmp_path)
    meta = _meta(path)
    del meta["sha256"]
    path.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, "worldgen.checkpoint"):
        tensors, _ = checkpoint.load(tmp_path, "tokenizer")
    assert set(tensors) == {"w", "b"} and "SHA-256" in caplog.text


@pytest.mark.parametrize(
    "folder, parts", [("default", ("tokenizer", "dynamics", "starts")), (HEADS, ("reward", "geometry"))]
)
def test_shipped_checkpoints_store_and_match_their_hashes(folder, parts):
    root = checkpoint.resolve(folder)
    for part in parts:
        meta = _meta(root / f"{part}.json")
        assert set(meta["sha256"]) == set(meta["files"]), part
        for f in meta["files"]:
            assert checkpoint.sha256_file(root / f) == meta["sha256"][f], f


def test_deeply_nested_dataset_index_names_the_file(doom_recording, tmp_path):
    import shutil

    root = tmp_path / "ds"
    shutil.copytree(doom_recording, root)
    (root / "index.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DatasetError, match="index.json"):
        Dataset(root)
