"""Arrow schemas of the pipeline's outputs: latent rows and dead letters."""
from __future__ import annotations

import pyarrow as pa

ROW_FIELDS_DOC = {
    "key": "stable unique id: shard URL + '/' + member key",
    "shard": "input shard URL (or image-group name)",
    "index": "position of the image in its shard",
    "label": "label from a .cls sidecar / label column, if any",
    "meta": "JSON sidecar / metadata column, if any (JSON text)",
    "embedding": "posterior mean mu(x), float32[latent_dim]",
    "elbo": "evidence lower bound, nats (higher = more likely)",
    "recon_nll": "-E_q log p(x|z), nats",
    "kl": "KL(q(z|x) || p(z)), nats",
    "bits_per_dim": "-ELBO in bits per pixel value",
    "iwae_nll": "-IWAE_k bound, nats (only with --score iwae)",
    "complexity": "-ELBO bits minus lossless-coder bits (with --score complexity or typicality)",
    "typicality": "-log density of (-ELBO bits, coder bits) among validation images (--score typicality)",
    "anomaly_score": "the --score in use; higher = more anomalous",
    "anomaly_percentile": "percentile of anomaly_score among the checkpoint's validation images",
    "is_anomaly": "anomaly_score above the validation quantile --threshold-quantile",
    "model_id": "content hash of the checkpoint",
    "run_date": "--run-date, if given",
}


def latent_schema(latent_dim: int) -> pa.Schema:
    return pa.schema([
        ("key", pa.string()), ("shard", pa.string()), ("index", pa.int64()), ("label", pa.int64()),
        ("meta", pa.string()), ("embedding", pa.list_(pa.float32(), latent_dim)),
        ("elbo", pa.float64()), ("recon_nll", pa.float64()), ("kl", pa.float64()), ("bits_per_dim", pa.float64()),
        ("iwae_nll", pa.float64()), ("complexity", pa.float64()), ("typicality", pa.float64()),
        ("anomaly_score", pa.float64()), ("anomaly_percentile", pa.float64()), ("is_anomaly", pa.bool_()),
        ("model_id", pa.string()), ("run_date", pa.date32()),
    ])


ERROR_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("index", pa.int64()), ("stage", pa.string()),
    ("error_type", pa.string()), ("message", pa.string()), ("model_id", pa.string()), ("run_date", pa.date32()),
])
