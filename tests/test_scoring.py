import numpy as np
import pytest

from model_fixtures import FASHION, MNIST
from pipeline.idx import read_idx
from vae_model.checkpoint import load_checkpoint
from vae_model.scoring import ScoreOptions, compressed_bits, score_all


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



def test_moved_names_still_import_from_their_old_modules():
    """Calibration statistics moved to vae_model.calibration and the per-key noise to
    vae_model.noise; the old import paths keep working."""
    from vae_model import calibration, model, noise, scoring

    for name in ("quantile_table", "percentile_of", "threshold_for", "fit_reference", "QUANTILES"):
        assert getattr(scoring, name) is getattr(calibration, name)
    from vae_model.scoring import calibration_id, pixel_ids, quantile_table  # noqa: F401
    from vae_model.checkpoint_header import calibration_id as the_one

    assert calibration_id is the_one and pixel_ids is noise.pixel_ids and quantile_table is calibration.quantile_table
    for name in ("noise_for_keys", "iwae_noise_for_keys", "NOISE_BLOCK"):
        assert getattr(model, name) is getattr(noise, name)
    with pytest.raises(AttributeError):
        scoring.no_such_name  # noqa: B018
