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
    # The toy model's complexity points the wrong way (AUROC < 0.5) and its -ELBO p-values carry
    # nothing for digits that are too likely: the combination still ranks them (0.75 measured;
    # 0.991 with the battery's minutes-trained models, BENCHMARKS.md "Anomaly battery").
    assert auroc(sf["typicality"], sm["typicality"]) > 0.7
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


def test_rows_agree_across_batch_sizes_and_threads(tiny_checkpoint, images):
    """The on-device pixel hash and counter-based noise (issue 13): a row depends on the image alone."""
    import torch

    model = load_checkpoint(tiny_checkpoint).model
    x = images[0][:256]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = score_all(model, x, ScoreOptions("elbo"), batch_size=256)
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for bs in (1, 7, 64, 256):
                out = score_all(model, x, ScoreOptions("elbo"), batch_size=bs)
                np.testing.assert_allclose(out["embedding"], ref["embedding"], rtol=0, atol=1e-5)
                np.testing.assert_allclose(out["elbo"], ref["elbo"], rtol=1e-6)
                np.testing.assert_allclose(out["kl"], ref["kl"], rtol=0, atol=1e-4)  # float32 from the encoder
    finally:
        torch.set_num_threads(threads)
    assert ref["embedding"].dtype == np.float32 and ref["elbo"].dtype == np.float64


def test_string_keys_and_hashes_seed_the_same_noise(tiny_checkpoint, images):
    from vae_model.noise import pixel_hash
    from vae_model.scoring import score_batch

    model = load_checkpoint(tiny_checkpoint).model
    x = images[0][:8]
    by_pixels = score_batch(model, x, None, ScoreOptions("elbo"))
    by_hash = score_batch(model, x, pixel_hash(x), ScoreOptions("elbo"))
    np.testing.assert_array_equal(by_pixels["elbo"], by_hash["elbo"])
    by_name = score_batch(model, x, [f"k{i}" for i in range(8)], ScoreOptions("elbo"))
    assert not np.allclose(by_name["elbo"], by_pixels["elbo"])  # another key: other noise
    np.testing.assert_allclose(by_name["embedding"], by_pixels["embedding"])  # the mean needs no noise


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device")
def test_cuda_rows_match_cpu_rows(tiny_checkpoint, images):
    from vae_model.scoring import for_scoring

    ckpt = load_checkpoint(tiny_checkpoint)
    x = images[0][:300]
    cpu = score_all(for_scoring(ckpt.model, "cpu"), x, ScoreOptions("iwae", iwae_k=8))
    gpu = score_all(for_scoring(load_checkpoint(tiny_checkpoint).model, "cuda"), x, ScoreOptions("iwae", iwae_k=8),
                    device="cuda", batch_size=128)
    np.testing.assert_allclose(gpu["embedding"], cpu["embedding"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(gpu["elbo"], cpu["elbo"], rtol=1e-6)
    np.testing.assert_allclose(gpu["iwae_nll"], cpu["iwae_nll"], rtol=1e-6)


def test_the_copula_rule_sees_digits_that_are_too_likely(tiny_checkpoint, images):
    """On the toy model the digits' -ELBO is far *below* the clothes' (too likely): Fisher's
    one-sided p-values cannot use that, the copula (both ways, jointly) can. The battery
    (BENCHMARKS.md, "Anomaly battery") still chose Fisher for the default: this is the case where
    `vaepipe calibrate --rule copula` is the better choice."""
    from vae_model.losses import LN2
    from vae_model.typicality import TypicalityReference

    ckpt = load_checkpoint(tiny_checkpoint)
    cal = read_idx(str(FASHION))[1300:2000][:, None].copy()  # neither trained on nor scored below

    def feats(x):
        out = score_all(ckpt.model, x, ScoreOptions("complexity"))
        return np.stack([-out["elbo"] / LN2, out["code_bits"]], 1), out["embedding"]

    (cf, cz), (ff, fz), (mf, mz) = feats(cal), feats(images[0]), feats(images[1])

    def auroc(ref):
        a, b = ref.score(ff, fz), ref.score(mf, mz)
        return (b[:, None] > a[None, :]).mean()

    fisher, copula = (auroc(TypicalityReference.fit(cf, cz, rule=r)) for r in ("fisher", "copula"))
    assert copula > 0.9 and copula > fisher + 0.05, (copula, fisher)
