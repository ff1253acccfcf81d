"""Per-image noise for deterministic scoring: a score depends on the image alone.

Stochastic scores (the ELBO's one reparameterised sample, IWAE's k samples) draw their noise
from a stream keyed by a 64-bit hash of the image, one stream per image. The pipeline's key is
the image's pixels (:func:`pixel_hash`), so an image gets the same noise, hence the same score,
whatever batch, worker, runner, device or storage location scores it (README, "Anomaly scores").

Everything here is batched integer arithmetic on torch int64 tensors, run on whatever device
the batch is on, so the CPU and a GPU compute the same bits; only the last step (Box-Muller in
float64, rounded to float32) is floating point, and it agrees across devices to ~1 float32 ulp.
Torch's int64 ``*`` and ``+`` wrap modulo 2**64; its ``>>`` is arithmetic, so the logical right
shift that the mixers need is :func:`_shr` (shift, then mask off the sign copies).

**Pixel hash** (:func:`pixel_hash`), not cryptographic: the image's (C, H, W) uint8 pixels,
zero-padded to whole 8-byte words, are read as little-endian 64-bit words ``w_i``; word ``i``
becomes ``v_i = mix(w_i + k_i)`` with ``k_i = mix((i + 1) * G)`` a per-position key (mix, the
SplitMix64 finaliser, is a bijection, so each position maps its values to distinct words); the
image's hash is ``mix((sum_i v_i mod 2**64) ^ mix(n))``, ``n`` the number of bytes. A wrapping
sum does not depend on the order in which a device reduces it. Eight bytes per word keep the
int64 work at one eighth of the pixels (int64 multiplies are slow on CPUs without AVX-512).

**Noise** (:func:`hash_noise`): a counter-based generator. The stream of image hash ``h`` under
``seed`` holds standard normals ``z_e``, ``e = sample * D + latent`` (D the latent size). Pair
``p = e // 2`` gets two 64-bit words ``mix(key + (2p + 1) * G)`` and ``mix(key + (2p + 2) * G)``
(``key = mix(h ^ mix(seed * G))``, G the golden-ratio increment, mix the SplitMix64 finaliser);
their top 53 bits are two uniforms ``u1`` in (0, 1], ``u2`` in [0, 1), and Box-Muller gives
``z_2p = r cos(2 pi u2)``, ``z_2p+1 = r sin(2 pi u2)`` with ``r = sqrt(-2 ln u1)``. Any sample
range ``start..start+n`` is computed from its counters alone, without the samples before it.
"""
from __future__ import annotations

import hashlib
import math
from typing import Sequence

import numpy as np
import torch

NOISE_BLOCK = 64  # kept for old imports: the counter-based stream needs no blocks (any range is direct)

_M64 = (1 << 64) - 1


