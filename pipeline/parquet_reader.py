"""Reading Parquet shards: one row per image, in batches that stay near one member's size cap.

Columns, first match wins: image ``image|img|png|jpg|bytes|data`` (binary, large or dictionary-encoded binary, or a struct with a
``bytes`` field as Hugging Face ``datasets`` writes it), key ``key|__key__|id``, label
``label|cls|class``, metadata ``json|meta`` (a JSON string or a struct). Cells over a
:class:`~pipeline.members.ReadLimits` cap are nulled before they become Python objects. A row
group that cannot be read makes each of its unread rows (counted from the footer) a
``CorruptRowGroup`` dead letter.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vae_model.storage import StorageOptions

from .decode import SUPPORTED_EXTS
from .members import MemberBuilder, Problem, ReadLimits, ShardTally, dead_letter, printable, reason, too_large
from .shard_file import StorageFile, read_shard
from .shards import Member, ShardSpec

log = logging.getLogger(__name__)

PARQUET_BATCH_ROWS = 256
IMAGE_COLUMNS = ("image", "img", "png", "jpg", "bytes", "data")
KEY_COLUMNS = ("key", "__key__", "id")
LABEL_COLUMNS = ("label", "cls", "class")
META_COLUMNS = ("json", "meta")
PARQUET_ERRORS = (pa.ArrowException, OSError, ValueError, EOFError)


@dataclass(frozen=True)
class _ParquetColumns:
    image: str | None
    image_struct: bool
    key: str | None
    label: str | None
    meta: str | None

    @property
    def names(self) -> list[str]:
        return [c for c in (self.image, self.key, self.label, self.meta) if c is not None]


def iter_parquet(spec: ShardSpec, storage_options: StorageOptions, limits: ReadLimits,
                 tally: ShardTally) -> Iterator[Member]:
    def parse(f: StorageFile) -> _ParquetShard:
        pf = pq.ParquetFile(f, buffer_size=1 << 20)  # buffered: a column chunk is not read whole
        return _ParquetShard(spec, pf, _parquet_columns(pf.schema_arrow), limits)

    return read_shard(spec, storage_options, tally, "Parquet file", PARQUET_ERRORS, parse,
                      lambda shard: shard.members(tally))


@dataclass
class _ParquetShard:
    """One opened Parquet shard and the columns found in it."""

    spec: ShardSpec
    pf: pq.ParquetFile
    cols: _ParquetColumns
    limits: ReadLimits
    builder: MemberBuilder = field(default_factory=MemberBuilder)

    def members(self, tally: ShardTally) -> Iterator[Member]:
        md = self.pf.metadata
        if self.cols.image is None:
            tally.members += 1
            yield dead_letter("__shard__", 0, "NoImageColumn",
                              f"{self.spec.name}: no image column; expected one of {', '.join(IMAGE_COLUMNS)} of "
                              f"binary type (or a struct with a 'bytes' field), found "
                              f"{', '.join(self.pf.schema_arrow.names) or 'none'}")
            return
        tally.members += md.num_rows
        batch_rows = _parquet_batch_rows(self.pf, self.limits)
        row = 0
        for group in range(md.num_row_groups):
            end = row + md.row_group(group).num_rows
            yield from self._row_group(group, row, end, batch_rows)
            row = end

    def _row_group(self, group: int, row: int, end: int, batch_rows: int) -> Iterator[Member]:
        """Rows ``row`` to ``end`` (one row group); those not read when it fails are dead letters."""
        try:
            for batch in self.pf.iter_batches(batch_size=batch_rows, row_groups=[group], columns=self.cols.names):
                for member in _parquet_rows(batch, self.cols, self.limits, row):
                    row += 1
                    yield self.builder.row_member(*member)
        except PARQUET_ERRORS as exc:
            # The footer says how many rows this group holds: each unread one is a dead letter.
            why = f"row group {group} of {self.spec.name} is corrupt ({reason(exc)})"
            log.warning("%s: %d rows lost", printable(why), end - row)
            for lost in range(row, end):
                yield self.builder.row_member(f"{lost:08d}", None, "", None, None, Problem("CorruptRowGroup", why))


def _is_binary(t: pa.DataType) -> bool:
    """Binary cells, plain or dictionary-encoded (an Arrow schema written with ``dictionary_encode()``)."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    is_view = getattr(pa.types, "is_binary_view", None)  # pyarrow >= 16
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or bool(is_view and is_view(t))


