"""Data pipeline benchmark: preprocessing throughput and GPT dataset read throughput.

    python tools/bench_data.py                     # sample corpus, workers 1 and 2
    python tools/bench_data.py --workers 1 2 4 --repeats 5 --json bench.json

1. Makes sure the sample corpus exists (``tools/prepare_sample_corpus.py``, ``data/sample``) and a
   SentencePiece tokenizer (``data/tokenizer/sample_32k.model``, trained by ``tools/train_tokenizer.py``;
   8k vocabulary when the corpus cannot fill 32k).
2. Runs ``tools/preprocess_data.py`` (in-process, with ``--append-eod``) for each worker count, best of
   ``--repeats``: documents/s, MB/s, tokens/s, and for ``--workers 1`` the share of the wall time spent
   outside the tokenizer (reading, JSON, numpy conversion, writing).
   With ``--formats jsonl parquet`` the same documents are also written as Parquet (row groups of
   ``--row-group-size`` rows) and each worker count runs on both inputs, alternating, best of
   ``--repeats`` each; the outputs must be byte-identical and the Parquet/JSONL time ratio is printed.
3. Builds a ``GPTDataset`` over the result and reads random samples: index build time and samples/s.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import tempfile
import time

import numpy as np

from megatron_cola.cli import preprocess_data  # the benchmark runs its command line in-process
from megatron_cola.data import GPTDataset, MMapIndexedDataset
from megatron_cola.data.preprocess_input import (
    ColumnChunk,
    WorkUnit,
    expand_inputs,
    inspect_inputs,
    iter_chunks,
    parse_line,
)
from megatron_cola.data.sample_corpus import prepare as prepare_sample_corpus
from megatron_cola.data.tokenizer_training import train_tokenizer

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))  # the checkout


def ensure_tokenizer(corpus: str, model: str | None) -> str:
    if model:
        return model
    for name in ("sample_32k", "sample_8k"):
        path = os.path.join(REPO, "data", "tokenizer", f"{name}.model")
        if os.path.isfile(path):
            return path
    prefix = os.path.join(REPO, "data", "tokenizer", "sample_32k")
    try:
        print("training data/tokenizer/sample_32k.model ...", flush=True)
        return train_tokenizer([corpus], prefix, 32000)
    except RuntimeError as exc:
        print(f"32k vocabulary failed ({exc}); training an 8k one", flush=True)
        return train_tokenizer([corpus], os.path.join(REPO, "data", "tokenizer", "sample_8k"), 8000)


def preprocess_once(corpus: str, model: str, workers: int, prefix: str) -> dict:
    args = preprocess_data.build_parser().parse_args(
        [
            "--input", corpus, "--output-prefix", prefix,
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model,
            "--append-eod", "--workers", str(workers), "--quiet",
        ]
    )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):  # the tool's own summary line
        return preprocess_data.run(args)


def bench_preprocess(corpus: str, model: str, workers: int, repeats: int, out_dir: str) -> dict:
    best: dict | None = None
    for _ in range(repeats):
        summary = preprocess_once(corpus, model, workers, os.path.join(out_dir, f"bench_w{workers}"))
        if best is None or summary["seconds"] < best["seconds"]:
            best = summary
    assert best is not None
    return best


def jsonl_to_parquet(corpus: str, path: str, row_group_size: int) -> None:
    """The ``text`` of every line of ``corpus`` as a one-column Parquet file (streamed, one row group at a
    time)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("text", pa.string())])
    with open(corpus, encoding="utf-8") as f, pq.ParquetWriter(path, schema) as writer:
        rows: list[str] = []
        for line in f:
            if line.strip():
                rows.append(json.loads(line)["text"])
            if len(rows) == row_group_size:
                writer.write_table(pa.table({"text": rows}, schema=schema))
                rows = []
        if rows:
            writer.write_table(pa.table({"text": rows}, schema=schema))


def read_records(path: str) -> tuple[int, int]:
    """The engine's input side alone (files -> chunks -> texts; for JSONL the JSON parsing too), no
    tokenizer: ``(documents, characters)``."""
    files = expand_inputs([path])
    infos = {i.path: i for i in inspect_inputs(files, ["text"])}
    docs = chars = 0
    for chunk in iter_chunks([WorkUnit(f) for f in files], ["text"], None, infos):
        if isinstance(chunk, ColumnChunk):
            texts = [t for t in chunk.texts[0] if t is not None]
        else:
            texts = [t[0] for t, _ in (parse_line(raw, ["text"]) for _, raw in chunk[1]) if t is not None]
        docs += len(texts)
        chars += sum(map(len, texts))
    return docs, chars


