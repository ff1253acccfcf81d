"""pipeline.schema: one table of columns, from which the Parquet schema and README's list derive."""
import io
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.schema import ERROR_COLUMNS, ERROR_SCHEMA, ROW_COLUMNS, latent_schema, readme_row_columns

README = Path(__file__).resolve().parents[1] / "README.md"


def _schema_before_the_table(latent_dim: int) -> pa.Schema:
    """latent_schema as it was written by hand before ROW_COLUMNS existed (the files it wrote must
    stay readable and appendable: the same names, types, order and nullability)."""
    return pa.schema([
        ("key", pa.string()), ("shard", pa.string()), ("index", pa.int64()), ("label", pa.int64()),
        ("meta", pa.string()), ("embedding", pa.list_(pa.float32(), latent_dim)),
        ("elbo", pa.float64()), ("recon_nll", pa.float64()), ("kl", pa.float64()), ("bits_per_dim", pa.float64()),
        ("iwae_nll", pa.float64()), ("complexity", pa.float64()), ("typicality", pa.float64()),
        ("anomaly_score", pa.float64()), ("anomaly_percentile", pa.float64()), ("is_anomaly", pa.bool_()),
        ("model_id", pa.string()), ("run_date", pa.date32()),
    ])


ERROR_SCHEMA_BEFORE = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("index", pa.int64()), ("stage", pa.string()),
    ("error_type", pa.string()), ("message", pa.string()), ("model_id", pa.string()), ("run_date", pa.date32()),
])


def _parquet_schema(schema: pa.Schema) -> pq.ParquetSchema:
    buf = io.BytesIO()
    pq.write_table(schema.empty_table(), buf)
    return pq.ParquetFile(io.BytesIO(buf.getvalue())).schema


@pytest.mark.parametrize("latent_dim", [1, 4, 32])
def test_the_row_schema_is_byte_identical_to_the_hand_written_one(latent_dim):
    new, old = latent_schema(latent_dim), _schema_before_the_table(latent_dim)
    assert new.equals(old, check_metadata=True)
    assert new.serialize().to_pybytes() == old.serialize().to_pybytes()
    assert _parquet_schema(new).equals(_parquet_schema(old))
    assert all(f.nullable for f in new)


def test_the_dead_letter_schema_is_byte_identical_to_the_hand_written_one():
    assert ERROR_SCHEMA.equals(ERROR_SCHEMA_BEFORE, check_metadata=True)
    assert ERROR_SCHEMA.serialize().to_pybytes() == ERROR_SCHEMA_BEFORE.serialize().to_pybytes()
    assert _parquet_schema(ERROR_SCHEMA).equals(_parquet_schema(ERROR_SCHEMA_BEFORE))


def _readme_table_names(heading: str) -> list[str]:
    """Column names of the Markdown table that follows the line starting with ``heading``."""
    text = README.read_text()
    start = text.index("\n" + heading) + 1
    block = text[start:].split("\n\n", 2)[1]  # the paragraph after the heading line: the table
    return re.findall(r"^\| `([a-z_]+)` \|", block, flags=re.M)


def test_readme_lists_the_row_columns_of_the_table_in_order():
    assert _readme_table_names("Row columns") == [c.name for c in ROW_COLUMNS]
    assert _readme_table_names("Dead-letter columns") == [c.name for c in ERROR_COLUMNS]
    assert readme_row_columns() in README.read_text(), \
        "README's row columns drifted from pipeline/schema.py: paste the output of `python -m pipeline.schema`"