def _is_text(t: pa.DataType) -> bool:
    plain = t.value_type if pa.types.is_dictionary(t) else t
    return pa.types.is_string(plain) or pa.types.is_large_string(plain) or _is_binary(plain)


def _plain(column: pa.Array) -> pa.Array:
    """``column`` with a dictionary encoding undone (the byte-length checks need the values)."""
    return column.dictionary_decode() if pa.types.is_dictionary(column.type) else column


def _parquet_columns(schema: pa.Schema) -> _ParquetColumns:
    image, struct = None, False
    for name in IMAGE_COLUMNS:
        if name not in schema.names:
            continue
        t = schema.field(name).type
        if _is_binary(t):
            image = name
            break
        if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and _is_binary(t.field("bytes").type):
            image, struct = name, True
            break

    def first(names: tuple[str, ...]) -> str | None:
        return next((n for n in names if n in schema.names), None)

    return _ParquetColumns(image, struct, first(KEY_COLUMNS), first(LABEL_COLUMNS), first(META_COLUMNS))


def _capped(column: pa.Array, cap: int) -> tuple[list, list[int | None]]:
    """A binary/string column as Python values, with cells over ``cap`` bytes nulled, and each cell's length."""
    lengths = pc.binary_length(column)
    over = pc.fill_null(pc.greater(lengths, cap), False)
    if pc.any(over).as_py():
        column = pc.if_else(over, pa.scalar(None, column.type), column)
    return column.to_pylist(), lengths.to_pylist()


def _parquet_batch_rows(pf: pq.ParquetFile, limits: ReadLimits) -> int:
    """Rows per batch: at most 256, fewer when rows are big, so a batch stays near one member's cap."""
    md = pf.metadata
    biggest = max((md.row_group(i).total_byte_size / max(1, md.row_group(i).num_rows)
                   for i in range(md.num_row_groups)), default=0)
    return max(1, min(PARQUET_BATCH_ROWS, int(limits.max_member_bytes // max(1.0, biggest))))


def _parquet_rows(batch: pa.RecordBatch, cols: _ParquetColumns, limits: ReadLimits,
                  first_row: int) -> list[tuple]:
    """``(key, data, ext, label, meta, problem)`` for each row of one batch, oversized cells left unread."""
    n = batch.num_rows
    image = batch.column(cols.image)
    paths: list = [None] * n
    if cols.image_struct:
        if image.type.get_field_index("path") >= 0:
            paths = pc.struct_field(image, "path").to_pylist()
        image = pc.struct_field(image, "bytes")
    data, sizes = _capped(_plain(image), limits.max_member_bytes)
    keys = batch.column(cols.key).to_pylist() if cols.key else [None] * n
    labels = batch.column(cols.label).to_pylist() if cols.label else [None] * n
    metas, meta_sizes = [None] * n, [None] * n
    if cols.meta:
        meta = batch.column(cols.meta)
        if _is_text(meta.type):
            metas, meta_sizes = _capped(_plain(meta), limits.max_sidecar_bytes)
        else:
            metas = meta.to_pylist()
    out = []
    for i in range(n):
        key = str(keys[i]) if keys[i] is not None else f"{first_row + i:08d}"
        problem = None
        if (sizes[i] or 0) > limits.max_member_bytes:
            problem = too_large(f"image cell of row {first_row + i}", sizes[i], limits.max_member_bytes,
                                "--max-member-bytes")
        elif (meta_sizes[i] or 0) > limits.max_sidecar_bytes:
            problem = too_large(f"metadata cell of row {first_row + i}", meta_sizes[i], limits.max_sidecar_bytes,
                                "--max-sidecar-bytes")
        out.append((key, data[i], _path_ext(paths[i]) if data[i] is not None else "", labels[i], metas[i], problem))
    return out


def _path_ext(path: str | None) -> str:
    if not path or "." not in path.rsplit("/", 1)[-1]:
        return ""
    ext = path.rsplit(".", 1)[-1].lower()
    return ext if ext in SUPPORTED_EXTS else ""
