"""``benchmarks/hidden_cost.py --issue`` end to end with the measurements faked (no timing): the
variants it plans (every estimator on both paths, the floors, the naive reference, vopd at
B·T 512/2048/8192), the logits path skipped where it exceeds the 24 GiB cap and extrapolated,
and the JSON / CSV / Markdown outputs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from vopd.estimators import ESTIMATORS

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "hidden_cost.py"


def _load():
    spec = importlib.util.spec_from_file_location("hidden_cost", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_issue_mode_plans_the_measurement_and_writes_its_outputs(tmp_path, monkeypatch, capsys):
    bench = _load()
    seen = []

    def fake(spec, timeout):  # a row shaped like vopd.profile.measure_one's, numbers made up
        seen.append(spec)
        n = spec["seq_len"] * spec["batch"]
        hidden = spec.get("path") == "hidden"
        return {**spec, "path": spec.get("path", "logits"), "status": "ok",
                "step_s": 1e-3 * n * (1.1 if hidden else 1.0), "peak_mem_bytes": 2**30,
                "above_inputs_bytes": (2**20 if hidden else 2**24) * n // 512}  # fmt: skip

    monkeypatch.setattr(bench, "measure_isolated", fake)
    monkeypatch.setattr(bench, "format_table", lambda rows: "")
    monkeypatch.setattr(bench, "_available_bytes", lambda: 64 * 2**30)  # the cap binds: 24 GiB
    monkeypatch.setattr(sys, "argv", ["hidden_cost.py", "--issue", "--out-dir", str(tmp_path)])
    bench.main()
    kernels = [s for s in seen if "hidden_size" not in s]
    assert [s["estimator"] for s in kernels] == ["floor", "floor_prealloc", *ESTIMATORS,
                                                 "naive_vopd"]  # fmt: skip
    assert {(s["vocab_size"], s["seq_len"] * s["batch"], s["repeats"]) for s in kernels} == {
        (151_936, 512, 3)
    }
    hidden = [s for s in seen if "hidden_size" in s]
    assert all(s["hidden_size"] == 2048 and s["warmup"] is False for s in hidden)
    at512 = {(s["estimator"], s["path"]) for s in hidden if s["seq_len"] == 512}
    assert at512 == {(n, p) for n in ESTIMATORS for p in ("logits", "hidden")}
    # vopd's logits path at 8192 (~18.5 GiB predicted) fits min(24, 64) - 4 (margin) = 20 GiB
    scaled = {(s["seq_len"], s["path"]) for s in hidden if s["seq_len"] > 512}
    assert scaled == {(2048, "hidden"), (2048, "logits"), (8192, "hidden"), (8192, "logits")}
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [t["tokens"] for t in result["scaling"]] == [512, 2048, 8192]
    assert result["skipped"] == []
    names = [v["name"] for v in result["verdicts"]]
    assert "vopd time / sample_opd, hidden path" in names and "vopd time / sample_opd" in names
    written = json.loads((tmp_path / "hidden_cost.json").read_text())
    assert written["scaling"] == result["scaling"]
    rows = (tmp_path / "rows.csv").read_text().splitlines()
    assert len(rows) == 1 + len(seen)
    assert (tmp_path / "scaling.csv").read_text().startswith("tokens,logits_s,hidden_s")
    assert "Scaling of vopd" in (tmp_path / "hidden_cost.md").read_text()


def test_logits_path_over_the_cap_is_extrapolated_and_said(tmp_path, monkeypatch, capsys):
    bench = _load()
    seen = []

    def fake(spec, timeout):
        seen.append(spec)
        n = spec["seq_len"]
        return {**spec, "status": "ok", "step_s": 1e-3 * n, "peak_mem_bytes": 2**30,
                "above_inputs_bytes": 2**20 * n}  # fmt: skip

    monkeypatch.setattr(bench, "measure_isolated", fake)
    monkeypatch.setattr(bench, "format_table", lambda rows: "")
    monkeypatch.setattr(bench, "_available_bytes", lambda: 16 * 2**30)  # < 18.5 GiB + margin
    monkeypatch.setattr(sys, "argv", ["hidden_cost.py", "--issue", "--out-dir", str(tmp_path)])
    bench.main()
    out = capsys.readouterr().out
    assert "logits path at B·T=8192 not measured" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert [(s["seq_len"], s["path"]) for s in result["skipped"]] == [(8192, "logits")]
    assert not any(s["seq_len"] == 8192 and s.get("path") == "logits" for s in seen)
    last = result["scaling"][-1]
    assert last["tokens"] == 8192 and last["logits_path"] == "extrapolated from B·T = 512, 2048"
    assert "not measured" in (tmp_path / "hidden_cost.md").read_text()
