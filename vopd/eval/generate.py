"""Sample n completions per benchmark problem with a rollout backend -> samples.parquet.

    python -m vopd.eval.generate --model RUN/checkpoints/step20 --benchmark math500 \\
        --out RUN/eval/math500/step20/samples.parquet --backend vllm
    python -m vopd.eval.generate --model resources/toy/models/student --benchmark toy_test \\
        --out /tmp/toy/samples.parquet --n 4 --max-new-tokens 64
    python -m vopd.eval.generate --model M --benchmark math500 gpqa_diamond \\
        --out A/samples.parquet B/samples.parquet --set gpqa_diamond.n=16   # one model load

Official settings (docs/method.md §2, docs/method.md §2 "Generation"): n = 8, T = 0.6, no chat
template (the benchmark's ``prompt`` column is the model input); math top_p 1.0, top_k off,
4096 new tokens; MCQ top_p 0.95, top_k 20, 4096 new tokens. Each flag overrides its default;
``--set NAME.KEY=VALUE`` overrides it for one of several benchmarks sampled in one call (the model
loads once). The official code sets no sampling seed; ``--seed`` (default 0) makes runs
reproducible here. ``--temperature 0`` is greedy decoding.

Backends come from :func:`vopd.rollout.get_backend`: ``hf`` (transformers, CPU or GPU) and
``vllm`` (GPU, or vLLM's CPU backend with its CPU defaults: float32, eager, a 1 GiB KV cache;
``--lora`` is passed through for vLLM's LoRA support, rank 64 in the paper). With
``hf`` a LoRA adapter is merged into the base model with PEFT. ``--model`` may also be a PEFT
adapter directory (``adapter_config.json`` only): its base model is read from it.

Output rows: ``problem_id, sample_idx, text, num_tokens, truncated, prompt``; ``num_tokens``
counts completion tokens including a final EOS. The settings, the environment and timings ride
in the Parquet metadata (key ``vopd``), which ``vopd.eval.grade`` copies into summary.json. Work
is done in chunks of problems saved under ``.{out}.parts/``: a killed run resumes where it
stopped (same settings and the same model: the resume fingerprint covers the content of the
model's and the adapter's files, not only their paths) and the final file is written atomically.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from vopd.io import check_writable

KIND_DEFAULTS = {  # official configs/eval/default.yaml + scripts/run_eval*.sh
    "math": {"top_p": 1.0, "top_k": -1, "max_new_tokens": 4096},
    "mcq": {"top_p": 0.95, "top_k": 20, "max_new_tokens": 4096},
}
DEFAULT_N, DEFAULT_TEMPERATURE = 8, 0.6

# ---------------------------------------------------------------------------------------------
# Settings


def sampling_for(kind: str, args) -> dict:
    """The sampling settings for a benchmark of ``kind``: official defaults, then the flags."""
    out = {"temperature": DEFAULT_TEMPERATURE, "n": DEFAULT_N, **KIND_DEFAULTS[kind]}
    for key in ("temperature", "n", "top_p", "top_k", "max_new_tokens"):
        if getattr(args, key) is not None:
            out[key] = getattr(args, key)
    out["seed"] = args.seed
    return out


def resolve_model(model: str, lora: str | None) -> tuple[str, str | None]:
    """(base model, adapter or None); an adapter directory given as --model is unfolded."""
    from vopd.lora import adapter_base, is_adapter_dir
    from vopd.models import resolve_model_path

    if is_adapter_dir(model) and not (Path(model) / "config.json").is_file():
        if lora:
            raise ValueError(f"--model {model} is a LoRA adapter and --lora {lora} is another")
        model, lora = adapter_base(model), model
    if lora and not is_adapter_dir(lora):
        raise ValueError(
            f"--lora {lora!r} is not a PEFT adapter directory (no adapter_config.json)"
        )
    return resolve_model_path(model), lora


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


_WHOLE_FILE_BYTES = 256 * 2**20  # files up to this size are hashed whole
_EDGE_BYTES = 2**20


def model_files_fingerprint(path: str | None) -> str | None:
    """A hash of the files of a local model or adapter directory (None for a hub id or None):
    every file's relative name and content, so other weights saved at the same path give
    another fingerprint. A file over 256 MiB is hashed by its size, mtime and first and last
    MiB (reading a 3 GB checkpoint whole on every resume would cost more than it guards)."""
    if path is None or not Path(path).is_dir():
        return None
    root = Path(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue  # e.g. partial downloads, our own hidden temporaries
        stat = f.stat()
        digest.update(f"{rel}\0{stat.st_size}\0".encode())
        with open(f, "rb") as fh:
            if stat.st_size <= _WHOLE_FILE_BYTES:
                for block in iter(lambda fh=fh: fh.read(2**20), b""):
                    digest.update(block)
            else:
                digest.update(f"{stat.st_mtime_ns}".encode() + fh.read(_EDGE_BYTES))
                fh.seek(-_EDGE_BYTES, 2)
                digest.update(fh.read(_EDGE_BYTES))
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Backends


def build_backend(args, base: str, lora: str | None):
    """(backend, the model's context length, its tokenizer); the last two only for ``hf``."""
    from vopd.rollout import get_backend

    extra = dict(args.backend_arg)
    if args.backend != "hf":
        engine = {"seed": args.seed, **({"dtype": args.dtype} if args.dtype else {}), **extra}
        return get_backend(args.backend, model=base, lora=lora, **engine), None, None
    import torch

    from vopd.lora import load_for_eval
    from vopd.models import load_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(lora if lora and _has_tokenizer(lora) else base)
    # an adapter is merged into its base with PEFT (W + (alpha/r) B A): plain-transformers speed
    dtype = args.dtype or "float32"
    model = load_for_eval(lora or base, base=base if lora else None, dtype=dtype, device=device)
    backend = get_backend(
        "hf", model=model, tokenizer=tokenizer, batch_size=args.batch_size, device=device, **extra
    )
    return backend, getattr(model.config, "max_position_embeddings", None), tokenizer


def _has_tokenizer(path: str) -> bool:
    return any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


# ---------------------------------------------------------------------------------------------
# Generation with resumable chunks


def generate(
    bench, backend, sampling: dict, *, parts: Path, fingerprint: str, chunk_size: int
) -> tuple[list[dict], float]:
    """Rows of samples.parquet for every problem of ``bench``; (rows, seconds spent sampling)."""
    import pandas as pd
    from tqdm import tqdm

    from vopd.io import write_json, write_parquet
    from vopd.rollout import SamplingParams

    if parts.is_dir():
        old = parts / "fingerprint.json"
        if not old.is_file() or json.loads(old.read_text()).get("fingerprint") != fingerprint:
            print(f"discarding partial results in {parts}: other settings", file=sys.stderr)
            shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    write_json(parts / "fingerprint.json", {"fingerprint": fingerprint})

    ids, prompts = list(bench["id"]), list(bench["prompt"])
    rows, spent = [], 0.0
    starts = list(range(0, len(ids), chunk_size))
    bar = tqdm(total=len(ids), desc="generating (problems)", unit="problem", file=sys.stderr)
    for k, start in enumerate(starts):
        part = parts / f"chunk{k:05d}.parquet"
        if part.is_file():  # done before a restart
            rows += pd.read_parquet(part).to_dict(orient="records")
            bar.update(min(chunk_size, len(ids) - start))
            continue
        seed = None if sampling["seed"] is None else (sampling["seed"] * 1_000_003 + k) % 2**31
        params = SamplingParams(
            temperature=sampling["temperature"],
            top_p=sampling["top_p"],
            top_k=sampling["top_k"],
            max_new_tokens=sampling["max_new_tokens"],
            n=sampling["n"],
            seed=seed,
        )
        t0 = time.perf_counter()
        out = backend.generate(prompts[start : start + chunk_size], params)
        spent += time.perf_counter() - t0
        seen: dict[int, int] = {}
        chunk = []
        for i, p in enumerate(out.prompt_index):
            j = seen[p] = seen.get(p, -1) + 1
            chunk.append(
                {
                    "problem_id": ids[start + p],
                    "sample_idx": j,
                    "text": out.texts[i],
                    "num_tokens": len(out.completion_ids[i]),
                    "truncated": bool(out.truncated[i]),
                    "prompt": prompts[start + p],
                }
            )
        write_parquet(part, pd.DataFrame(chunk))
        rows += chunk
        bar.update(min(chunk_size, len(ids) - start))
    bar.close()
    return rows, spent


def write_samples(rows: list[dict], out: Path, meta: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vopd.io import atomic_path

    schema = pa.schema(
        [
            ("problem_id", pa.string()),
            ("sample_idx", pa.int32()),
            ("text", pa.string()),
            ("num_tokens", pa.int32()),
            ("truncated", pa.bool_()),
            ("prompt", pa.string()),
        ],
        metadata={"vopd": json.dumps(meta, default=str)},
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)


# ---------------------------------------------------------------------------------------------
# CLI


PER_BENCHMARK = ("limit", "n", "temperature", "top_p", "top_k", "max_new_tokens", "seed")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m vopd.eval.generate", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--model", required=True, help="save_pretrained dir, adapter dir, or hub id")
    ap.add_argument(
        "--benchmark", required=True, nargs="+", help="benchmark names or .parquet paths"
    )
    ap.add_argument("--out", required=True, nargs="+", help="samples.parquet per benchmark")
    ap.add_argument("--n", type=int, help=f"samples per problem (default {DEFAULT_N})")
    ap.add_argument("--temperature", type=float, help=f"default {DEFAULT_TEMPERATURE}; 0 = greedy")
    ap.add_argument("--top-p", dest="top_p", type=float, help="default: math 1.0, MCQ 0.95")
    ap.add_argument("--top-k", dest="top_k", type=int, help="default: math -1 (off), MCQ 20")
    ap.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, help="default 4096")
    ap.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    ap.add_argument("--lora", help="PEFT LoRA adapter directory")
    ap.add_argument("--limit", type=int, help="only the first N problems")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME.KEY=VALUE",
        help=f"one benchmark's own setting (KEY in {', '.join(PER_BENCHMARK)}), "
        "e.g. toy_hard.limit=250; NAME is the benchmark's name or file stem",
    )
    ap.add_argument("--batch-size", type=int, default=64, help="hf: sequences per generate call")
    ap.add_argument("--device", help="hf: cpu / cuda (default: cuda if available)")
    ap.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="default: hf float32, vllm the model's own (auto; float32 on vLLM's CPU backend)",
    )
    ap.add_argument(
        "--chunk-size", type=int, help="problems per resumable chunk (default: hf 16, vllm all)"
    )
    ap.add_argument(
        "--backend-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=_key_value,
        help="extra keyword for get_backend (Python literal)",
    )
    ap.add_argument("--resources", default="resources", help="root of prepared benchmarks")
    args = ap.parse_args(argv)

    # Every benchmark and its settings are checked before the model loads; the model then
    # loads once for all of them (one vLLM engine start per checkpoint, not per benchmark).
    try:
        jobs = _plan(args)
        base, lora = resolve_model(args.model, args.lora)
        for job in jobs:  # an unwritable --out fails now, not after the sampling
            check_writable(job["out"].parent)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None

    t0 = time.perf_counter()
    backend, max_pos, tok = build_backend(args, base, lora)
    load_s = time.perf_counter() - t0
    for job in jobs:
        try:
            _run_one(args, job, backend, base, lora, max_pos, tok, load_s)
        except OSError as e:  # e.g. the disk filled up
            raise SystemExit(f"error: {job['name']}: {e}") from None


