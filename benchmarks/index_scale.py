"""Vector index: which ANN library, and vaepipe's index at 1M vectors.

Two parts, each measurement in its own child process (peak RSS from the kernel, clean state):

  --compare   faiss-cpu HNSW, usearch HNSW and hnswlib HNSW (M=16, efConstruction=100) on the
              same N synthetic vectors, one thread: build time, peak RSS, serialized size, and
              recall@10 against exact search with queries/s for each efSearch.
  (default)   ``pipeline.index`` itself (the library vaepipe chose) at 1M x 32: build time, peak
              RSS, size on disk, queries/s single-threaded and recall@10 against exact search
              for each ``--kinds`` (flat, hnsw, ivf), over a sweep of hnsw's ``ef_search`` and
              ivf's ``nprobe``, the defaults included. The build uses the threads the process may
              run on (``taskset -c 1``: one); queries one thread (``faiss.omp_set_num_threads(1)``).

Vectors are N(0, I) in 32 dimensions, the VAE's prior (the aggregate posterior of a well-fitted
model is close to it): the hardest case for a graph index, with no cluster structure to exploit.
Queries are 1,000 other draws; exact neighbours come from a brute-force scan.

    .venv/bin/python benchmarks/index_scale.py --compare      # libraries at 100k (~2 min)
    .venv/bin/python benchmarks/index_scale.py                # vaepipe's index at 1M (hnsw's build ~20 min)
    taskset -c 1 .venv/bin/python benchmarks/index_scale.py --kinds flat,ivf   # one core
    taskset -c 1 .venv/bin/python benchmarks/index_scale.py --graph 32:64,32:200 --n 200000  # build effort
    .venv/bin/python benchmarks/index_scale.py --quick        # smoke run at 20k
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DIM, QUERIES, K = 32, 1000, 10
EF_SEARCH = (32, 64, 96, 128, 160, 192, 256, 512)
NPROBE = (16, 32, 64, 128, 256, 512, 768, 1024)
TARGETS = {"recall_at_10": 0.95, "queries_per_s": 1000}


def data(n: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, DIM), dtype=np.float32),
            rng.standard_normal((QUERIES, DIM), dtype=np.float32))


def exact(base, queries):
    """Exact top-K by squared L2 (chunked brute force)."""
    import numpy as np

    norms = (base * base).sum(1)
    out = []
    for i in range(0, len(queries), 100):
        q = queries[i:i + 100]
        d = norms[None, :] - 2 * q @ base.T
        part = np.argpartition(d, K, axis=1)[:, :K]
        order = np.take_along_axis(d, part, 1).argsort(1)
        out.append(np.take_along_axis(part, order, 1))
    return np.concatenate(out)


def recall(found, truth) -> float:
    return float(sum(len(set(f[:K]) & set(t)) for f, t in zip(found, truth)) / truth.size)


def timed_queries(search, queries) -> tuple[list, float]:
    """One query at a time (a user's lookup), single-threaded: (results, queries per second)."""
    t0 = time.perf_counter()
    found = [search(q) for q in queries]
    return found, len(queries) / (time.perf_counter() - t0)


# --------------------------------------------------------------------------- children


def child_lib(lib: str, n: int) -> dict:
    import numpy as np

    base, queries = data(n)
    truth = exact(base, queries)
    t0 = time.perf_counter()
    if lib == "faiss":
        import faiss

        faiss.omp_set_num_threads(1)
        index = faiss.IndexHNSWFlat(DIM, 16)
        index.hnsw.efConstruction = 100
        index.add(base)
        size = len(faiss.serialize_index(index))

        def search_at(ef):
            index.hnsw.efSearch = ef
            return lambda q: index.search(q[None], K)[1][0]
    elif lib == "usearch":
        from usearch.index import Index

        index = Index(ndim=DIM, metric="l2sq", connectivity=16, expansion_add=100, dtype="f32")
        index.add(np.arange(n), base, threads=1)
        size = len(index.save())

        def search_at(ef):
            index.expansion_search = ef
            return lambda q: index.search(q, K, threads=1).keys
    elif lib == "hnswlib":
        import hnswlib

        index = hnswlib.Index(space="l2", dim=DIM)
        index.init_index(max_elements=n, M=16, ef_construction=100)
        index.set_num_threads(1)
        index.add_items(base, np.arange(n))
        with tempfile.NamedTemporaryFile() as f:
            index.save_index(f.name)
            size = Path(f.name).stat().st_size

        def search_at(ef):
            index.set_ef(max(ef, K))
            return lambda q: index.knn_query(q[None], K)[0][0]
    else:
        raise ValueError(lib)
    build_s = time.perf_counter() - t0
    sweep = []
    for ef in EF_SEARCH:
        found, qps = timed_queries(search_at(ef), queries)
        sweep.append({"ef_search": ef, "recall_at_10": round(recall(found, truth), 4), "queries_per_s": round(qps)})
    return {"library": lib, "n": n, "build_s": round(build_s, 2), "serialized_mb": round(common.mb(size), 1),
            "sweep": sweep}


def child_graph(config: str, n: int) -> dict:
    """Raw faiss HNSW at ``M:efConstruction`` (how the graph's build effort buys recall per query),
    one thread for the build and the queries, one query per call, the same data and sweep."""
    import faiss

    m, efc = map(int, config.split(":"))
    base, queries = data(n)
    truth = exact(base, queries)
    faiss.omp_set_num_threads(1)
    index = faiss.IndexHNSWFlat(DIM, m)
    index.hnsw.efConstruction = efc
    t0 = time.perf_counter()
    index.add(base)
    build_s = time.perf_counter() - t0
    sweep = []
    for ef in EF_SEARCH:
        index.hnsw.efSearch = ef
        found, qps = timed_queries(lambda q: index.search(q[None], K)[1][0], queries)
        sweep.append({"ef_search": ef, "recall_at_10": round(recall(found, truth), 4), "queries_per_s": round(qps)})
    return {"M": m, "ef_construction": efc, "n": n, "build_s": round(build_s, 2),
            "serialized_mb": round(common.mb(len(faiss.serialize_index(index))), 1), "sweep": sweep}


def child_vaepipe(kind: str, n: int) -> dict:
    """pipeline.index's own index (what ``vaepipe index`` builds), through its public API."""
    from pipeline.index import VectorIndex

    base, queries = data(n)
    truth = exact(base, queries)
    keys = [f"k{i}" for i in range(n)]
    import faiss

    threads = len(os.sched_getaffinity(0))  # the build uses every core it may run on
    t0 = time.perf_counter()
    index = VectorIndex.new(DIM, metric="l2", kind=kind, threads=threads)
    index.add(keys, base)
    build_s = time.perf_counter() - t0
    size = len(index.to_bytes())
    faiss.omp_set_num_threads(1)  # queries: one thread
    position = {k: i for i, k in enumerate(keys)}
    sweep = []
    param = {"hnsw": "ef_search", "ivf": "nprobe"}.get(kind)
    default = getattr(index, param) if param else None
    values = {"hnsw": EF_SEARCH, "ivf": [p for p in NPROBE if p <= (index.nlist or 0)]}.get(kind, [])
    for value in sorted({*values, default}) if param else [None]:
        if kind == "hnsw":
            index.faiss_index.hnsw.efSearch = value
        elif kind == "ivf":
            index.nprobe = value
        found, qps = timed_queries(lambda q: [position[h.key] for h in index.search(q[None], K)[0]], queries)
        sweep.append({param or "param": value, "recall_at_10": round(recall(found, truth), 4), "queries_per_s": round(qps)})
    at_default = next(s for s in sweep if s[param or "param"] == default)
    extra = {"nlist": index.nlist} if kind == "ivf" else {}
    return {"kind": kind, "n": n, "build_s": round(build_s, 2), "build_threads": threads, **extra,
            "serialized_mb": round(common.mb(size), 1), "default": {param: default} if param else {}, **at_default,
            "sweep": sweep}


def child_factory(spec: str, n: int) -> dict:
    """A raw faiss ``index_factory`` IVF index (e.g. IVF-PQ with exact re-ranking, ``IVF4096,PQ16x4fs,RFlat``),
    one thread, trained on a seeded sample of 64 rows per list; ``FACTORY_PARAMS`` is a sweep of
    ``nprobe:k_factor`` (k_factor 0: no re-ranking stage). Not a vaepipe kind: what one would measure."""
    import faiss
    import numpy as np

    faiss.omp_set_num_threads(1)
    base, queries = data(n)
    truth = exact(base, queries)
    nlist = int(spec.split(",")[0].removeprefix("IVF"))
    t0 = time.perf_counter()
    index = faiss.index_factory(DIM, spec)
    index.train(base[np.sort(np.random.default_rng(0).choice(n, min(n, 64 * nlist), replace=False))])
    index.add(base)
    build_s = time.perf_counter() - t0
    ivf = faiss.extract_index_ivf(index)
    sweep = []
    for p in os.environ["FACTORY_PARAMS"].split(","):
        nprobe, k_factor = map(int, p.split(":"))
        ivf.nprobe = nprobe
        if k_factor:
            index.k_factor = k_factor
        found, qps = timed_queries(lambda q: index.search(q[None], K)[1][0], queries)
        sweep.append({"nprobe": nprobe, "k_factor": k_factor, "recall_at_10": round(recall(found, truth), 4),
                      "queries_per_s": round(qps)})
    return {"kind": spec, "n": n, "build_s": round(build_s, 2), "build_threads": 1,
            "serialized_mb": round(common.mb(len(faiss.serialize_index(index))), 1), "sweep": sweep}


# --------------------------------------------------------------------------- parent


def sweep_table(rows: list[dict], keys: list[str], headers: list[str]) -> str:
    """One line per build: its ``keys`` columns, then its efSearch sweep as ef:recall/queries-per-s."""
    return common.table([[*(r[k] for k in keys),
                          " ".join(f"{s['ef_search']}:{s['recall_at_10']}/{s['queries_per_s']}" for s in r["sweep"])]
                         for r in rows], [*headers, "efSearch:recall@10/queries per s"])


def run(mode: str, name: str, n: int, env: dict[str, str] | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), mode, name, str(n)]
    r = common.run_child(cmd, env={"OMP_NUM_THREADS": "1", **(env or {})}, timeout=1800)
    if r["rc"] != 0:
        raise SystemExit(f"{name} failed:\n{r.get('stderr_tail', '')}")
    res = common.last_json(r["stdout"])
    res["peak_rss_mb"] = r["main_peak_mb"]  # the child process alone (psutil sampler)
    common.log(json.dumps(res))
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare", action="store_true", help="compare the ANN libraries instead")
    ap.add_argument("--n", type=int, default=None, help="vectors (default 100k with --compare, else 1M)")
    ap.add_argument("--libraries", default="faiss,usearch,hnswlib")
    ap.add_argument("--kinds", default="flat,hnsw,ivf", help="pipeline.index kinds to measure (default mode)")
    ap.add_argument("--factory", default=None, help="instead: a raw faiss IVF index_factory string, e.g. "
                    "IVF4096,PQ16x4fs,RFlat (IVF-PQ with exact re-ranking), swept over --params")
    ap.add_argument("--params", default="256:16,512:16,512:32,1024:32", help="--factory sweep: nprobe:k_factor,...")
    ap.add_argument("--graph", default=None, metavar="M:EFC,...",
                    help="instead: raw faiss HNSW builds at these M:efConstruction, e.g. 32:64,32:200")
    ap.add_argument("--quick", action="store_true", help="smoke run at 20k vectors")
    args = ap.parse_args(argv)
    n = 20_000 if args.quick else args.n or (100_000 if args.compare else 1_000_000)
    if args.graph:
        rows = [run("child-graph", c, n) for c in args.graph.split(",")]
        print(f"\nfaiss HNSW by build effort, N={n:,} x {DIM} N(0, I), one thread, one query per call")
        print(sweep_table(rows, ["M", "ef_construction", "build_s", "serialized_mb"],
                          ["M", "efConstruction", "build s", "size MB"]))
        out = common.RESULTS / (f"index_graph-{n // 1000}k" + ("-quick" if args.quick else "") + ".json")
    elif args.compare:
        rows = [run("child-lib", lib, n) for lib in args.libraries.split(",")]
        print(f"\nANN libraries, N={n:,} x {DIM} N(0, I), HNSW M=16 efConstruction=100, one thread")
        print(sweep_table(rows, ["library", "build_s", "peak_rss_mb", "serialized_mb"],
                          ["library", "build s", "peak RSS MB", "size MB"]))
        out = common.RESULTS / ("index_compare-quick.json" if args.quick else "index_compare.json")
    else:
        kinds = [args.factory] if args.factory else args.kinds.split(",")
        load = {"before": os.getloadavg()}
        rows = [run("child-factory", args.factory, n, {"FACTORY_PARAMS": args.params})] if args.factory else \
            [run("child-vaepipe", kind, n) for kind in kinds]
        load["after"] = os.getloadavg()
        print(f"\nvaepipe index, N={n:,} x {DIM} N(0, I), single-threaded queries, k={K}; load average {load}")
        print(common.table([[r["kind"], r["build_s"], r["build_threads"], r["peak_rss_mb"], r["serialized_mb"],
                             " ".join(f"{k}={v}" for k, v in s.items() if k not in ("recall_at_10", "queries_per_s")),
                             s["recall_at_10"], s["queries_per_s"]] for r in rows for s in r["sweep"]],
                           ["kind", "build s", "build threads", "peak RSS MB", "size MB", "setting", "recall@10",
                            "queries/s"]))
        for r in rows:
            hit = [s for s in r["sweep"] if s["recall_at_10"] >= TARGETS["recall_at_10"]
                   and s["queries_per_s"] >= TARGETS["queries_per_s"]]
            print(f"Target {r['kind']}: recall@10 >= {TARGETS['recall_at_10']} at >= {TARGETS['queries_per_s']} "
                  f"queries/s: {'MET at ' + str(hit[0]) if hit else 'MISS'}")
        name = "index_scale-" + "-".join(kinds).replace(",", "_") if kinds != ["flat", "hnsw", "ivf"] else "index_scale"
        name += f"-{n // 1000}k" if n != 1_000_000 and not args.quick else ""
        out = common.RESULTS / (name + ("-quick.json" if args.quick else ".json"))
        common.write_json(out, {"n": n, "dim": DIM, "queries": QUERIES, "k": K, "argv": sys.argv, "load_average": load,
                                "rows": rows})
        return
    common.write_json(out, {"n": n, "dim": DIM, "queries": QUERIES, "k": K, "argv": sys.argv, "rows": rows})


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("child-"):
        fn = {"child-lib": child_lib, "child-vaepipe": child_vaepipe, "child-factory": child_factory,
              "child-graph": child_graph}[sys.argv[1]]
        print(json.dumps(fn(sys.argv[2], int(sys.argv[3]))), flush=True)
    else:
        main()
