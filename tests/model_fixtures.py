"""Session fixtures: tiny real data (slices of the embedded Fashion-MNIST/MNIST) and a tiny
trained checkpoint, shared by the job and pipeline tests. Imported by conftest.py."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FASHION = REPO / "data" / "demo" / "fashion-mnist-2k-images-idx3-ubyte.gz"
MNIST = REPO / "data" / "demo" / "mnist-200-images-idx3-ubyte.gz"
TINY_MODEL = dict(image_size=28, channels=1, widths=(8, 16), latent_dim=4, hidden_dim=32)


@pytest.fixture(scope="session")
def fashion_shards(tmp_path_factory) -> Path:
    """600 real Fashion-MNIST images (with labels) in 3 tar shards."""
    from pipeline.shards import write_shards

    out = tmp_path_factory.mktemp("fashion") / "shards"
    write_shards(str(FASHION), str(out), fmt="tar", shard_size=200, limit=600)
    return out


@pytest.fixture(scope="session")
def mnist_shards(tmp_path_factory) -> Path:
    from pipeline.shards import write_shards

    out = tmp_path_factory.mktemp("mnist") / "shards"
    write_shards(str(MNIST), str(out), fmt="tar", shard_size=50, limit=100)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, fashion_shards) -> str:
    """A tiny VAE trained for 2 epochs on the Fashion-MNIST slice (with score quantiles)."""
    from jobs.train import TrainConfig, train

    url = str(tmp_path_factory.mktemp("model") / "tiny.safetensors")
    train(TrainConfig(data_url=str(fashion_shards), out=url, epochs=2, batch_size=32, lr=3e-3, val_fraction=0.2,
                      kl_warmup_steps=0, quantile_images=200, quantile_iwae_k=4, shuffle_buffer=256,
                      # 3x the default learning rate on batches of 32: a fixed clip keeps the first
                      # steps in check (the adaptive default left this 2-epoch toy model weaker)
                      grad_clip=200.0, grad_clip_factor=0.0,
                      num_workers=0, model=dict(TINY_MODEL)), progress=False)
    return url
