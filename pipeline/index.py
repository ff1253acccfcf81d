"""A vector index of embed rows, keyed by the row ``key``: build, add nightly partitions, store, search.

The library is faiss-cpu (README, "Search", says why: measured against usearch and hnswlib).
An index lives in a folder at any fsspec URL::

    INDEX_URL/index.json                the sidecar, written last: model_id, calibration, metric, kind
                                        (with hnsw's or ivf's settings: nlist, nprobe, rows trained on),
                                        count, the partitions it contains, and the two files below
    INDEX_URL/vectors-<generation>.faiss  the faiss index (row i of the rows file is faiss id i)
    INDEX_URL/rows-<generation>.parquet   key, shard, index, label, anomaly_score of every vector

``whiten`` (``vaepipe index --whiten``): the vectors are whitened before they are indexed, by the
mean and covariance of the first build's rows (:class:`Whitening`, stored in the sidecar and
reused by every later add and every query), so that distances weigh the latent's directions
equally instead of by their spread (BENCHMARKS.md, "Retrieval", measures what it buys).

Each file is written atomically (:func:`vae_model.storage.atomic_write_bytes`) under a new
generation, and the sidecar that names them last, so a reader sees the old index or the new one,
never a mix; files older than the previous generation are then deleted.

Torch-free: querying by image goes through :mod:`pipeline.query`, which encodes with the model.
"""
from __future__ import annotations

import datetime as dt
import io
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.manifest import MANIFEST, SUCCESS
from pipeline.writer import read_metadata, read_parquet
from vae_model.errors import ConfigError
from vae_model.storage import StorageOptions, atomic_write_bytes, exists, fresh_fs, join, read_bytes

log = logging.getLogger(__name__)

SIDECAR = "index.json"
FORMAT = "vaepipe.index/1"
METRICS = ("cosine", "l2")  # cosine: distance 1 - cos; l2: Euclidean distance
# flat: exact scan; hnsw: graph; ivf: inverted lists (k-means cells) scanned exactly: approximate (BENCHMARKS.md,
# "Vector index")
KINDS = ("flat", "hnsw", "ivf")
# HNSW parameters, chosen with benchmarks/index_scale.py (recall@10 and queries/s at 1M x 32 N(0, I):
# BENCHMARKS.md, "Vector index"). efConstruction 200 builds a better graph than 64 (2.5x the build time) that
# reaches recall@10 0.95 at efSearch ~128 instead of ~256. Every index stores the efSearch it was built
# with in index.json (indexes of before: efConstruction 64, efSearch 256, read back as such);
# VectorIndex.ef_search sets it at query time (saved with the index when it is next written).
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 160
LEGACY_HNSW = {"M": 32, "ef_construction": 64, "ef_search": 256}  # sidecars without an "hnsw" entry
# IVF (faiss IndexIVFFlat): the number of lists is fixed at the first build from its row count N,
# nlist = min(IVF_LISTS_PER_SQRT_N * sqrt(N), IVF_MAX_LISTS, N // IVF_MIN_PER_LIST), at least 1: a small first
# build gets fewer lists (1 list below IVF_MIN_PER_LIST rows: an exact scan). The coarse quantizer is trained
# by k-means on a seeded sample of at most IVF_TRAIN_PER_LIST rows per list, and reused by every later add.
IVF_LISTS_PER_SQRT_N = 4
IVF_MAX_LISTS = 65536
IVF_MIN_PER_LIST = 39  # faiss's minimum training points per centroid
IVF_TRAIN_PER_LIST = 64
IVF_SEED = 0
IVF_NPROBE = 512  # lists scanned per query: recall@10 0.96 at 1M x 32 N(0, I) (BENCHMARKS.md); in index.json;
# VectorIndex.nprobe sets it at query time (saved with the index when it is next written)
WHITEN_EPS = 1e-6  # added to the covariance's eigenvalues, relative to their mean: a flat direction stays finite
ROW_FIELDS = pa.schema([("key", pa.string()), ("shard", pa.string()), ("index", pa.int64()), ("label", pa.int64()),
                        ("anomaly_score", pa.float64())])


