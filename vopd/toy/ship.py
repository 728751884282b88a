"""The shipped toy teacher and student: SFT off the critical path of the default run.

    python -m vopd.toy models --world resources/toy --out resources/toy/models [--rebuild ...]
    python -m vopd.toy ship --world resources/toy --models resources/toy/models   # maintainers

The SFT'd models of the default toy world (~2 MB each) live in ``vopd/toy/shipped/``:
``teacher/`` and ``student/`` as ``save_pretrained`` wrote them (safetensors weights, config and
tokenizer JSON: nothing is ever unpickled), their ``sft_summary.json`` (all byte for byte as the
SFT wrote them), and ``manifest.json``:

- ``key``: the sha256 of what determines the models: the world (its settings and a digest of its
  problems, answers and vocabulary, so a change to the generator shows too), the SFT settings
  (as ``run_sft`` records them, with its thread count) and ``SFT_VERSION``;
- ``build``: the torch and transformers versions the SFT ran with, as provenance only, not in the
  key: the shipped models are the product's artefact, and the same SFT on the same versions still
  gives other models on another CPU (its float reductions differ, and the training amplifies
  that: a teacher at greedy 0.96 on one machine class, 0.71 on another), so a new torch is no
  reason to retrain; the greedy check below says whether the models behave here;
- ``files``: the sha256 and size of every shipped file;
- ``greedy_accuracy``: the SFT's greedy accuracies on the full benchmarks, and ``check``: the
  greedy accuracies on the first ``CHECK_PROBLEMS`` problems of each benchmark.

``models`` installs the shipped models into ``--out`` when the requested world and SFT settings
have the shipped key and ``--rebuild`` is not given: it verifies every file's sha256, copies the
files byte for byte (``sft_summary.json`` too, so everything downstream reads what the SFT
wrote; where the models came from goes to ``install.json`` beside it), loads both models from
safetensors and re-measures the check slice, which must be within ``CHECK_TOLERANCE`` of the
recorded accuracies (a machine whose arithmetic differs slightly may
flip a few greedy answers; a wrong model flips many). Any failure is an error that says how to
rebuild. Otherwise (another world, other SFT settings, or ``--rebuild``) it says
what differs and runs the SFT (:func:`vopd.toy.sft.run_sft`) from scratch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from vopd.checkpoint import atomic_dir
from vopd.io import atomic_path, write_json

SHIPPED = Path(__file__).resolve().parent / "shipped"
ROLES = ("teacher", "student")
# what save_pretrained writes for a model + tokenizer (the first five always); anything else
# (a pickle) is never shipped
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",  # older transformers
)
REQUIRED_FILES = MODEL_FILES[:5]
WORLD_TABLES = (
    "prompts/train.parquet",
    "prompts/val.parquet",
    "benchmarks/toy_test.parquet",
    "benchmarks/toy_hard.parquet",
    "benchmarks/toy_mcq.parquet",
)
CHECK_PROBLEMS = 64  # per benchmark and model: 6 greedy batches, a few seconds on one core
CHECK_TOLERANCE = 0.05  # 3 of 64 answers


# ---------------------------------------------------------------------------------------------
# What determines the models.


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def world_fingerprint(world_dir: str | Path) -> dict:
    """The world's settings and a sha256 of its content: every split's ids, prompts and answers
    (read as values, not Parquet bytes, which depend on the pyarrow version) and the vocabulary."""
    import pandas as pd

    from vopd.toy.world import load_world_spec

    world_dir = Path(world_dir)
    spec = asdict(load_world_spec(world_dir))
    h = hashlib.sha256()
    for rel in WORLD_TABLES:
        path = world_dir / rel
        if not path.is_file():
            raise ValueError(f"{path} does not exist: run `python -m vopd.toy world` first")
        df = pd.read_parquet(path, columns=["id", "prompt", "answer"])
        h.update(json.dumps([rel, df.to_numpy().tolist()]).encode())
    vocab = json.loads((world_dir / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    h.update(json.dumps(sorted(vocab.items())).encode())
    return {"spec": json.loads(json.dumps(spec)), "data_sha256": h.hexdigest()}


def build_fingerprint() -> dict:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def models_key(world: dict, sft: dict) -> str:
    """The sha256 of the world, the SFT settings and ``SFT_VERSION`` (not the build: see above)."""
    from vopd.toy.sft import SFT_VERSION

    blob = json.dumps({"world": world, "sft": sft, "version": SFT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def read_manifest(root: Path = SHIPPED) -> dict | None:
    path = root / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def differences(manifest: dict, world: dict, sft: dict) -> list[str]:
    """What differs between the shipped models' origin and a request, one phrase per part."""
    out = []
    for part, mine in (("world", world), ("sft", sft)):
        theirs = manifest[part]
        if part == "world":  # the settings one by one, the content as one digest
            theirs = {**theirs["spec"], "data": theirs["data_sha256"]}
            mine = {**mine["spec"], "data": mine["data_sha256"]}
        keys = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
        if keys:
            diff = ", ".join(f"{k} {mine.get(k)!r} (shipped {theirs.get(k)!r})" for k in keys)
            out.append(f"{part}: {diff}")
    return out


