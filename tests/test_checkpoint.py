"""Checkpoints are not trusted blindly (issue 28): every weights file carries its SHA-256 and is
verified on load, non-finite weights are refused, file names stay inside the folder, and any
malformed JSON (checkpoint or dataset index) is an error naming the file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
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


def test_shipped_weights_fit_the_budget():
    """Everything that ships (packaged models and env heads) stays within 48 MiB of shards of at
    most 16 MiB each: the package's weight budget (store in fp8 to fit a larger model)."""
    shards = [*checkpoint.PACKAGED.glob("*/*.safetensors"), *HEADS.parent.glob("*/*.safetensors")]
    assert shards and all(f.stat().st_size <= checkpoint.MAX_SHARD_BYTES for f in shards)
    assert sum(f.stat().st_size for f in shards) <= 48 * 2**20


def test_deeply_nested_dataset_index_names_the_file(doom_recording, tmp_path):
    import shutil

    root = tmp_path / "ds"
    shutil.copytree(doom_recording, root)
    (root / "index.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DatasetError, match="index.json"):
        Dataset(root)


# --- fp8 storage (issue 24: a larger model in the same weight budget) --------------------------


def test_fp8_storage_round_trips_within_fp8_precision(tmp_path, monkeypatch):
    """Matrices come back as q * scale (relative error within e4m3's 3 mantissa bits), vectors as
    bf16, integers exactly; a tensor and its scale share a shard however the part is sharded."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"m{i}": torch.randn(64, 32, generator=g) * 10**i for i in range(-2, 3)}
    tensors |= {"conv": torch.randn(8, 4, 3, 3, generator=g), "bias": torch.randn(32, generator=g)}
    tensors |= {"steps": torch.arange(5), "zero": torch.zeros(4, 4)}
    monkeypatch.setattr(checkpoint, "MAX_SHARD_BYTES", 3000)  # a 2 KiB fp8 matrix and its scale per shard
    checkpoint.save(tmp_path, "dynamics", checkpoint.to_fp8(tensors), {"model": {}})
    assert len(_meta(tmp_path / "dynamics.json")["files"]) > 3
    back, _ = checkpoint.load(tmp_path, "dynamics")
    assert set(back) == set(tensors) and checkpoint.stored_dtype(tmp_path, "dynamics") == checkpoint.FP8
    for name in ("m-2", "m0", "m2", "conv"):
        w, q = tensors[name], back[name]
        assert q.dtype == torch.float32 and q.shape == w.shape
        # e4m3: 3 mantissa bits (relative step 1/8 at worst, so error <= 1/16 rounded); values below
        # its smallest normal (2^-6 of the scale unit) round on an absolute grid of 2^-9 units.
        unit = w.abs().max() / 448
        assert ((q - w).abs() <= torch.maximum(w.abs() / 16, unit * 2**-9)).all(), name
        assert torch.equal(q.abs().max(), w.abs().max())  # the largest weight is exact
    assert back["bias"].dtype == torch.bfloat16 and torch.equal(back["bias"], tensors["bias"].bfloat16())
    assert torch.equal(back["steps"], tensors["steps"]) and torch.equal(back["zero"], tensors["zero"])
    checkpoint.copy_part(tmp_path, tmp_path / "copy", "dynamics")  # a copy keeps the fp8 storage
    copied, _ = checkpoint.load(tmp_path / "copy", "dynamics")
    assert checkpoint.stored_dtype(tmp_path / "copy", "dynamics") == checkpoint.FP8
    assert all(torch.equal(copied[k], back[k]) for k in back)


def test_fp8_tensors_without_their_scale_are_refused(tmp_path):
    q = checkpoint.to_fp8({"w": torch.randn(4, 4)})
    checkpoint.save(tmp_path, "a", {"w": q["w"]}, {})
    with pytest.raises(CheckpointError, match=r"fp8 tensors without a \.fp8_scale scale: \['w'\]"):
        checkpoint.load(tmp_path, "a")
    checkpoint.save(tmp_path, "b", {"w": torch.randn(4, 4), "w.fp8_scale": q["w.fp8_scale"]}, {})
    with pytest.raises(CheckpointError, match=r"w\.fp8_scale scales no fp8 tensor w"):
        checkpoint.load(tmp_path, "b")
    checkpoint.save(tmp_path, "c", {"w": q["w"], "w.fp8_scale": torch.tensor(float("nan"))}, {})
    with pytest.raises(CheckpointError, match="must be one finite number"):
        checkpoint.load(tmp_path, "c")
    with pytest.raises(ValueError, match="reserves"):
        checkpoint.to_fp8({"x.fp8_scale": torch.ones(2, 2)})


def test_convert_stores_a_playable_model_in_fp8(tiny_checkpoint, tmp_path, capsys):
    """`worldgen checkpoint convert --dtype fp8`: the same model in about a quarter of its fp32
    bytes, whose sessions play what the original plays, nearly."""
    from worldgen import WorldModel
    from worldgen.actions import Action
    from worldgen.cli import main

    out = tmp_path / "fp8"
    assert main(["checkpoint", "convert", str(tiny_checkpoint), str(out), "--dtype", "fp8"]) == 0
    assert "float8_e4m3fn" in capsys.readouterr().out
    assert set(checkpoint.parts(out)) == set(checkpoint.parts(tiny_checkpoint)) >= {"tokenizer", "dynamics", "starts"}
    for part in ("tokenizer", "dynamics"):
        assert checkpoint.stored_dtype(out, part) == checkpoint.FP8
    size = sum(f.stat().st_size for f in checkpoint.shard_files(out, "dynamics"))
    assert size < 0.4 * sum(t.numel() * 4 for t in checkpoint.load(tiny_checkpoint, "dynamics")[0].values())
    played = []
    for folder in (tiny_checkpoint, out):
        s = WorldModel.load(folder, device="cpu").session(seed=0)
        played.append(np.stack([s.step(Action.from_keys(["forward"], yaw=5.0)) for _ in range(3)]).astype(float))
    mse = ((played[0] - played[1]) ** 2).mean()
    assert 0 < mse and 10 * np.log10(255**2 / mse) > 30  # changed, but far less than the model's own error
    assert main(["checkpoint", "convert", str(tiny_checkpoint), str(out), "--dtype", "fp8"]) == 1
    assert "not empty" in capsys.readouterr().err