class VectorIndexError(ConfigError):
    """An index that cannot take these rows, or cannot be read (one line, says what to do)."""


@dataclass(frozen=True)
class Hit:
    """One neighbour: the row's key, its distance to the query, and what the row says about it."""

    key: str
    distance: float
    label: int | None
    anomaly_score: float | None
    shard: str
    index: int

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "distance": self.distance, "label": self.label, "anomaly_score": self.anomaly_score}


def _faiss():
    import faiss  # imported on use: the CLI lists its commands without it

    return faiss


@dataclass
class Whitening:
    """x -> (x - mean) @ matrix, with matrix = Cov^-1/2 (symmetric: ZCA) of the rows it was fitted on."""

    mean: np.ndarray  # (D,)
    matrix: np.ndarray  # (D, D)
    fitted_on: int

    @classmethod
    def fit(cls, vectors: np.ndarray) -> "Whitening":
        x = np.asarray(vectors, dtype=np.float64)
        n, d = x.shape
        if n < 2 * d:
            raise VectorIndexError(f"--whiten fits on the first build's rows: {n} are too few for {d} dimensions "
                                   f"(need {2 * d}); build from more partitions first")
        mean = x.mean(0)
        vals, vecs = np.linalg.eigh(np.cov(x - mean, rowvar=False).reshape(d, d))
        vals = np.maximum(vals, 0.0) + WHITEN_EPS * max(float(vals.mean()), 1e-12)
        return cls(mean, (vecs / np.sqrt(vals)) @ vecs.T, n)

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        return ((np.asarray(vectors, dtype=np.float64) - self.mean) @ self.matrix).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "matrix": self.matrix.tolist(), "fitted_on": self.fitted_on}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Whitening":
        mean, matrix = np.asarray(d["mean"], dtype=np.float64), np.asarray(d["matrix"], dtype=np.float64)
        if mean.ndim != 1 or matrix.shape != (len(mean), len(mean)) or not np.isfinite(matrix).all():
            raise VectorIndexError("index.json: whiten is not a mean and a square matrix of its dimension; rebuild the index")
        return cls(mean, matrix, int(d.get("fitted_on", 0)))


