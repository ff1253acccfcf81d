"""The columns of the pipeline's outputs, each stated once: latent rows and dead letters.

:data:`ROW_COLUMNS` is the one table of a row's columns (name, Arrow type, description). The
Parquet schema (:func:`latent_schema`), the batch builder (``pipeline.embed``, which fills the
columns in this order) and README's "Row columns" list (:func:`readme_row_columns`, checked by
``tests/test_schema.py``) are derived from it, so adding or renaming a column is one edit here.
:data:`ERROR_COLUMNS` is the same for dead letters.

Run ``python -m pipeline.schema`` to print README's paragraph after changing a table.
"""
from __future__ import annotations

from typing import NamedTuple

import pyarrow as pa


class LatentVector:
    """The one column type that depends on the model: float32 x latent_dim."""

    def __call__(self, latent_dim: int) -> pa.DataType:
        return pa.list_(pa.float32(), latent_dim)

    def __str__(self) -> str:
        return "fixed_size_list<float>[latent_dim]"


class Column(NamedTuple):
    """One output column. ``type`` is an Arrow type, or :class:`LatentVector`."""

    name: str
    type: pa.DataType | LatentVector
    doc: str  # Markdown: README's description of the column

    def arrow_type(self, latent_dim: int) -> pa.DataType:
        return self.type(latent_dim) if isinstance(self.type, LatentVector) else self.type


ROW_COLUMNS: tuple[Column, ...] = (
    Column("key", pa.string(), "stable unique id: shard URL + `/` + member key"),
    Column("shard", pa.string(), "input shard URL (or image-group name)"),
    Column("index", pa.int64(), "position of the image in its shard"),
    Column("label", pa.int64(), "label from a `.cls` sidecar or label column, if any"),
    Column("meta", pa.string(), "JSON sidecar or metadata column, if any (JSON text)"),
    Column("embedding", LatentVector(), "the posterior mean mu(x): the image's embedding"),
    Column("elbo", pa.float64(), "evidence lower bound, nats (higher = more likely); null with `--score none`, "
                                 "like every score column below"),
    Column("recon_nll", pa.float64(), "-E_q log p(x|z), nats"),
    Column("kl", pa.float64(), "KL(q(z|x) || p(z)), nats"),
    Column("bits_per_dim", pa.float64(), "-ELBO in bits per pixel value"),
    Column("iwae_nll", pa.float64(), "-IWAE_k, nats (with `--score iwae`)"),
    Column("complexity", pa.float64(), "-ELBO bits minus lossless-coder bits (with `--score complexity` or "
                                       "`typicality`)"),
    Column("typicality", pa.float64(), "the typicality score (with `--score typicality`)"),
    Column("anomaly_score", pa.float64(), "the `--score` in use; higher = more anomalous"),
    Column("anomaly_percentile", pa.float64(), "percentile of `anomaly_score` among the checkpoint's validation "
                                               "images"),
    Column("is_anomaly", pa.bool_(), "`anomaly_score` above the validation quantile `--threshold-quantile`"),
    Column("model_id", pa.string(), "content hash of the checkpoint"),
    Column("run_date", pa.date32(), "`--run-date`, if given"),
)

ERROR_COLUMNS: tuple[Column, ...] = (
    Column("key", pa.string(), "as in rows"),
    Column("shard", pa.string(), "as in rows"),
    Column("index", pa.int64(), "as in rows"),
    Column("stage", pa.string(), "where it failed: `read`, `decode` or `score`"),
    Column("error_type", pa.string(), "the kind of failure (see \"Nothing lost, safe reruns\")"),
    Column("message", pa.string(), "the cause, one line"),
    Column("model_id", pa.string(), "as in rows"),
    Column("run_date", pa.date32(), "as in rows"),
)


def _schema(columns: tuple[Column, ...], latent_dim: int = 0) -> pa.Schema:
    return pa.schema([(c.name, c.arrow_type(latent_dim)) for c in columns])


def latent_schema(latent_dim: int) -> pa.Schema:
    """The Arrow (and Parquet) schema of a row, for a model with ``latent_dim`` latents."""
    return _schema(ROW_COLUMNS, latent_dim)


ERROR_SCHEMA = _schema(ERROR_COLUMNS)


def _cell(text: str) -> str:
    return text.replace("|", r"\|")  # a bare pipe would end the Markdown table cell


def _markdown_table(columns: tuple[Column, ...]) -> str:
    lines = ["| column | type | |", "|---|---|---|"]
    lines += [f"| `{c.name}` | `{c.type}` | {_cell(c.doc)} |" for c in columns]
    return "\n".join(lines)


def readme_row_columns() -> str:
    """README's "Row columns" block: a row's columns in order, then a dead letter's."""
    return (f"Row columns (`pipeline/schema.py`), in file order:\n\n{_markdown_table(ROW_COLUMNS)}\n\n"
            f"Dead-letter columns:\n\n{_markdown_table(ERROR_COLUMNS)}\n")


if __name__ == "__main__":
    print(readme_row_columns(), end="")