# ---------------------------------------------------------------------------------------------
# The greedy check.


def check_accuracy(models_dir: Path, world_dir: Path, problems: int = CHECK_PROBLEMS) -> dict:
    """Greedy accuracy of each role on the first ``problems`` of each benchmark; models loaded
    from safetensors only."""
    import pandas as pd
    from transformers import AutoModelForCausalLM

    from vopd.models import load_tokenizer
    from vopd.toy.sft import BENCHMARKS, greedy_accuracy

    out = {}
    for role in ROLES:
        path = models_dir / role
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
        tokenizer = load_tokenizer(str(path))
        for name in BENCHMARKS:
            df = pd.read_parquet(world_dir / "benchmarks" / f"{name}.parquet").head(problems)
            out[f"{role}/{name}"] = greedy_accuracy(
                model, tokenizer, list(df.prompt), list(df.answer)
            )
    return out


# ---------------------------------------------------------------------------------------------
# Install (the workflow's path) and ship (the maintainers').


def install(world_dir: str | Path, out: str | Path, manifest: dict, root: Path = SHIPPED) -> dict:
    """Verify and copy the shipped models and ``sft_summary.json`` into ``out`` byte for byte,
    re-check their greedy accuracy, write ``out/install.json`` (where they came from); return the
    summary with that record under ``source``. Raises ValueError on any mismatch."""
    world_dir, out = Path(world_dir), Path(out)
    t0 = time.perf_counter()
    rebuild = "rebuild them here with toy.rebuild: true (python -m vopd.toy models --rebuild)"
    for role in ROLES:
        names = [rel.split("/", 1)[1] for rel in manifest["files"] if rel.startswith(f"{role}/")]
        if set(REQUIRED_FILES) - set(names):
            raise ValueError(f"the manifest lists no {sorted(set(REQUIRED_FILES) - set(names))}")
        with atomic_dir(out / role) as tmp:
            for name in names:
                rel = f"{role}/{name}"
                src, want = root / rel, manifest["files"][rel]
                if not src.is_file():
                    raise ValueError(f"shipped file {src} is missing: {rebuild}")
                shutil.copyfile(src, tmp / name)
                got = sha256_file(tmp / name)  # the copy is what the workflow will load
                if got != want["sha256"]:
                    raise ValueError(
                        f"shipped file {src}: sha256 {got[:16]}... is not the manifest's "
                        f"{want['sha256'][:16]}...: the file is damaged; restore it from git or "
                        f"{rebuild}"
                    )
    measured = check_accuracy(out, world_dir, manifest["check"]["problems"])
    off = {
        k: (v, manifest["check"]["accuracy"][k])
        for k, v in measured.items()
        if abs(v - manifest["check"]["accuracy"][k]) > CHECK_TOLERANCE
    }
    if off:
        listed = ", ".join(f"{k} {v:.3f} (shipped {w:.3f})" for k, (v, w) in off.items())
        raise ValueError(
            f"the shipped models fail their greedy check on the first "
            f"{manifest['check']['problems']} problems: {listed}; {rebuild}"
        )
    source = {
        "shipped": str(root),
        "key": manifest["key"],
        "check": {"problems": manifest["check"]["problems"], "accuracy": measured},
        "install_s": time.perf_counter() - t0,
    }
    write_json(out / "install.json", source)
    src, want = root / "sft_summary.json", manifest["files"].get("sft_summary.json")
    if want is None or sha256_file(src) != want["sha256"]:
        raise ValueError(f"shipped file {src}: not the manifest's sha256, damaged; {rebuild}")
    with atomic_path(out / "sft_summary.json") as tmp:  # last: the workflow's output
        shutil.copyfile(src, tmp)
    return {**json.loads(src.read_text()), "source": source}