class VectorIndex:
    """Vectors keyed by row key in a faiss index, with each row's shard, index, label and score."""

    def __init__(self, faiss_index: Any, metric: str, kind: str, rows: pa.Table, meta: dict[str, Any],
                 whiten: bool = False, whitening: Whitening | None = None) -> None:
        if metric not in METRICS:
            raise VectorIndexError(f"--metric {metric}: choose one of {', '.join(METRICS)}")
        if kind not in KINDS:
            raise VectorIndexError(f"--kind {kind}: choose one of {', '.join(KINDS)}")
        self.faiss_index, self.metric, self.kind, self.meta = faiss_index, metric, kind, meta
        self.whiten, self.whitening = bool(whiten or whitening is not None), whitening
        self._rows = rows
        self._cols = {name: rows.column(name).to_pylist() for name in rows.column_names}
        self._position = {k: i for i, k in enumerate(self._cols["key"])}

    @classmethod
    def new(cls, dim: int, metric: str = "cosine", kind: str = "hnsw", threads: int | None = None,
            meta: dict[str, Any] | None = None, whiten: bool = False) -> VectorIndex:
        faiss = _faiss()
        if threads:
            faiss.omp_set_num_threads(threads)
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, HNSW_M)  # L2 on unit vectors ranks like cosine
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            index.hnsw.efSearch = HNSW_EF_SEARCH
        elif kind == "ivf":
            index = _ivf(dim, 1)  # a placeholder: the first add sizes and trains the lists (_train_ivf)
        else:
            index = faiss.IndexFlatL2(dim)
        return cls(index, metric, kind, ROW_FIELDS.empty_table(), dict(meta or {}), whiten=whiten)

    # -- contents ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._position)

    def __contains__(self, key: str) -> bool:
        return key in self._position

    @property
    def dim(self) -> int:
        return self.faiss_index.d

    @property
    def ef_search(self) -> int | None:
        """Candidates an hnsw index keeps per query (None for the other kinds); more: higher recall, slower."""
        return self.faiss_index.hnsw.efSearch if self.kind == "hnsw" else None

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        self.faiss_index.hnsw.efSearch = self._effort("ef_search", "hnsw", value)

    def _effort(self, name: str, kind: str, value: int) -> int:
        """A query-time search setting of ``kind`` indexes, checked: at least 1, and on the right kind."""
        if self.kind != kind:
            raise VectorIndexError(f"{name} is a setting of {kind} indexes; this one is {self.kind}")
        if int(value) < 1:
            raise VectorIndexError(f"{name} {value}: must be at least 1")
        return int(value)

    @property
    def nlist(self) -> int | None:
        return self.faiss_index.nlist if self.kind == "ivf" else None

    @property
    def nprobe(self) -> int | None:
        """Lists an ivf index scans per query (None for the other kinds); more: higher recall, slower."""
        return self.faiss_index.nprobe if self.kind == "ivf" else None

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self.faiss_index.nprobe = self._effort("nprobe", "ivf", value)

    @property
    def trained(self) -> bool:
        return bool(self.faiss_index.is_trained) and (not self.whiten or self.whitening is not None)

    def train(self, vectors: np.ndarray) -> None:
        """Fit the whitening (``whiten``) and size and train an empty ivf index's lists on
        ``vectors`` (the first build's rows; the first :meth:`add` does it with its own rows
        otherwise); nothing to do for a flat or hnsw index without whitening."""
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        if self.whiten and self.whitening is None and len(vectors):
            self.whitening = Whitening.fit(vectors)
        if self.kind != "ivf" or self.faiss_index.is_trained:
            return
        prepared = self._prepare(vectors)
        if len(prepared):
            self.faiss_index = _train_ivf(prepared)
            self.meta["ivf"] = {"trained_on": len(prepared)}

    def add(self, keys: Sequence[str], vectors: np.ndarray, shards: Sequence[str] | None = None,
            indices: Sequence[int] | None = None, labels: Sequence[int | None] | None = None,
            scores: Sequence[float | None] | None = None) -> int:
        """Add rows whose key is not in the index yet (a key is never added twice); returns how many."""
        n = len(keys)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(n, -1)
        if n and vectors.shape[1] != self.dim:
            raise VectorIndexError(f"vectors have {vectors.shape[1]} dimensions; the index holds {self.dim}")
        seen: set[str] = set()
        take = []
        for i, k in enumerate(keys):
            if k not in self._position and k not in seen:
                seen.add(k)
                take.append(i)
        if not take:
            return 0
        new = pa.table({"key": [keys[i] for i in take],
                        "shard": [shards[i] for i in take] if shards is not None else [""] * len(take),
                        "index": [indices[i] for i in take] if indices is not None else [0] * len(take),
                        "label": [labels[i] for i in take] if labels is not None else [None] * len(take),
                        "anomaly_score": [scores[i] for i in take] if scores is not None else [None] * len(take)},
                       schema=ROW_FIELDS)
        if not self.trained:
            self.train(vectors[take])
        self.faiss_index.add(self._prepare(vectors[take]))
        start = len(self._position)
        for name in ROW_FIELDS.names:
            self._cols[name].extend(new.column(name).to_pylist())
        self._position.update((k, start + j) for j, k in enumerate(new.column("key").to_pylist()))
        self._rows = None  # rebuilt from the columns when stored
        return len(take)

    def _prepare(self, vectors: np.ndarray) -> np.ndarray:
        v = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.whitening is not None:
            v = self.whitening.apply(v)
        if self.metric == "cosine":
            v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        return v

    def vector(self, key: str) -> np.ndarray:
        """The stored vector of ``key`` (whitened with ``whiten``; unit length under cosine)."""
        if key not in self._position:
            raise VectorIndexError(f"key {key!r} is not in the index")
        return self.faiss_index.reconstruct(self._position[key])

    # -- queries -------------------------------------------------------------------------
    def search(self, vectors: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """The ``k`` nearest rows of each query vector (Q, D), nearest first."""
        return self._search(self._prepare(np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim)), k)

    def _search(self, q: np.ndarray, k: int) -> list[list[Hit]]:
        """:meth:`search` of already prepared (stored-space) query vectors."""
        if not len(self):
            return [[] for _ in q]
        d2, ids = self.faiss_index.search(q, min(k, max(len(self), 1)))
        return [[self._hit(int(i), float(d)) for d, i in zip(row_d, row_i) if i >= 0] for row_d, row_i in zip(d2, ids)]

    def search_key(self, key: str, k: int = 10) -> list[Hit]:
        """The ``k`` nearest rows of a stored row, the row itself first."""
        hits = [h for h in self._search(self.vector(key)[None], k + 1)[0] if h.key != key]
        return [self._hit(self._position[key], 0.0), *hits][:k]

    def _hit(self, i: int, d2: float) -> Hit:
        d2 = max(d2, 0.0)  # faiss returns squared L2; rounding can make it slightly negative
        distance = d2 / 2 if self.metric == "cosine" else float(np.sqrt(d2))  # |a-b|^2 = 2 - 2cos on unit vectors
        c = self._cols
        return Hit(c["key"][i], distance, c["label"][i], c["anomaly_score"][i], c["shard"][i], c["index"][i])

    # -- bytes -----------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        return _faiss().serialize_index(self.faiss_index).tobytes()

    def rows_table(self) -> pa.Table:
        if self._rows is None:
            self._rows = pa.table({name: self._cols[name] for name in ROW_FIELDS.names}, schema=ROW_FIELDS)
        return self._rows


