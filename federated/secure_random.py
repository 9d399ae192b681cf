"""Randomness for DP-SGD from a cryptographically secure generator, with the floating-point attack
on the Gaussian mechanism mitigated.

Why not torch's generator: `torch.Generator` is a Mersenne Twister with a 64-bit seed; its state
can be recovered from its outputs, and with it every noise draw (then the noise can be
subtracted from a released model). Opacus's answer, `secure_mode=True`, needs torchcsprng, which
cannot be installed here (no wheel for torch 2.13). So this module builds the same thing from
parts we have:

- Random bits: the ChaCha20 keystream (RFC 8439 cipher, OpenSSL through `cryptography`) under a
  256-bit key. The key comes from `os.urandom` (a hospital's training: `seed=None`), or, for
  reproducible tests and benchmarks only, from SHA-256 of an integer seed. Sampling and noise use
  two separate streams (nonces 0 and 1) of the same key, so the number of sampling draws never
  shifts the noise.
- Uniforms: 53 random bits per double, `k * 2**-53` for k in [0, 2**53): every double the
  interval can hold at that spacing, none rounded.
- Gaussians: Box-Muller on pairs of those uniforms in float64, then Opacus's secure-mode
  construction (Holohan and Braghin 2021, "Secure random sampling in differential privacy",
  section 5.1; `opacus.optimizers.optimizer._generate_noise`): the noise for one coordinate is
  the SUM OF FOUR independent N(0, std^2) draws divided by 2, which is exactly N(0, std^2) in law
  but whose floating-point value no longer reveals the single Box-Muller input it came from (the
  attack of Jin et al. 2022 on Opacus's Box-Muller noise needs 2^53 guesses for one draw and
  2^159 for the sum of four).

The result is float64; the caller adds it to its float32 gradient sum. Nothing here touches
torch's global generator or numpy's.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

#: bytes of keystream produced per refill (one OpenSSL call, then served from the buffer)
CHUNK_BYTES = 1 << 18
#: standard normals drawn per refill of the noise buffer
NOISE_BLOCK = 1 << 15
_SEED_DOMAIN = b"health-exchange federated.secure_random seed v1:"
_TWO_PI = 2.0 * math.pi
_INV_2_53 = 2.0**-53


class _Stream:
    """A buffered ChaCha20 keystream served as 64-bit words."""

    def __init__(self, key: bytes, stream: int) -> None:
        # cryptography's ChaCha20 nonce is 16 bytes: a 32-bit little-endian block counter
        # (0) followed by a 96-bit nonce; the stream number makes the nonce.
        nonce = bytes(4) + stream.to_bytes(12, "little")
        self._encryptor = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
        self._zeros = bytes(CHUNK_BYTES)
        self._words = np.empty(0, dtype=np.uint64)
        self._pos = 0

    def words(self, n: int) -> np.ndarray:
        """The next `n` 64-bit words of the keystream."""
        out = np.empty(n, dtype=np.uint64)
        filled = 0
        while filled < n:
            if self._pos >= self._words.shape[0]:
                self._words = np.frombuffer(self._encryptor.update(self._zeros), dtype="<u8")
                self._pos = 0
            take = min(n - filled, self._words.shape[0] - self._pos)
            out[filled:filled + take] = self._words[self._pos:self._pos + take]
            self._pos += take
            filled += take
        return out


class SecureRandom:
    """Uniforms (for Poisson sampling) and Gaussian noise from two ChaCha20 keystreams.

    `SecureRandom()` takes a fresh key from the operating system (what a hospital uses);
    `SecureRandom(seed)` derives the key from an integer (tests, benchmarks: reproducible, and
    still never torch's generator)."""

    def __init__(self, seed: int | None = None) -> None:
        if seed is None:
            key = os.urandom(32)
        else:
            if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
                raise TypeError(f"seed: must be an integer or None, got {seed!r}")
            key = hashlib.sha256(_SEED_DOMAIN + str(int(seed)).encode()).digest()
        self.seeded = seed is not None
        self._sampling = _Stream(key, 0)
        self._noise = _Stream(key, 1)
        self._counts = _Stream(key, 2)
        self._spare: np.ndarray = np.empty(0)
        self._spare_pos = 0

    def uniform(self, n: int) -> np.ndarray:
        """`n` independent uniforms on [0, 1) (float64, multiples of 2**-53), from the sampling
        stream."""
        return (self._sampling.words(n) >> np.uint64(11)).astype(np.float64) * _INV_2_53

    def discrete_laplace(self, epsilon: float) -> int:
        """One draw of the discrete Laplace (two-sided geometric) distribution,
        P(k) proportional to exp(-epsilon |k|), from its own stream (nonce 2): added to an integer
        count of sensitivity 1 it is epsilon-DP (Ghosh, Roughgarden and Sundararajan 2009). The
        output is an integer, so no floating-point pattern can reveal the count (the attack of
        Mironov 2012 reads the low bits of a continuous Laplace output). Each geometric is an
        inverse CDF of a 53-bit uniform in (0, 1]."""
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"epsilon: must be a finite number > 0, got {epsilon!r}")
        words = self._counts.words(2) >> np.uint64(11)
        uniforms = (words.astype(np.float64) + 1.0) * _INV_2_53
        # floor(log(u) / log(alpha)), alpha = exp(-epsilon): Geometric with P(g) = (1-alpha) alpha^g
        first, second = (math.floor(-math.log(float(u)) / epsilon) for u in uniforms)
        return first - second

    def gaussian(self, n: int, std: float) -> np.ndarray:
        """`n` independent N(0, std^2) draws, each the sum of four N(0, std^2) divided by 2
        (Opacus's secure-mode construction; see the module docstring). Drawn in blocks of at
        least `NOISE_BLOCK` coordinates and served from a buffer: the per-call cost of a few
        thousand coordinates per DP-SGD step is then mostly arithmetic, not call overhead."""
        if n == 0 or std == 0.0:
            return np.zeros(n)
        out = np.empty(n)
        filled = 0
        while filled < n:
            if self._spare_pos >= self._spare.shape[0]:
                self._spare = self._four_sums(max(n - filled, NOISE_BLOCK))
                self._spare_pos = 0
            take = min(n - filled, self._spare.shape[0] - self._spare_pos)
            out[filled:filled + take] = self._spare[self._spare_pos:self._spare_pos + take]
            self._spare_pos += take
            filled += take
        return out * std

    def _four_sums(self, n: int) -> np.ndarray:
        """`n` standard normals, each (z1 + z2 + z3 + z4) / 2.

        Box-Muller turns a pair of uniforms into two normals (r cos t, r sin t); the four terms of
        one coordinate come from four DIFFERENT pairs (cosines of pairs i and m+i, sines of pairs
        i+1 and m+i+1, modulo 2m), so recovering one coordinate's inputs means guessing four
        independent pairs, and every normal drawn is used exactly once."""
        m = max(n, 2)  # with one coordinate the four pairs could not all differ
        words = self._noise.words(4 * m) >> np.uint64(11)
        # u1 in (0, 1] (log(0) impossible), u2 in [0, 1)
        u1 = (words[: 2 * m].astype(np.float64) + 1.0) * _INV_2_53
        u2 = words[2 * m:].astype(np.float64) * _INV_2_53
        radius = np.sqrt(-2.0 * np.log(u1))
        angle = _TWO_PI * u2
        cos = radius * np.cos(angle)
        sin = np.roll(radius * np.sin(angle), -1)
        total = cos[:m] + cos[m:] + sin[:m] + sin[m:]
        return total[:n] * 0.5