def bench_formats(corpus: str, model: str, workers: int, repeats: int, out_dir: str, row_group: int) -> dict:
    """JSONL and Parquet inputs of the same documents, alternating: per format the best preprocessing run
    and the best reading-alone pass of ``repeats``."""
    parquet = os.path.join(out_dir, "corpus.parquet")
    if not os.path.isfile(parquet):
        jsonl_to_parquet(corpus, parquet, row_group)
    runs: dict[str, list[dict]] = {"jsonl": [], "parquet": []}
    reads: dict[str, list[float]] = {"jsonl": [], "parquet": []}
    chars: dict[str, int] = {}
    for _ in range(repeats):
        for fmt, path in (("jsonl", corpus), ("parquet", parquet)):
            runs[fmt].append(
                preprocess_once(path, model, workers, os.path.join(out_dir, f"fmt_{fmt}_w{workers}"))
            )
            t0 = time.perf_counter()
            _, chars[fmt] = read_records(path)
            reads[fmt].append(time.perf_counter() - t0)
    for ext in (".bin", ".idx"):
        blobs = {
            open(os.path.join(out_dir, f"fmt_{f}_w{workers}_text_document{ext}"), "rb").read() for f in runs
        }
        if len(blobs) != 1:
            raise SystemExit(f"Parquet and JSONL outputs differ ({ext})")
    if chars["jsonl"] != chars["parquet"]:
        raise SystemExit("Parquet and JSONL inputs hold different texts")
    out: dict = {}
    for fmt in runs:
        out[fmt] = {**min(runs[fmt], key=lambda s: s["seconds"]), "read_seconds": min(reads[fmt])}
        out[fmt]["read_chars"] = chars[fmt]
    out["parquet_over_jsonl_time"] = out["parquet"]["seconds"] / out["jsonl"]["seconds"]
    out["parquet_over_jsonl_read_time"] = out["parquet"]["read_seconds"] / out["jsonl"]["read_seconds"]
    out["parquet_bytes"] = os.path.getsize(parquet)
    return out


def bench_read(prefix: str, seq_length: int, num_samples: int, reads: int, cache_dir: str) -> dict:
    reader = MMapIndexedDataset(prefix)
    t0 = time.perf_counter()
    ds = GPTDataset(reader, range(len(reader)), seq_length, num_samples, seed=1234, cache_dir=cache_dir)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    GPTDataset(reader, range(len(reader)), seq_length, num_samples, seed=1234, cache_dir=cache_dir)
    load = time.perf_counter() - t0
    idx = np.random.default_rng(0).integers(0, len(ds), reads)
    t0 = time.perf_counter()
    total = 0
    for i in idx:
        total += ds[int(i)]["text"].size
    dt = time.perf_counter() - t0
    return {
        "seq_length": seq_length,
        "samples": len(ds),
        "index_build_s": build,
        "index_load_s": load,
        "random_samples_per_s": reads / dt,
        "tokens_per_s": total / dt,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Benchmark preprocessing and dataset reads.")
    p.add_argument("--corpus", default=os.path.join(REPO, "data", "sample", "train.jsonl"))
    p.add_argument("--tokenizer-model", default=None, help="default: data/tokenizer/sample_32k.model")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--num-samples", type=int, default=100_000, help="GPTDataset samples (several epochs)")
    p.add_argument("--reads", type=int, default=20_000, help="random samples to read")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument(
        "--formats",
        nargs="+",
        default=["jsonl"],
        choices=["jsonl", "parquet"],
        help="input formats to compare",
    )
    p.add_argument("--row-group-size", type=int, default=1000, help="rows per Parquet row group")
    args = p.parse_args(argv)

    if not os.path.isfile(args.corpus):
        default = os.path.join(REPO, "data", "sample", "train.jsonl")
        if os.path.abspath(args.corpus) != default:
            p.error(f"--corpus {args.corpus} not found")
        prepare_sample_corpus(os.path.dirname(default))
    model = ensure_tokenizer(args.corpus, args.tokenizer_model)

    results: dict = {"corpus": args.corpus, "tokenizer": model, "cpus": os.cpu_count(), "preprocess": {}}
    out_dir = tempfile.mkdtemp(prefix="bench-data-")
    try:
        for w in args.workers:
            s = bench_preprocess(args.corpus, model, w, args.repeats, out_dir)
            results["preprocess"][w] = s
            outside = s.get("outside_tokenization_fraction")
            extra = f", outside tokenization {100 * outside:.1f}%" if outside is not None else ""
            print(
                f"preprocess workers={w}: {s['docs_per_s']:,.0f} docs/s, {s['mb_per_s']:.2f} MB/s, "
                f"{s['tokens_per_s']:,.0f} tokens/s ({s['tokens']:,} tokens in {s['seconds']:.2f}s{extra})",
                flush=True,
            )
            if "parquet" in args.formats:
                f = bench_formats(args.corpus, model, w, args.repeats, out_dir, args.row_group_size)
                results.setdefault("formats", {})[w] = f
                for fmt in ("jsonl", "parquet"):
                    s = f[fmt]
                    print(
                        f"  input {fmt:7s} workers={w}: {s['seconds']:.3f}s, {s['docs_per_s']:,.0f} docs/s, "
                        f"{s['tokens_per_s']:,.0f} tokens/s (file {s['input_bytes'] / 1e6:.2f} MB); "
                        f"reading alone {s['read_seconds'] * 1e3:.1f} ms "
                        f"({s['read_chars'] / 1e6 / s['read_seconds']:.0f}M chars/s)",
                        flush=True,
                    )
                print(
                    f"  parquet/jsonl time ratio workers={w}: {f['parquet_over_jsonl_time']:.3f} "
                    f"(reading alone {f['parquet_over_jsonl_read_time']:.3f}; outputs byte-identical)",
                    flush=True,
                )
        prefix = os.path.join(out_dir, f"bench_w{args.workers[0]}_text_document")
        r = bench_read(prefix, args.seq_length, args.num_samples, args.reads, os.path.join(out_dir, "cache"))
        results["read"] = r
        print(
            f"GPTDataset seq_length={r['seq_length']}, {r['samples']:,} samples: "
            f"index build {r['index_build_s']:.3f}s (cached load {r['index_load_s']:.3f}s), "
            f"random reads {r['random_samples_per_s']:,.0f} samples/s "
            f"({r['tokens_per_s'] / 1e6:.1f}M tokens/s)"
        )
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    if args.json:
        tmp = f"{args.json}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, args.json)
    return 0