def _plan(args) -> list[dict]:
    """One {name, path, bench, kind, sampling, out} per benchmark, every setting validated."""
    from vopd.data import canonical_name, load_benchmark
    from vopd.rollout import SamplingParams

    if len(args.out) != len(args.benchmark):
        raise ValueError(
            f"--out has {len(args.out)} paths for {len(args.benchmark)} benchmarks: "
            "expected one samples.parquet per benchmark"
        )
    stems = [Path(b).stem for b in args.benchmark]
    names = [canonical_name(stem) or stem for stem in stems]
    if len(set(names)) != len(names):
        raise ValueError(f"benchmarks {names}: each may appear once")
    lookup = {**dict(zip(stems, names, strict=True)), **{n: n for n in names}}  # stem or name
    own: dict[str, dict] = {name: {} for name in names}
    for item in args.set:
        target, sep, value = item.partition("=")
        name, dot, key = target.rpartition(".")
        if not sep or not dot or name not in lookup or key not in PER_BENCHMARK:
            raise ValueError(
                f"--set {item!r}: expected NAME.KEY=VALUE with NAME one of {names} "
                f"and KEY one of {list(PER_BENCHMARK)}"
            )
        try:
            own[lookup[name]][key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"--set {item!r}: {value!r} is not a number") from None
    jobs = []
    for path, name, out in zip(args.benchmark, names, args.out, strict=True):
        job_args = argparse.Namespace(**{**vars(args), **own[name]})
        if job_args.limit is not None and job_args.limit < 1:
            raise ValueError(f"{name}: --limit {job_args.limit}: expected >= 1")
        bench = load_benchmark(path, args.resources)
        if job_args.limit:
            bench = bench.head(job_args.limit)
        kinds = sorted(set(bench["kind"]))
        if len(kinds) != 1:
            raise ValueError(f"benchmark {name} mixes kinds {kinds}: split it by kind")
        sampling = sampling_for(kinds[0], job_args)
        SamplingParams(**sampling)  # validates the settings before loading a model
        jobs.append(
            {"name": name, "path": path, "bench": bench, "kind": kinds[0], "sampling": sampling}
            | {"out": Path(out)}
        )
    return jobs


