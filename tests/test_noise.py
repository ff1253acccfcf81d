"""vae_model.noise: each image's noise depends on its key alone."""
import numpy as np
import torch

from vae_model.noise import NOISE_BLOCK, iwae_noise_for_keys, noise_for_keys, pixel_ids


def test_keyed_noise_is_independent_of_batch():
    a = noise_for_keys(["x", "y", "z"], (4,))
    b = noise_for_keys(["z", "x"], (4,))
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    k = noise_for_keys(["x", "y"], (3, 4))
    assert k.shape == (3, 2, 4)
    assert not torch.equal(k[:, 0], k[:, 1])


def test_iwae_noise_does_not_depend_on_how_k_is_chunked():
    keys = ["a", "b", "c"]
    whole = iwae_noise_for_keys(keys, 4, 1, 0, 2 * NOISE_BLOCK + 10)
    assert whole.shape == (2 * NOISE_BLOCK + 10, 3, 4)
    parts = [iwae_noise_for_keys(keys, 4, 1, s, n) for s, n in ((0, 50), (50, 70), (120, 2 * NOISE_BLOCK + 10 - 120))]
    assert torch.equal(torch.cat(parts), whole)
    assert torch.equal(whole[:NOISE_BLOCK], noise_for_keys(keys, (NOISE_BLOCK, 4), 1))  # block 0: the key's stream
    assert torch.equal(iwae_noise_for_keys(keys[1:], 4, 1, 0, 80), whole[:80, 1:])  # per key, whatever the batch


def test_pixel_ids_are_content_ids():
    x = np.random.default_rng(0).integers(0, 256, (3, 1, 8, 8), dtype=np.uint8)
    ids = pixel_ids(x)
    assert len(set(ids)) == 3 and pixel_ids(x[::-1].copy()) == ids[::-1]
    y = x.copy()
    y[1, 0, 0, 0] ^= 1
    assert pixel_ids(y) == [ids[0], pixel_ids(y[1:2])[0], ids[2]] and pixel_ids(y)[1] != ids[1]
