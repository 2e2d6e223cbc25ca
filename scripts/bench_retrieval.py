#!/usr/bin/env python
"""FAISS index choices for text → image retrieval: exact Flat vs IVF vs HNSW, plus end-to-end latency.

Data: N synthetic L2-normalised embeddings drawn from a two-level Gaussian mixture like real image
embeddings (``--groups`` topics; ``--centres`` centres around them with Zipf-distributed cluster sizes;
isotropic noise ``--noise``); queries are
**fresh samples from the same mixture** (not database vectors: a query is never its own answer).
Exact ``Flat`` inner-product search is the baseline and the ground truth. Every row is measured in
this run and given as a ratio to Flat: build time (train + add), memory (``faiss.serialize_index``
bytes), queries/s (all queries in one batched call, all threads) and recall@k vs exact.
Goal (BENCHMARKS.md): ≥ 5,000 queries/s at recall@10 ≥ 0.95 on 1M vectors, 2 CPU cores.

The row marked "absvl default" is the index ``absvl index build`` picks at this N (``choose_factory``),
built as it builds it (``fill_index`` over an ``.npy`` of the vectors) and with the recall@10 it
prints at build (its own vectors as queries) beside the one on fresh queries. Then ``--latency-queries``
queries are searched **one per call**, as ``absvl search`` does, on Flat and on that index, the two
alternating query by query: p50/p99 ms per query, recall@k beside them.

    python scripts/bench_retrieval.py                       # 100k × 256, < 10 min on 2 cores
    python scripts/bench_retrieval.py --n 1000000           # the goal run (HNSW build: several minutes)
    python scripts/bench_retrieval.py --n 20000 --e2e       # + end-to-end latency through Retriever
    python scripts/bench_retrieval.py --n 1000000 --queries 2000 --ivf-codes --hnsw-m   # Flat + the default only

``--e2e`` also times ``Retriever`` (text encoding + search, with and without top-down re-ranking of
K=10/50 candidates) with a tiny untrained model on an index of generated Shapes images. Re-ranking
is timed against the per-pair baseline (``per_pair_rerank``: a full two-pass forward per
(query, candidate) pair, as ``Retriever`` did before it shared each image's first pass), one query
at a time and for a batch of ``--e2e-batch`` queries through ``search_batch``. For one query
re-ranking its top 10 / 50, the time of each call is split as ``Retriever.last_timings`` records it:
the first pass (ξ text encoding + FAISS search) and the re-rank (candidate decoding, their bottom-up
pass, the top-down pass under the query and ITM); p50/p99 of each and their share of the total.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from absvl.retrieval import vectors as absvl_vectors
from absvl.retrieval.faiss_backend import choose_factory, ivf_nlist, new_faiss_index
from absvl.retrieval.vectors import fill_index, recall_with


def clustered_embeddings(
    n: int, centres: np.ndarray, weights: np.ndarray, noise: float, rng: np.random.Generator, chunk: int = 100_000
) -> np.ndarray:
    """``n`` L2-normalised samples of the mixture (generated in chunks to bound temporary memory)."""
    dim = centres.shape[1]
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        picks = rng.choice(len(centres), size=m, p=weights)
        x = centres[picks] + rng.standard_normal((m, dim), dtype=np.float32) * (noise / np.sqrt(dim))
        out[start : start + m] = _unit(x)
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """(database, queries): a two-level mixture — ``--groups`` topics, each with fine centres around it
    (spread ``--spread``), points = fine centre + noise — so neighbourhoods have structure at several
    scales, as real embeddings do, instead of isolated blobs in otherwise empty space."""
    rng = np.random.default_rng(args.seed)
    groups = _unit(rng.standard_normal((args.groups, args.dim), dtype=np.float32))
    spread = rng.standard_normal((args.centres, args.dim), dtype=np.float32) * (args.spread / np.sqrt(args.dim))
    centres = _unit(groups[rng.integers(0, args.groups, args.centres)] + spread)
    weights = 1.0 / np.arange(1, args.centres + 1) ** 0.5  # Zipf-like: some clusters much larger
    weights /= weights.sum()
    database = clustered_embeddings(args.n, centres, weights, args.noise, rng)
    queries = clustered_embeddings(args.queries, centres, weights, args.noise, rng)
    return database, queries


def index_bytes(index: faiss.Index) -> int:
    return int(faiss.serialize_index(index).nbytes)


def timed_search(index: faiss.Index, queries: np.ndarray, k: int, min_seconds: float = 1.0) -> tuple[np.ndarray, float]:
    """(ids, queries/s): the whole query batch in one call, repeated until ``min_seconds`` elapsed."""
    index.search(queries[: min(100, len(queries))], k)  # warm-up
    runs, start = 0, time.perf_counter()
    while True:
        _, ids = index.search(queries, k)
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return ids, runs * len(queries) / elapsed


def recall_at_k(ids: np.ndarray, truth: np.ndarray, k: int) -> float:
    hits = sum(len(set(a[:k].tolist()) & set(b[:k].tolist())) for a, b in zip(ids, truth))
    return hits / (k * len(truth))


def add_with_progress(index: faiss.Index, database: np.ndarray, label: str, chunk: int = 100_000) -> None:
    start = time.perf_counter()
    for i in range(0, len(database), chunk):
        index.add(database[i : i + chunk])
        done = min(i + chunk, len(database))
        if len(database) > chunk:
            rate = done / (time.perf_counter() - start)
            print(f"  {label}: added {done:,}/{len(database):,} ({rate:,.0f} vectors/s)", file=sys.stderr, flush=True)


def bench_ann(args: argparse.Namespace) -> list[dict]:
    print(
        f"generating {args.n:,} × {args.dim} clustered embeddings ({args.groups} topics, {args.centres} centres, "
        f"spread {args.spread}, noise {args.noise}) "
        f"and {args.queries:,} queries ...",
        file=sys.stderr,
        flush=True,
    )
    database, queries = make_data(args)
    rows = []

    start = time.perf_counter()
    flat = new_faiss_index(args.dim, "Flat")
    flat.add(database)
    build = time.perf_counter() - start
    truth, qps = timed_search(flat, queries, args.k)
    rows.append({"config": "Flat (exact)", "build_s": build, "bytes": index_bytes(flat), "qps": qps, "recall": 1.0})
    print(f"  Flat: {qps:,.0f} queries/s", file=sys.stderr, flush=True)

    for nlist in args.nlist or [ivf_nlist(args.n), 4 * ivf_nlist(args.n)]:
        if args.n < 39 * nlist:
            print(f"  skipping IVF{nlist}: {args.n:,} vectors are too few to train it", file=sys.stderr)
            continue
        for kind in args.ivf_codes:
            factory = f"IVF{nlist},{kind}"
            start = time.perf_counter()
            index = new_faiss_index(args.dim, factory)
            sample = database[np.random.default_rng(1).choice(args.n, min(args.n, 64 * nlist), replace=False)]
            index.train(sample)
            add_with_progress(index, database, factory)
            build = time.perf_counter() - start
            size = index_bytes(index)
            ivf = faiss.extract_index_ivf(index)
            for nprobe in args.nprobe:
                if nprobe > nlist:
                    continue
                ivf.nprobe = nprobe
                ids, qps = timed_search(index, queries, args.k)
                rows.append(
                    {
                        "config": f"{factory} nprobe={nprobe}",
                        "build_s": build,
                        "bytes": size,
                        "qps": qps,
                        "recall": recall_at_k(ids, truth, args.k),
                    }
                )
                print(
                    f"  {rows[-1]['config']}: {qps:,.0f} q/s, recall {rows[-1]['recall']:.3f}",
                    file=sys.stderr,
                    flush=True,
                )
            del index

    for m in args.hnsw_m:
        factory = f"HNSW{m}"
        start = time.perf_counter()
        index = new_faiss_index(args.dim, factory)
        index.hnsw.efConstruction = args.ef_construction
        add_with_progress(index, database, factory, chunk=max(10_000, args.n // 20))
        build = time.perf_counter() - start
        size = index_bytes(index)
        for ef in args.ef_search:
            index.hnsw.efSearch = ef
            ids, qps = timed_search(index, queries, args.k)
            rows.append(
                {
                    "config": f"{factory} efC={args.ef_construction} efSearch={ef}",
                    "build_s": build,
                    "bytes": size,
                    "qps": qps,
                    "recall": recall_at_k(ids, truth, args.k),
                }
            )
            print(
                f"  {rows[-1]['config']}: {qps:,.0f} q/s, recall {rows[-1]['recall']:.3f}", file=sys.stderr, flush=True
            )
        del index
    bench_default(args, database, queries, truth, flat, rows)
    return rows


def bench_default(
    args: argparse.Namespace, database: np.ndarray, queries: np.ndarray, truth: np.ndarray, flat, rows: list[dict]
) -> None:
    """The index ``absvl index build`` picks at this N, built as it builds it: a row of the table, then
    single-query p50/p99 against Flat (appended to ``rows`` as ``latency``)."""
    factory, params = choose_factory(args.n, args.dim)
    label = " ".join([factory, *(f"{k}={v}" for k, v in params.items())]) + " (absvl default)"
    default = None
    if args.train_per_list:  # fewer k-means training vectors than absvl's (a cheaper build, same structure)
        absvl_vectors.MAX_TRAIN_PER_CENTROID = args.train_per_list
        label += f" trained on {args.train_per_list}/list"
    if factory != "Flat":
        with tempfile.TemporaryDirectory() as tmp:
            vectors = Path(tmp) / "embeddings.npy"
            np.save(vectors, database)
            print(f"  {label}: building as `absvl index build` does ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            default, factory, params = fill_index(None, args.dim, [vectors], [])
            build = time.perf_counter() - start
            build_recall = recall_with(default, params, vectors)  # what `absvl index build` prints
        ids, qps = timed_search(default, queries, args.k)
        rows.append(
            {
                "config": label,
                "build_s": build,
                "bytes": index_bytes(default),
                "qps": qps,
                "recall": recall_at_k(ids, truth, args.k),
                "build_recall": build_recall,
            }
        )
        print(
            f"  {label}: {qps:,.0f} q/s, recall {rows[-1]['recall']:.3f} "
            f"(at build, on its own vectors: {build_recall:.4f})",
            file=sys.stderr,
            flush=True,
        )
    if args.latency_queries < 1:
        return
    calls = [queries[i : i + 1] for i in range(min(args.latency_queries, len(queries)))]
    indexes = [("Flat (exact)", flat)] + ([(label, default)] if default is not None else [])
    timings = interleaved_latencies([lambda q, index=index: index.search(q, args.k) for _, index in indexes], calls)
    recalls = [1.0] + ([rows[-1]["recall"]] if default is not None else [])
    rows.append(
        {
            "latency": [
                {"config": name, "p50_ms": t[0], "p95_ms": t[1], "p99_ms": t[2], "recall": r}
                for (name, _), t, r in zip(indexes, timings, recalls)
            ],
            "calls": len(calls),
        }
    )


def print_latency(latency: dict, args: argparse.Namespace) -> None:
    """The single-query table: p50/p99 per call and recall@k, ratio to Flat."""
    print(
        f"\none query per call (as `absvl search`), {latency['calls']:,} queries, k={args.k}, "
        f"Flat and the default alternating query by query"
    )
    width = max(34, *(len(r["config"]) for r in latency["latency"]))
    header = f"{'index':{width}s} {'p50 ms':>8s} {'p99 ms':>8s} {'× Flat p50':>10s} {'recall@' + str(args.k):>10s}"
    print(header)
    print("-" * len(header))
    base = latency["latency"][0]["p50_ms"]
    for r in latency["latency"]:
        print(
            f"{r['config']:{width}s} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {base / r['p50_ms']:10.1f} {r['recall']:10.3f}"
        )


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    latency = [r for r in rows if "latency" in r]
    rows = [r for r in rows if "latency" not in r]
    base = rows[0]
    print(
        f"\n{args.n:,} vectors × {args.dim}, {args.queries:,} queries, k={args.k}, "
        f"{faiss.omp_get_max_threads()} threads, faiss {faiss.__version__}, {platform.processor() or platform.machine()}"
    )
    width = max(34, *(len(r["config"]) for r in rows))
    header = (
        f"{'configuration':{width}s} {'build s':>8s} {'×':>6s} {'MB':>8s} {'×':>5s} {'queries/s':>10s} {'×':>7s} "
        f"{'recall@' + str(args.k):>10s}  goal"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        ok = r["qps"] >= args.goal_qps and r["recall"] >= args.goal_recall
        print(
            f"{r['config']:{width}s} {r['build_s']:8.1f} {r['build_s'] / base['build_s']:6.1f} {r['bytes'] / 2**20:8.1f} "
            f"{r['bytes'] / base['bytes']:5.2f} {r['qps']:10,.0f} {r['qps'] / base['qps']:7.1f} {r['recall']:10.3f}  "
            f"{'yes' if ok else ''}"
        )
    meeting = [r for r in rows if r["qps"] >= args.goal_qps and r["recall"] >= args.goal_recall]
    goal = f"≥ {args.goal_qps:,} queries/s at recall@{args.k} ≥ {args.goal_recall}"
    if meeting:
        best = max(meeting, key=lambda r: r["qps"])
        print(
            f"\ngoal {goal}: met by {len(meeting)} configuration(s); fastest: {best['config']} "
            f"({best['qps']:,.0f} q/s, recall {best['recall']:.3f}, {best['bytes'] / 2**20:.0f} MB, build {best['build_s']:.0f} s)"
        )
    else:
        best = max(rows[1:] or rows, key=lambda r: (r["recall"] >= args.goal_recall, r["qps"]))
        print(
            f"\ngoal {goal}: not met at N={args.n:,}; closest: {best['config']} ({best['qps']:,.0f} q/s, recall {best['recall']:.3f})"
        )
    if args.n != 1_000_000:
        print("(the goal is stated for N = 1,000,000: run with --n 1000000 for the verdict)")
    for r in rows:
        if "build_recall" in r:
            print(
                f"{r['config']}: recall@{args.k} printed at build (its own vectors as queries) {r['build_recall']:.4f}"
            )
    for table in latency:
        print_latency(table, args)


def per_pair_rerank(retriever, queries: list[str], depth: int, batch_size: int = 32) -> list[list[int]]:
    """Baseline re-ranking: ξ search, then a full two-pass forward (first pass included, the text
    encoded again) for every (query, candidate) pair; the ids of each query, best first."""
    import torch

    model, ranked = retriever.model, []
    with torch.no_grad():
        for query, hits in zip(queries, retriever.search_batch(queries, k=depth)):
            text = model.prepare_inputs(text=[query])
            images = model.prepare_inputs(images=[h.path for h in hits])["images"]
            scores = []
            for i in range(0, len(hits), batch_size):
                chunk = images[i : i + batch_size]
                ids, mask = (text[key].expand(len(chunk), -1) for key in ("input_ids", "attention_mask"))
                scores += model.rerank_score(chunk, ids, mask).tolist()
            ranked.append([h.id for _, h in sorted(zip(scores, hits), key=lambda x: (-x[0], -x[1].score))])
    return ranked


def percentile(times: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``times``, nearest rank below."""
    return sorted(times)[int(q * (len(times) - 1))]


