import numpy as np
import pytest

from model_fixtures import FASHION, MNIST
from pipeline.idx import read_idx
from vae_model.checkpoint import load_checkpoint
from vae_model.scoring import (ScoreOptions, compressed_bits, percentile_of, quantile_table, score_all,
                               threshold_for)


@pytest.fixture(scope="module")
def images():
    f = read_idx(str(FASHION))[1000:1300][:, None].copy()  # not in the tiny model's training slice
    m = read_idx(str(MNIST))[:300][:, None].copy()
    return f, m


def test_complexity_is_elbo_bits_minus_code_length(tiny_checkpoint, images):
    model = load_checkpoint(tiny_checkpoint).model
    x = images[0][:16]
    out = score_all(model, x, ScoreOptions("complexity"))
    lengths = np.array([compressed_bits(im) for im in x])
    np.testing.assert_allclose(out["code_bits"], lengths)
    np.testing.assert_allclose(out["complexity"], -out["elbo"] / np.log(2) - lengths)


def test_typicality_separates_mnist_from_fashion_better_than_elbo(tiny_checkpoint, images):
    ckpt = load_checkpoint(tiny_checkpoint)
    f, m = images
    opts = ScoreOptions("typicality", reference=ckpt.meta["typicality"])
    sf, sm = score_all(ckpt.model, f, opts), score_all(ckpt.model, m, opts)

    def auroc(a, b):
        return (b[:, None] > a[None, :]).mean()

    # Even a 2-epoch toy model shows the effect: -ELBO ranks MNIST digits as *more* normal.
    assert auroc(-sf["elbo"], -sm["elbo"]) < 0.5
    assert auroc(sf["typicality"], sm["typicality"]) > 0.8
    assert auroc(sf["typicality"], sm["typicality"]) > auroc(sf["complexity"], sm["complexity"])


def test_typicality_needs_a_reference():
    with pytest.raises(ValueError, match="typicality reference"):
        ScoreOptions("typicality")


def test_scores_depend_on_the_image_only(tiny_checkpoint, images):
    model = load_checkpoint(tiny_checkpoint).model
    x = images[0][:20]
    a = score_all(model, x, ScoreOptions("iwae", iwae_k=8), batch_size=20)
    b = score_all(model, x[::-1].copy(), ScoreOptions("iwae", iwae_k=8), batch_size=3)
    np.testing.assert_allclose(a["iwae_nll"], b["iwae_nll"][::-1], rtol=1e-6)
    np.testing.assert_allclose(a["elbo"], b["elbo"][::-1], rtol=1e-6)


def test_percentiles_and_thresholds_follow_the_quantile_table():
    scores = np.random.default_rng(0).normal(size=10_000)
    table = quantile_table(scores)
    assert threshold_for(table, 0.99) == pytest.approx(np.quantile(scores, 0.99))
    pct = percentile_of(np.array([table["min"] - 1, table["0.5"], table["0.99"], table["max"] + 1]), table)
    np.testing.assert_allclose(pct, [0, 50, 99, 100])