def ship(world_dir: str | Path, models_dir: str | Path, root: Path = SHIPPED) -> dict:
    """Copy an SFT's ``teacher/``, ``student/`` and ``sft_summary.json`` into ``root`` and write
    its manifest (key from the world and the summary's recorded settings); return the manifest."""
    world_dir, models_dir = Path(world_dir), Path(models_dir)
    summary = json.loads((models_dir / "sft_summary.json").read_text())
    world, sft, build = world_fingerprint(world_dir), summary["settings"], build_fingerprint()
    shipped = {}
    for role in ROLES:
        # hidden files are not the model's (Snakemake's .snakemake_timestamp of a directory())
        names = sorted(p.name for p in (models_dir / role).iterdir() if not p.name.startswith("."))
        extra = [n for n in names if n not in MODEL_FILES]
        missing = [n for n in REQUIRED_FILES if n not in names]
        if extra or missing:
            raise ValueError(
                f"{models_dir / role}: unexpected files {extra}, missing {missing}; not shipped"
            )
        shipped[role] = names
    files = {}
    with atomic_dir(root) as tmp:
        for role in ROLES:
            (tmp / role).mkdir()
            for name in shipped[role]:
                shutil.copyfile(models_dir / role / name, tmp / role / name)
                files[f"{role}/{name}"] = {
                    "sha256": sha256_file(tmp / role / name),
                    "bytes": (tmp / role / name).stat().st_size,
                }
        shutil.copyfile(models_dir / "sft_summary.json", tmp / "sft_summary.json")
        files["sft_summary.json"] = {
            "sha256": sha256_file(tmp / "sft_summary.json"),
            "bytes": (tmp / "sft_summary.json").stat().st_size,
        }
        manifest = {
            "key": models_key(world, sft),
            "world": world,
            "sft": sft,
            "build": build,
            "files": files,
            "greedy_accuracy": summary["greedy_accuracy"],
            "check": {
                "problems": CHECK_PROBLEMS,
                "accuracy": check_accuracy(tmp, world_dir, CHECK_PROBLEMS),
            },
            "made_with": "python -m vopd.toy ship (vopd/toy/ship.py)",
        }
        write_json(tmp / "manifest.json", manifest)
    return manifest


def models(
    world_dir: str | Path, out: str | Path, *, rebuild: bool = False, root: Path = SHIPPED, **sft
) -> dict:
    """The workflow's toy models: the shipped ones (in ``root``) when they fit the request, else
    SFT here. ``sft`` are :func:`vopd.toy.sft.run_sft`'s keyword arguments."""
    import torch

    from vopd.toy import sft as sft_module

    manifest = read_manifest(root)
    request = sft_module.sft_settings(threads=torch.get_num_threads(), **sft)
    world = world_fingerprint(world_dir)
    if rebuild:
        why = ["asked to rebuild (--rebuild / toy.rebuild: true)"]
    elif manifest is None:
        why = [f"no shipped models in {root}"]
    elif models_key(world, request) != manifest["key"]:
        why = differences(manifest, world, request) or ["the key differs"]
    else:
        summary = install(world_dir, out, manifest, root)
        print(f"toy models: shipped ({root}, key {manifest['key'][:12]}), hashes verified")
        return summary
    print("toy models: SFT from scratch: " + "; ".join(why))
    (Path(out) / "install.json").unlink(missing_ok=True)  # a former install's record
    return sft_module.run_sft(world_dir, out, **sft)