def interleaved_latencies(runs: list, calls: list) -> list[tuple[float, float, float, float]]:
    """(median ms, p95 ms, p99 ms, calls/s) of each ``run(call)`` over ``calls``, after one warm-up call
    each; the runs alternate call by call, so that a change in the machine's load hits them alike."""
    latencies: list[list[float]] = [[] for _ in runs]
    for run in runs:
        run(calls[0])
    for call in calls:
        for run, times in zip(runs, latencies):
            start = time.perf_counter()
            run(call)
            times.append(1000 * (time.perf_counter() - start))
    return [
        (statistics.median(t), percentile(t, 0.95), percentile(t, 0.99), 1000 / statistics.mean(t)) for t in latencies
    ]


def phase_shares(recorded: list[dict[str, float]]) -> dict[str, float]:
    """p50/p99 ms of each phase of ``Retriever.last_timings`` and its share of the summed time."""
    total = sum(t["search"] + t["rerank"] for t in recorded)
    out = {}
    for phase in ("search", "rerank"):
        times = [1000 * t[phase] for t in recorded]
        out |= {
            f"{phase}_p50_ms": statistics.median(times),
            f"{phase}_p99_ms": percentile(times, 0.99),
            f"{phase}_share": sum(times) / 1000 / total,
        }
    return out