def _i64(c: int) -> int:
    """An unsigned 64-bit constant as the signed int64 torch stores."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_MIX1 = _i64(0xBF58476D1CE4E5B9)
_MIX2 = _i64(0x94D049BB133111EB)
_HASH_CHUNK = 1 << 22  # int64 words per step of the pixel hash: bounds its scratch memory (32 MB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 words (torch's ``>>`` copies the sign bit)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser (Steele et al. 2014), elementwise on int64 words."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def _mix64_int(z: int) -> int:
    """:func:`mix64` of one Python int (the same bits, unsigned)."""
    z &= _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


_position_keys: dict[tuple[int, str], torch.Tensor] = {}


def _keys(start: int, n: int, device: torch.device) -> torch.Tensor:
    """The per-position keys ``k_i`` for words ``i in start..start+n`` (cached per device)."""
    cache_key = (start + n, str(device))
    k = _position_keys.get(cache_key)
    if k is None:
        i = torch.arange(1, start + n + 1, dtype=torch.int64, device=device)
        k = mix64(i * _GOLDEN)
        if len(_position_keys) > 64:
            _position_keys.clear()
        _position_keys[cache_key] = k
    return k[start:start + n]


def pixel_hash(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """64-bit content hashes of uint8 images (B, C, H, W) -> int64 (B,), on the images' device.

    The hash of an image depends on its pixel values and shape alone (the module docstring gives
    the construction): not on its batch, its memory layout or the device.
    """
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise TypeError(f"pixel_hash hashes uint8 images, got {x.dtype}")
    b = len(x)
    flat = x.reshape(b, -1)  # (B, N) in (C, H, W) order, whatever the memory format
    n = flat.shape[1]
    if n % 8:
        flat = torch.nn.functional.pad(flat, (0, 8 - n % 8))  # zero bytes up to whole words
    try:
        words = flat.contiguous().view(torch.int64)  # (B, W): little-endian 8-byte words (CPU and CUDA)
    except RuntimeError:  # a batch sliced at an offset that is not a whole word
        words = flat.clone().view(torch.int64)
    acc = torch.zeros(b, dtype=torch.int64, device=x.device)
    step = max(1, _HASH_CHUNK // max(b, 1))
    for start in range(0, words.shape[1], step):
        w = words[:, start:start + step]
        acc += mix64(w + _keys(start, w.shape[1], x.device)).sum(dim=1)  # wrapping int64 sum: order-independent
    return mix64(acc ^ _i64(_mix64_int(n)))


def key_hashes(keys: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """64-bit hashes of string keys (blake2b), int64 (B,): for noise keyed by name, not pixels."""
    words = [int.from_bytes(hashlib.blake2b(k.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")
             for k in keys]
    return torch.tensor([_i64(w) for w in words], dtype=torch.int64, device=device)


def pixel_ids(images: np.ndarray | torch.Tensor) -> list[str]:
    """Content ids of uint8 images (B, C, H, W): :func:`pixel_hash` as 16 hex digits each."""
    return [f"{h & _M64:016x}" for h in pixel_hash(images).cpu().tolist()]


def hash_noise(hashes: torch.Tensor, latent_dim: int, seed: int = 0, start: int = 0, n: int = 1) -> torch.Tensor:
    """Samples ``start..start+n`` of each hash's standard normal stream: float32 (n, B, D), on
    the hashes' device. Sample 0 is the ELBO's noise; IWAE draws its k samples from a stream of
    another seed, one chunk at a time."""
    dev, b, d = hashes.device, hashes.shape[0], latent_dim
    key = mix64(hashes.to(torch.int64) ^ _i64(_mix64_int(seed * 0x9E3779B97F4A7C15)))  # (B,)
    e0, e1 = start * d, (start + n) * d  # the elements wanted, as stream offsets
    p0, p1 = e0 // 2, (e1 + 1) // 2  # the Box-Muller pairs that hold them
    ctr = torch.arange(2 * p0 + 1, 2 * p1 + 1, dtype=torch.int64, device=dev) * _GOLDEN  # (2P,)
    words = mix64(key[:, None] + ctr[None, :])  # (B, 2P)
    u = _shr(words, 11).double() * 2.0 ** -53  # top 53 bits: uniforms in [0, 1)
    u1, u2 = 1.0 - u[:, 0::2], u[:, 1::2]  # u1 in (0, 1]: log(u1) is finite
    r, theta = torch.sqrt(-2.0 * torch.log(u1)), (2.0 * math.pi) * u2
    z = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=2).reshape(b, -1)  # (B, 2P)
    z = z[:, e0 - 2 * p0:e1 - 2 * p0].float()  # (B, n * D)
    return z.reshape(b, n, d).transpose(0, 1)  # (n, B, D)


def _as_hashes(keys: Sequence[str] | torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    if isinstance(keys, torch.Tensor):
        return keys if device is None else keys.to(device)
    return key_hashes(keys, "cpu" if device is None else device)


def noise_for_keys(keys: Sequence[str] | torch.Tensor, shape: tuple[int, ...], seed: int = 0,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Standard normal noise, one independent stream per key: (*shape, len(keys), D) where
    ``shape`` is (..., D) minus the batch dim, e.g. (D,) -> (B, D), (K, D) -> (K, B, D).

    ``keys`` are strings (hashed by :func:`key_hashes`) or int64 hashes (:func:`pixel_hash`);
    the noise is the first samples of each key's :func:`hash_noise` stream, so an image gets the
    same noise whatever batch, worker, runner or device scores it.
    """
    h = _as_hashes(keys, device)
    lead = shape[:-1]
    z = hash_noise(h, shape[-1], seed, 0, math.prod(lead))  # (n, B, D)
    return z[0] if not lead else z.reshape(*lead, len(h), shape[-1])


def iwae_noise_for_keys(keys: Sequence[str] | torch.Tensor, latent_dim: int, seed: int, start: int, n: int,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Samples ``start..start+n`` of each key's IWAE noise stream: (n, B, D).

    Computed from the samples' counters alone (:func:`hash_noise`): any range is drawn without
    the samples before it, so IWAE with a huge k holds one chunk of noise at a time, and the
    noise does not depend on how k is chunked.
    """
    return hash_noise(_as_hashes(keys, device), latent_dim, seed, start, n)