def _ivf(dim: int, nlist: int):
    faiss = _faiss()
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist)  # L2 on unit vectors ranks like cosine
    index.set_direct_map_type(faiss.DirectMap.Array)  # reconstruct(i): a stored row's vector
    return index


def ivf_lists(n: int) -> int:
    """Lists of an ivf index whose first build holds ``n`` rows (see IVF_LISTS_PER_SQRT_N)."""
    return max(1, min(round(IVF_LISTS_PER_SQRT_N * np.sqrt(n)), IVF_MAX_LISTS, n // IVF_MIN_PER_LIST))


def _train_ivf(vectors: np.ndarray):
    """A trained, empty ivf index for the first rows: nlist from their count, k-means on a seeded sample."""
    nlist = ivf_lists(len(vectors))
    index = _ivf(vectors.shape[1], nlist)
    index.cp.seed = IVF_SEED
    index.nprobe = min(IVF_NPROBE, nlist)
    take = min(len(vectors), nlist * IVF_TRAIN_PER_LIST)
    sample = vectors if take == len(vectors) else \
        vectors[np.sort(np.random.default_rng(IVF_SEED).choice(len(vectors), take, replace=False))]
    index.cp.max_points_per_centroid = IVF_TRAIN_PER_LIST  # faiss samples no further
    index.train(sample)
    log.info("index: ivf lists trained: nlist %d on %d of %d rows", nlist, take, len(vectors))
    return index


# --------------------------------------------------------------------------- storage


def read_sidecar(index_url: str, storage_options: StorageOptions = None) -> dict[str, Any] | None:
    url = join(index_url, SIDECAR)
    if not exists(url, storage_options):
        return None
    meta = json.loads(read_bytes(url, storage_options))
    if meta.get("format") != FORMAT:
        raise VectorIndexError(f"{url}: not a vaepipe index (format {meta.get('format')!r}, expected {FORMAT})")
    return meta


def load_index(index_url: str, storage_options: StorageOptions = None) -> VectorIndex:
    """The index stored at ``index_url`` (:func:`save_index`'s folder)."""
    meta = read_sidecar(index_url, storage_options)
    if meta is None:
        raise VectorIndexError(f"{index_url}: no index here ({SIDECAR} missing); build one with vaepipe index")
    faiss = _faiss()
    raw = read_bytes(join(index_url, meta["files"]["vectors"]), storage_options)
    index = faiss.deserialize_index(np.frombuffer(raw, dtype=np.uint8))
    if meta["kind"] == "hnsw":
        index.hnsw.efSearch = int((meta.get("hnsw") or LEGACY_HNSW)["ef_search"])
    elif meta["kind"] == "ivf":
        index.nprobe = int((meta.get("ivf") or {}).get("nprobe") or min(IVF_NPROBE, index.nlist))
    rows = read_parquet(read_bytes(join(index_url, meta["files"]["rows"]), storage_options))
    if rows.num_rows != index.ntotal or rows.num_rows != meta["count"]:
        raise VectorIndexError(f"{index_url}: the index holds {index.ntotal} vectors, its rows file {rows.num_rows} and its "
                          f"sidecar says {meta['count']}; rebuild it")
    w = meta.get("whiten")
    whitening = Whitening.from_dict(w) if w and "mean" in w else None
    return VectorIndex(index, meta["metric"], meta["kind"], rows.cast(ROW_FIELDS), meta, whiten=bool(w),
                       whitening=whitening)


def save_index(index: VectorIndex, index_url: str, storage_options: StorageOptions = None) -> dict[str, Any]:
    """Write the index under a new generation, then its sidecar; delete generations before the previous."""
    previous = read_sidecar(index_url, storage_options)
    gen = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    files = {"vectors": f"vectors-{gen}.faiss", "rows": f"rows-{gen}.parquet"}
    atomic_write_bytes(join(index_url, files["vectors"]), index.to_bytes(), storage_options)
    buf = io.BytesIO()
    pq.write_table(index.rows_table(), buf, compression="zstd")
    atomic_write_bytes(join(index_url, files["rows"]), buf.getvalue(), storage_options)
    meta = {**index.meta, "format": FORMAT, "metric": index.metric, "kind": index.kind, "dim": index.dim,
            "count": len(index), "files": files, "library": f"faiss-cpu {_faiss().__version__}",
            "updated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    # asked for but not fitted yet (no rows so far): the first add fits it
    meta["whiten"] = index.whitening.to_dict() if index.whitening is not None else ({"pending": True} if index.whiten
                                                                                     else None)
    if index.kind == "hnsw":
        h = index.faiss_index.hnsw  # the index's own settings: an index of before keeps its efConstruction
        meta["hnsw"] = {"M": int(h.nb_neighbors(1)), "ef_construction": int(h.efConstruction), "ef_search": int(h.efSearch)}
    elif index.kind == "ivf":
        trained = (index.meta.get("ivf") or {}).get("trained_on")  # rows of the first build (None: untrained)
        meta["ivf"] = {"nlist": index.nlist if trained else None, "nprobe": index.nprobe if trained else None,
                       "trained_on": trained, "train_sample": trained and min(trained, index.nlist * IVF_TRAIN_PER_LIST),
                       "seed": IVF_SEED}
    atomic_write_bytes(join(index_url, SIDECAR), json.dumps(meta, indent=2).encode(), storage_options)
    keep = set(files.values()) | set((previous or {}).get("files", {}).values())
    fs, path = fresh_fs(index_url, storage_options)
    for p in fs.ls(path, detail=False):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        if (name.startswith("vectors-") or name.startswith("rows-")) and name not in keep:
            fs.rm(p)
    index.meta = meta
    return meta


# --------------------------------------------------------------------------- building from embed output


def partitions(latents_url: str, run_date: str | None = None, storage_options: StorageOptions = None) -> list[str]:
    """The complete partitions (``_SUCCESS`` written) of an embed output: ``dt=RUN_DATE`` only, or
    every ``dt=*`` folder and the output root itself when a run without ``--run-date`` wrote there."""
    if run_date is not None:
        dt.date.fromisoformat(run_date)
        part = join(latents_url, f"dt={run_date}")
        if not exists(join(part, SUCCESS), storage_options):
            raise VectorIndexError(f"{part}: no complete embed partition here ({SUCCESS} missing)")
        return [part]
    fs, path = fresh_fs(latents_url, storage_options)
    found = [latents_url] if fs.exists(join(path, SUCCESS)) else []
    for p in sorted(fs.ls(path, detail=False)):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("dt=") and fs.exists(join(p, SUCCESS)):
            found.append(join(latents_url, name))
    if not found:
        raise VectorIndexError(f"{latents_url}: no complete embed partitions (dt=*/{SUCCESS}) found")
    return found


def _partition_name(latents_url: str, part: str) -> str:
    rest = part[len(latents_url):].strip("/")
    return rest or "."


def build_index(latents_url: str, index_url: str, metric: str | None = None, kind: str | None = None,
                run_date: str | None = None, storage_options: StorageOptions = None,
                threads: int | None = None, whiten: bool | None = None) -> dict[str, Any]:
    """Build the index at ``index_url`` from ``vaepipe embed`` output, or add to it.

    Adds the rows of every complete partition of ``latents_url`` (only ``dt=run_date`` when
    given) that the index does not hold yet, read from the files its manifest names; a key
    already in the index is never added again. Rows of another model are refused: a new model
    means a new index. A new ivf index sizes and trains its lists, and ``whiten`` fits its
    whitening, on the unique rows of every partition this first build adds (read once, held
    together); later builds reuse them. ``metric``, ``kind`` and ``whiten`` are the first
    build's; a later build that asks for others is refused.
    Returns ``{"index_url", "count", "added", "partitions_added", ...}``.
    """
    parts = partitions(latents_url, run_date, storage_options)
    existing = read_sidecar(index_url, storage_options)
    if existing is not None:
        for name, want in (("metric", metric), ("kind", kind)):
            if want is not None and want != existing[name]:
                raise VectorIndexError(f"{index_url} is a {existing[name]} index; --{name} {want} needs a new index "
                                  f"(another --out)")
        if whiten is not None and whiten != bool(existing.get("whiten")):
            raise VectorIndexError(f"{index_url} is {'a whitened' if existing.get('whiten') else 'an unwhitened'} index; "
                                   f"--{'' if whiten else 'no-'}whiten needs a new index (another --out)")
        index = load_index(index_url, storage_options)
    else:
        index = None
    done = {p["name"] for p in (existing or {}).get("partitions", [])}
    added_parts, added, duplicates = [], 0, 0
    read_ahead: dict[str, pa.Table] = {}  # an untrained ivf index: every new partition, read once
    for part in parts:
        name = _partition_name(latents_url, part)
        if name in done:
            continue
        manifest = json.loads(read_bytes(join(part, MANIFEST), storage_options))
        model_id = manifest.get("model_id")
        if index is None:
            table = _read_rows(part, manifest, storage_options)
            dim = len(table.column("embedding")[0]) if table.num_rows else 0
            first = manifest.get("files") or [None]
            config = json.loads((read_metadata(join(part, first[0]), storage_options) or {}).get("vaepipe.config", "{}")
                                if first[0] else "{}")
            index = VectorIndex.new(dim, metric or "cosine", kind or "hnsw", threads, whiten=bool(whiten),
                                    meta={"model_id": model_id, "calibration": manifest.get("calibration"),
                                          "checkpoint": manifest.get("checkpoint"), "latents_url": latents_url,
                                          "image": {"channels": config.get("channels"),
                                                    "size": config.get("image_size")},
                                          "partitions": []})
        elif model_id != index.meta["model_id"]:
            raise VectorIndexError(f"{part}: rows of model {model_id}, but {index_url} holds model "
                              f"{index.meta['model_id']}: a new model needs a new index (another --out)")
        else:
            table = read_ahead.pop(part) if part in read_ahead else _read_rows(part, manifest, storage_options)
        if not index.trained:  # the lists are sized and trained on all the rows of the first build
            for later in parts[parts.index(part) + 1:]:
                if later not in read_ahead and _partition_name(latents_url, later) not in done:
                    read_ahead[later] = _read_rows(later, json.loads(read_bytes(join(later, MANIFEST), storage_options)),
                                                   storage_options)
            index.train(_unique_embeddings([table, *read_ahead.values()]))
        ids = set(table.column("model_id").unique().to_pylist()) if table.num_rows else set()
        if ids - {index.meta["model_id"]}:
            raise VectorIndexError(f"{part}: rows of model {sorted(ids - {index.meta['model_id']})[0]}, but {index_url} "
                              f"holds model {index.meta['model_id']}: a new model needs a new index (another --out)")
        vectors = np.asarray(table.column("embedding").combine_chunks().flatten(), dtype=np.float32)
        n = index.add(table.column("key").to_pylist(), vectors.reshape(table.num_rows, -1),
                      table.column("shard").to_pylist(), table.column("index").to_pylist(),
                      table.column("label").to_pylist(), table.column("anomaly_score").to_pylist())
        duplicates += table.num_rows - n
        added += n
        entry = {"name": name, "url": part, "run_date": manifest.get("run_date"), "files": manifest.get("files", []),
                 "rows": n, "calibration": manifest.get("calibration"),
                 "score": (manifest.get("options") or {}).get("score")}
        index.meta["partitions"] = [*index.meta.get("partitions", []), entry]
        index.meta["calibration"] = manifest.get("calibration")
        added_parts.append(name)
        log.info("index: %s: %d rows added (%d keys already there)", name, n, table.num_rows - n)
    if index is None or not added_parts:
        meta = existing or {}
    else:
        meta = save_index(index, index_url, storage_options)
    return {"index_url": index_url, "count": meta.get("count", 0), "added": added, "duplicates_skipped": duplicates,
            "partitions_added": added_parts, "partitions": [p["name"] for p in meta.get("partitions", [])],
            "model_id": meta.get("model_id"), "metric": meta.get("metric"), "kind": meta.get("kind"),
            "whiten": bool(meta.get("whiten"))}


def _unique_embeddings(tables: list[pa.Table]) -> np.ndarray:
    """The embeddings of the first row of each key in ``tables``, as (N, D) float32."""
    tables = [t.select(["key", "embedding"]) for t in tables if t.num_rows]
    if not tables:
        return np.zeros((0, 0), dtype=np.float32)
    table = pa.concat_tables(tables)
    _, first = np.unique(np.asarray(table.column("key").to_pylist(), dtype=object), return_index=True)
    vectors = np.asarray(table.column("embedding").combine_chunks().flatten(), dtype=np.float32)
    return vectors.reshape(table.num_rows, -1)[np.sort(first)]


def _read_rows(part: str, manifest: dict, storage_options: StorageOptions) -> pa.Table:
    columns = ["key", "shard", "index", "label", "anomaly_score", "embedding", "model_id"]
    tables = [read_parquet(read_bytes(join(part, name), storage_options), columns=columns)
              for name in manifest.get("files", [])]
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})


def open_index(index_url: str, checkpoint: str | None = None, storage_options: StorageOptions = None):
    """The index at ``index_url``, ready for ``.search(vectors | images, k)``.

    ``images`` (uint8 arrays (N, C, H, W), or encoded image bytes) are encoded with the index's
    model: ``checkpoint`` or the one its embed run named (its model_id must match the index's).
    """
    from pipeline.query import SearchableIndex  # torch only when images are searched

    return SearchableIndex(load_index(index_url, storage_options), checkpoint, storage_options)
