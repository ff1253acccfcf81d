"""vae_model.noise: each image's noise depends on its key alone."""
import numpy as np
import pytest
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


# -- the on-device construction (issue 13): reference bits, layouts, devices, statistics ---------------

_M = (1 << 64) - 1
_G = 0x9E3779B97F4A7C15


def _mix(z):
    z &= _M
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M
    return z ^ (z >> 31)


def _reference_hash(img: np.ndarray) -> int:
    """The pixel hash as the module docstring states it, in plain Python integers."""
    b = img.tobytes()
    n = len(b)
    b += bytes(-n % 8)
    acc = sum(_mix(int.from_bytes(b[8 * i:8 * i + 8], "little") + _mix((i + 1) * _G)) for i in range(len(b) // 8))
    return _mix((acc & _M) ^ _mix(n))


def _reference_normal(h: int, seed: int, e: int) -> float:
    """Element ``e`` of hash ``h``'s stream under ``seed``, as the module docstring states it."""
    import math

    key, p = _mix(h ^ _mix(seed * _G)), e // 2
    w1, w2 = _mix(key + (2 * p + 1) * _G), _mix(key + (2 * p + 2) * _G)
    u1, u2 = 1.0 - (w1 >> 11) * 2.0 ** -53, (w2 >> 11) * 2.0 ** -53
    r = math.sqrt(-2.0 * math.log(u1))
    return r * (math.cos if e % 2 == 0 else math.sin)(2.0 * math.pi * u2)


def test_pixel_hash_and_noise_follow_the_documented_construction():
    from vae_model.noise import hash_noise, pixel_hash

    rng = np.random.default_rng(1)
    for shape in ((4, 1, 28, 28), (3, 3, 5, 7)):  # 784 bytes: whole words; 105: zero-padded
        x = rng.integers(0, 256, shape, dtype=np.uint8)
        h = pixel_hash(x)
        assert h.dtype == torch.int64 and [v & _M for v in h.tolist()] == [_reference_hash(im) for im in x]
    z = hash_noise(h, 5, seed=3, start=2, n=3)  # (3, B, 5): odd D, pairs straddle samples
    assert z.shape == (3, 3, 5) and z.dtype == torch.float32
    for s in range(3):
        for b in range(3):
            for j in range(5):
                assert abs(z[s, b, j].item() - _reference_normal(h[b].item() & _M, 3, (2 + s) * 5 + j)) < 1e-6


def test_pixel_hash_ignores_batch_and_memory_layout():
    from vae_model.noise import pixel_hash

    x = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (9, 3, 8, 8), dtype=np.uint8))
    h = pixel_hash(x)
    assert len(set(h.tolist())) == 9
    assert torch.equal(pixel_hash(x.contiguous(memory_format=torch.channels_last)), h)
    assert torch.equal(pixel_hash(x[3:7]), h[3:7]) and torch.equal(pixel_hash(x[[8, 0]]), h[[8, 0]])
    y = x.clone()
    y[4, 2, 7, 7] ^= 1  # one bit of one pixel
    assert (pixel_hash(y) != h).tolist() == [i == 4 for i in range(9)]
    assert pixel_hash(torch.zeros(1, 1, 2, 4, dtype=torch.uint8)) != pixel_hash(torch.zeros(1, 1, 4, 4, dtype=torch.uint8))


def test_noise_is_standard_normal_and_uncorrelated():
    from vae_model.noise import hash_noise, pixel_hash

    x = np.random.default_rng(3).integers(0, 256, (512, 1, 8, 8), dtype=np.uint8)
    z = hash_noise(pixel_hash(x), 32, seed=0, start=0, n=16).double()  # (16, 512, 32): 262k normals
    flat = z.reshape(-1)
    assert abs(flat.mean().item()) < 0.01 and abs(flat.std().item() - 1) < 0.01
    assert abs(((flat - flat.mean()) ** 4).mean().item() / flat.var().item() ** 2 - 3) < 0.1  # kurtosis of N(0, 1)

    def corr(a, b):
        return torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1].item()

    assert abs(corr(z[..., :-1], z[..., 1:])) < 0.01  # neighbouring latent dims (one Box-Muller pair or the next)
    assert abs(corr(z[:, :-1], z[:, 1:])) < 0.01  # neighbouring images
    assert abs(corr(z[:-1], z[1:])) < 0.01  # neighbouring samples
    assert abs(corr(z[:, :, 0::2] ** 2, z[:, :, 1::2] ** 2)) < 0.02  # the two halves of each pair: independent
    other = hash_noise(pixel_hash(x), 32, seed=1, start=0, n=16).double()
    assert abs(corr(z, other)) < 0.01  # another seed: another stream


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_hash_and_noise_are_the_same_on_cuda():
    from vae_model.noise import hash_noise, pixel_hash

    x = torch.from_numpy(np.random.default_rng(4).integers(0, 256, (64, 3, 32, 32), dtype=np.uint8))
    h = pixel_hash(x)
    hc = pixel_hash(x.cuda())
    assert hc.device.type == "cuda" and torch.equal(hc.cpu(), h)  # integer ops: the same bits
    z, zc = hash_noise(h, 32, 0, 5, 70), hash_noise(hc, 32, 0, 5, 70)
    torch.testing.assert_close(zc.cpu(), z, rtol=0, atol=1e-6)