def _run_one(args, job: dict, backend, base, lora, max_pos, tok, load_s: float) -> None:
    """Sample one benchmark and write its samples.parquet (atomically, resumable by chunks)."""
    bench, sampling, out, name = job["bench"], job["sampling"], job["out"], job["name"]
    if max_pos is not None:  # hf: never ask for more tokens than the context holds
        longest = max(len(tok(p)["input_ids"]) for p in bench["prompt"])
        room = max_pos - longest
        if room < 1:
            raise SystemExit(
                f"error: {name}: a prompt of {longest} tokens fills the model's context "
                f"({max_pos} positions)"
            )
        if sampling["max_new_tokens"] > room:
            print(
                f"{name}: max_new_tokens {sampling['max_new_tokens']} -> {room}: the model has "
                f"{max_pos} positions and the longest prompt {longest} tokens",
                file=sys.stderr,
            )
            sampling["max_new_tokens"] = room

    chunk = args.chunk_size or (16 if args.backend == "hf" else len(bench))
    settings = {
        "model": args.model,
        "base": base,
        "lora": lora,
        "backend": args.backend,
        "benchmark": job["path"],
        "problems": _fingerprint(list(bench["prompt"])),
        "model_files": {
            "base": model_files_fingerprint(base),
            "lora": model_files_fingerprint(lora),
        },
        "sampling": sampling,
        "chunk_size": chunk,
        "dtype": args.dtype,
    }
    rows, spent = generate(
        bench,
        backend,
        sampling,
        parts=out.parent / f".{out.name}.parts",
        fingerprint=_fingerprint(settings),
        chunk_size=chunk,
    )
    tokens = sum(r["num_tokens"] for r in rows)
    from vopd.io import environment

    meta = {
        **settings,
        "benchmark_name": name,
        "kind": job["kind"],
        "num_problems": len(bench),
        "env": environment(),
        "timing": {
            "load_s": round(load_s, 3),
            "generate_s": round(spent, 3),
            "tokens": tokens,
            "tokens_per_s": round(tokens / max(spent, 1e-9), 1),
        },
    }
    write_samples(rows, out, meta)
    shutil.rmtree(out.parent / f".{out.name}.parts", ignore_errors=True)
    trunc = sum(r["truncated"] for r in rows) / len(rows)
    print(
        f"{'benchmark':12s} {'problems':>8s} {'n':>3s} {'tokens':>9s} {'tok/s':>8s} {'trunc':>6s}",
        file=sys.stderr,
    )
    print(
        f"{name:12s} {len(bench):8d} {sampling['n']:3d} {tokens:9d} "
        f"{meta['timing']['tokens_per_s']:8.1f} {trunc:6.3f}",
        file=sys.stderr,
    )
    print(
        json.dumps(
            {
                "benchmark": name,
                "model": args.model,
                "num_problems": len(bench),
                "n": sampling["n"],
                "samples": len(rows),
                "tokens": tokens,
                "generate_s": meta["timing"]["generate_s"],
                "tokens_per_s": meta["timing"]["tokens_per_s"],
                "truncation_rate": trunc,
                "out": str(out),
            }
        )
    )


def _key_value(item: str) -> tuple[str, object]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{item!r}: expected KEY=VALUE")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


if __name__ == "__main__":
    main()