def bench_e2e(args: argparse.Namespace) -> dict:
    """Median / p95 / p99 latency of ``Retriever.search`` (one query at a time) on a Shapes index, of
    re-ranking against the per-pair baseline, and the first pass / re-rank split of one query's call."""
    import torch

    from absvl.data.shapes import ensure_shapes
    from absvl.models.vl import AbsVLConfig, AbsVLForRetrieval
    from absvl.retrieval import Retriever, build_index

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        world = ensure_shapes(
            Path(tmp) / "world", num_images=args.e2e_images, seed=0, image_size=64, questions_per_image=1
        )
        torch.manual_seed(0)
        config = AbsVLConfig(
            backbone="absvit_test_patch8",
            backbone_kwargs={"img_size": 64},
            text_encoder=str(world.text_encoder_dir),
            fusion_hidden_size=64,
            fusion_layers=2,
            fusion_heads=2,
            max_text_len=24,
        )
        model = AbsVLForRetrieval(config).eval()
        report = build_index(model, world.root / "images", Path(tmp) / "index", batch_size=64, progress=False)
        captions = [s["raw"] for im in json.loads(world.karpathy_path.read_text())["images"] for s in im["sentences"]]
        queries = captions[: args.e2e_queries]
        retriever = Retriever(model, report.out)
        print(
            f"\nend to end: {report.num_indexed} Shapes images (64 px), tiny untrained absvit_test_patch8 model, "
            f"index {report.factory} built in {report.seconds:.1f} s ({report.images_per_second:.0f} images/s); "
            f"{len(queries)} caption queries, one at a time, k=10"
        )
        print(
            f"{'mode':34s} {'median ms':>10s} {'p95 ms':>8s} {'p99 ms':>8s} {'queries/s':>10s} {'× baseline':>10s}",
            flush=True,
        )
        batches = [queries[i : i + args.e2e_batch] for i in range(0, len(queries), args.e2e_batch)]
        n = args.e2e_batch
        phases: dict[int, list[dict[str, float]]] = {10: [], 50: []}  # last_timings of each one-query re-rank

        def reranked(query: str, depth: int) -> None:
            retriever.search(query, k=10, rerank=depth)
            phases[depth].append(dict(retriever.last_timings))

        groups = [(queries, 0, [("ξ search only", lambda q: retriever.search(q, k=10))])]
        for r in (10, 50):  # (calls, re-ranking depth, [(label, run)]): the baseline first, then ours
            groups.append(
                (
                    queries,
                    r,
                    [
                        (f"rerank={r} per pair (baseline)", lambda q, r=r: per_pair_rerank(retriever, [q], r)),
                        (f"rerank={r}", lambda q, r=r: reranked(q, r)),
                    ],
                )
            )
            groups.append(
                (
                    batches,
                    r,
                    [
                        (f"rerank={r} per pair, {n} queries", lambda b, r=r: per_pair_rerank(retriever, b, r)),
                        (
                            f"rerank={r} search_batch, {n} queries",
                            lambda b, r=r: retriever.search_batch(b, k=10, rerank=r),
                        ),
                    ],
                )
            )
        for calls, depth, group in groups:
            timings = interleaved_latencies([run for _, run in group], calls)
            per_call = len(calls[0]) if calls is batches else 1
            for i, ((label, _), (median, p95, p99, rate)) in enumerate(zip(group, timings)):
                ratio = f"{timings[0][0] / median:.2f}" if i else ""
                print(
                    f"{label:34s} {median:10.2f} {p95:8.2f} {p99:8.2f} {rate * per_call:10.1f} {ratio:>10s}",
                    flush=True,
                )
                results[label] = {"median_ms": median, "p95_ms": p95, "p99_ms": p99}
            if calls is batches:
                unique = len({h.id for hits in retriever.search_batch(batches[0], k=depth) for h in hits})
                print(f"  ({unique} distinct images among the {depth * len(batches[0])} candidates of the first batch)")
        start = time.perf_counter()
        retriever.search_batch(queries, k=10)
        batched = len(queries) / (time.perf_counter() - start)
        print(f"{'search_batch (no rerank)':34s} {'':10s} {'':8s} {'':8s} {batched:10.1f}")
        results["search_batch_qps"] = batched
        print(
            "\none query re-ranked, each call split by Retriever.last_timings: first pass = ξ text encoding + "
            "FAISS search; re-rank = candidate decoding + bottom-up + top-down pass + ITM"
        )
        print(
            f"{'re-rank depth':14s} {'first pass p50/p99 ms':>22s} {'re-rank p50/p99 ms':>19s} {'first pass share':>17s}"
        )
        for depth, recorded in phases.items():
            split = phase_shares(recorded[1:])  # the first call was the warm-up
            first = f"{split['search_p50_ms']:.2f} / {split['search_p99_ms']:.2f}"
            second = f"{split['rerank_p50_ms']:.2f} / {split['rerank_p99_ms']:.2f}"
            print(f"{'top ' + str(depth):14s} {first:>22s} {second:>19s} {split['search_share']:16.1%}")
            results[f"rerank={depth} phases"] = split
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="database vectors (default 100,000; goal run 1,000,000)")
    p.add_argument("--dim", type=int, default=256, help="embedding width, 256..768 (default 256)")
    p.add_argument("--queries", type=int, default=10_000, help="queries (default 10,000)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--centres", type=int, default=4096, help="mixture centres (default 4096)")
    p.add_argument("--groups", type=int, default=64, help="coarse topics the centres gather around (default 64)")
    p.add_argument("--spread", type=float, default=1.0, help="spread of the centres around their topic (default 1.0)")
    p.add_argument("--noise", type=float, default=0.7, help="noise norm relative to a unit centre (default 0.7)")
    p.add_argument("--nlist", type=int, nargs="*", help="IVF list counts (default: 4√N and 16√N as powers of 2)")
    p.add_argument("--nprobe", type=int, nargs="*", default=[8, 16, 32, 64, 128])
    p.add_argument("--ivf-codes", nargs="*", default=["Flat", "SQ8"], help="IVF storage: Flat, SQ8, PQ32, ...")
    p.add_argument("--hnsw-m", type=int, nargs="*", default=[32], help="HNSW graph degrees (default 32; none: skip)")
    p.add_argument("--ef-construction", type=int, default=40)
    p.add_argument("--ef-search", type=int, nargs="*", default=[16, 32, 64, 128, 256])
    p.add_argument("--threads", type=int, help="FAISS threads (default: all cores)")
    p.add_argument(
        "--latency-queries",
        type=int,
        default=500,
        help="queries searched one per call on Flat and the default index for p50/p99 (default 500; 0: skip)",
    )
    p.add_argument(
        "--train-per-list",
        type=int,
        help="train the default IVF on this many vectors per list (default: absvl's own, 256; FAISS needs ≥ 39)",
    )
    p.add_argument("--goal-qps", type=int, default=5_000)
    p.add_argument("--goal-recall", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--e2e", action="store_true", help="also time Retriever end to end on Shapes images")
    p.add_argument("--e2e-only", action="store_true", help="only the end-to-end timing")
    p.add_argument("--e2e-images", type=int, default=500)
    p.add_argument("--e2e-queries", type=int, default=50)
    p.add_argument("--e2e-batch", type=int, default=8, help="queries per search_batch call in the re-ranking rows")
    p.add_argument("--json", help="write all figures here")
    args = p.parse_args(argv)
    if not 1 <= args.dim <= 4096 or args.n < 1 or args.queries < 1:
        p.error("--dim, --n and --queries must be positive")
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    summary: dict = {"args": vars(args), "threads": faiss.omp_get_max_threads(), "cpu_count": os.cpu_count()}
    if not args.e2e_only:
        summary["ann"] = bench_ann(args)
        print_table(summary["ann"], args)
    if args.e2e or args.e2e_only:
        summary["e2e"] = bench_e2e(args)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
