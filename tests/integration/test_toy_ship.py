"""Shipped toy models (vopd.toy.ship): ship -> manifest, install with hash and greedy checks,
SFT from scratch when the world or the settings differ or a rebuild is asked; and the models
shipped in the package: intact, made with the default world and settings, installed byte for byte
and passing their greedy check."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_model, tiny_llama

from vopd.toy import sft as sft_mod
from vopd.toy import ship as ship_mod
from vopd.toy.world import WorldSpec, write_world

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_world(root, WorldSpec(n_train=64, n_val=16, n_test=32, n_hard=16, n_mcq=16))
    return root


SFT = {"steps": 7, "batch_size": 4, "eval_every": 1, "eval_size": 8}  # a request's settings


@pytest.fixture
def shipped(tmp_path, world, toy_tokenizer):
    """(root, manifest) of tiny "SFT'd" models shipped into tmp_path/shipped."""
    models = tmp_path / "sft_out"
    for role, seed in (("teacher", 1), ("student", 0)):
        save_model(tiny_llama(toy_tokenizer, seed), toy_tokenizer, models / role)
    settings = sft_mod.sft_settings(threads=torch.get_num_threads(), **SFT)
    summary = {"settings": settings, "greedy_accuracy": {"teacher/toy_test": 0.0}, "time_s": {}}
    (models / "sft_summary.json").write_text(json.dumps(summary))
    root = tmp_path / "shipped"
    manifest = ship_mod.ship(world, models, root=root)
    return root, manifest


def test_ship_writes_hashes_sizes_and_the_key(shipped, world):
    root, manifest = shipped
    assert json.loads((root / "manifest.json").read_text()) == manifest
    names = {rel.split("/", 1)[1] for rel in manifest["files"] if "/" in rel}
    assert set(manifest["files"]) - {f"{r}/{n}" for r in ship_mod.ROLES for n in names} == {
        "sft_summary.json"
    }
    assert set(ship_mod.REQUIRED_FILES) <= names <= set(ship_mod.MODEL_FILES)
    for rel, f in manifest["files"].items():
        assert ship_mod.sha256_file(root / rel) == f["sha256"]
        assert (root / rel).stat().st_size == f["bytes"]
    assert not list(root.rglob("*.bin")) and not list(root.rglob("*.pt"))  # no pickles
    request = sft_mod.sft_settings(threads=torch.get_num_threads(), **SFT)
    key = ship_mod.models_key(ship_mod.world_fingerprint(world), request)
    assert manifest["key"] == key
    assert set(manifest["check"]["accuracy"]) == {
        f"{r}/{b}" for r in ship_mod.ROLES for b in sft_mod.BENCHMARKS
    }


def no_sft(monkeypatch):
    calls = []
    monkeypatch.setattr(sft_mod, "run_sft", lambda *a, **k: calls.append(k) or {"sft": True})
    return calls


def test_matching_request_installs_without_training(shipped, world, tmp_path, monkeypatch, capsys):
    root, manifest = shipped
    calls = no_sft(monkeypatch)
    out = tmp_path / "models"
    summary = ship_mod.models(world, out, root=root, **SFT)
    assert calls == [] and "shipped" in capsys.readouterr().out
    assert summary["source"]["key"] == manifest["key"]
    assert summary["source"]["check"]["accuracy"] == manifest["check"]["accuracy"]
    for rel, f in manifest["files"].items():  # byte for byte, sft_summary.json included
        assert (out / rel).read_bytes() == (root / rel).read_bytes(), rel
        assert ship_mod.sha256_file(out / rel) == f["sha256"]
    assert json.loads((out / "install.json").read_text())["key"] == manifest["key"]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"rebuild": True}, "asked to rebuild"),
        ({"steps": 8}, "sft: steps 8 (shipped 7)"),
        ({"lr": 1e-3}, "sft: lr 0.001 (shipped 0.003)"),
    ],
)
def test_other_settings_or_rebuild_train_from_scratch(
    shipped, world, tmp_path, monkeypatch, capsys, change, reason
):
    root, _ = shipped
    calls = no_sft(monkeypatch)
    request = {**SFT, **change}
    assert ship_mod.models(world, tmp_path / "m", root=root, **request) == {"sft": True}
    assert len(calls) == 1 and reason in capsys.readouterr().out
    assert calls[0] == {k: v for k, v in request.items() if k != "rebuild"}
    assert not (tmp_path / "m" / "teacher").exists()


def test_another_world_trains_from_scratch(shipped, tmp_path, monkeypatch, capsys):
    root, _ = shipped
    other = tmp_path / "other_world"
    write_world(other, WorldSpec(seed=1, n_train=64, n_val=16, n_test=32, n_hard=16, n_mcq=16))
    calls = no_sft(monkeypatch)
    ship_mod.models(other, tmp_path / "m", root=root, **SFT)
    assert len(calls) == 1 and "world: data" in capsys.readouterr().out


def test_a_damaged_file_or_a_failed_check_is_an_error(shipped, world, tmp_path, monkeypatch):
    root, manifest = shipped
    no_sft(monkeypatch)
    weights = root / "student" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(ValueError, match=r"student/model\.safetensors.*damaged.*toy\.rebuild"):
        ship_mod.models(world, tmp_path / "m1", root=root, **SFT)
    weights.write_bytes(good)
    manifest["check"]["accuracy"]["teacher/toy_hard"] += 0.5  # recorded far from what it does
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"greedy check.*teacher/toy_hard.*toy\.rebuild"):
        ship_mod.models(world, tmp_path / "m2", root=root, **SFT)


def test_no_manifest_trains_from_scratch(world, tmp_path, monkeypatch, capsys):
    calls = no_sft(monkeypatch)
    ship_mod.models(world, tmp_path / "m", root=tmp_path / "nothing", **SFT)
    assert len(calls) == 1 and "no shipped models" in capsys.readouterr().out


def test_ship_refuses_unexpected_files(world, tmp_path, toy_tokenizer):
    models = tmp_path / "sft_out"
    for role in ship_mod.ROLES:
        save_model(tiny_llama(toy_tokenizer, 0), toy_tokenizer, models / role)
    (models / "teacher" / "training_args.bin").write_bytes(b"pickle")
    (models / "sft_summary.json").write_text(json.dumps({"settings": {}, "greedy_accuracy": {}}))
    with pytest.raises(ValueError, match="unexpected files"):
        ship_mod.ship(world, models, root=tmp_path / "shipped")


# ---------------------------------------------------------------------------------------------
# The models shipped in the package.

MANIFEST = ship_mod.read_manifest()
needs_shipped = pytest.mark.skipif(MANIFEST is None, reason="no models in vopd/toy/shipped")


@pytest.fixture(scope="module")
def default_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("default_world")
    write_world(root)  # the default toy world (a few seconds)
    return root


@needs_shipped
def test_shipped_files_are_intact_and_small():
    for rel, f in MANIFEST["files"].items():
        path = ship_mod.SHIPPED / rel
        assert ship_mod.sha256_file(path) == f["sha256"], rel
        assert path.stat().st_size == f["bytes"] < 4 << 20, rel
    summary = json.loads((ship_mod.SHIPPED / "sft_summary.json").read_text())
    assert summary["greedy_accuracy"] == MANIFEST["greedy_accuracy"]


@needs_shipped
def test_shipped_models_are_the_default_worlds_and_settings(default_world):
    """The default run (`python -m vopd.toy models` with no flags, SFT's 2 threads) uses them:
    the key of the default request is the manifest's, whatever the torch build."""
    request = sft_mod.sft_settings(threads=2)
    world = ship_mod.world_fingerprint(default_world)
    assert ship_mod.differences(MANIFEST, world, request) == []
    assert ship_mod.models_key(world, request) == MANIFEST["key"]


@needs_shipped
def test_shipped_models_install_byte_for_byte_and_pass_the_greedy_check(default_world, tmp_path):
    """The default request (2 threads: the workflow's SFT_THREADS) installs the package's models:
    every file (sft_summary.json too) equal to the shipped one, so the default run downstream
    reads exactly what the SFT wrote; the greedy check ran and the teacher beats the student."""
    out, threads = tmp_path / "models", torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        summary = ship_mod.models(default_world, out)
    finally:
        torch.set_num_threads(threads)
    assert "source" in summary
    for rel in MANIFEST["files"]:
        assert (out / rel).read_bytes() == (ship_mod.SHIPPED / rel).read_bytes(), rel
    acc = summary["source"]["check"]["accuracy"]
    assert acc == pytest.approx(MANIFEST["check"]["accuracy"], abs=ship_mod.CHECK_TOLERANCE)
    assert acc["student/toy_test"] < acc["teacher/toy_test"]
