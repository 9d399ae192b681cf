"""Shamir secret sharing exactly as flwr 1.42's SecAgg+ does it, without its per-call costs.

flwr's `flwr.common.secure_aggregation.crypto.shamir` pads the secret to 16-byte chunks, shares
each chunk with pycryptodome's `Shamir` over GF(2^128) (polynomial 1 + x + x^2 + x^7 + x^128,
elements as big-endian 16-byte strings, share i evaluated at x = i, no "ssss" diffusion) and
lays a share out as `<index: 4 bytes little-endian><share of chunk 1>...<share of chunk N>`.
Two things make it slow: pycryptodome multiplies field elements with string operations per bit
(~0.1 ms a product; a 10-share combine costs ~12 ms of CPU per 32-byte seed, ~75 ms per secret
key), and every call starts a thread pool, whose threads wait for a core on a loaded machine.

Here the same arithmetic runs on Python integers in the calling thread (carry-less multiply,
then reduction), and a combine computes the Lagrange coefficients at 0 once per set of share
indices (every owner's shares come from the same hospitals in a round) instead of once per
16-byte chunk. Same field, same layout, same results: `tests/federated/test_secagg_shamir.py`
checks both directions against flwr's functions. `patch_secagg_shamir`
(`federated.runtime.flwr_internals`) makes `secaggplus_mod` use `create_shares`; the server
combines with `combine_shares`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache

_MASK = (1 << 128) - 1
#: x^128 + x^7 + x^2 + x + 1
_IRREDUCIBLE = (1 << 128) | 0b10000111
_BLOCK = 16


def _reduce(z: int) -> int:
    """z mod (x^128 + x^7 + x^2 + x + 1), for a carry-less product of two 128-bit elements."""
    while z >> 128:
        high = z >> 128
        z = (z & _MASK) ^ high ^ (high << 1) ^ (high << 2) ^ (high << 7)
    return z


def _clmul(a: int, b: int) -> int:
    """Carry-less product (no reduction); loops over the bits of the smaller operand."""
    if b > a:
        a, b = b, a
    z = 0
    while b:
        if b & 1:
            z ^= a
        a <<= 1
        b >>= 1
    return z


def _mul(a: int, b: int) -> int:
    return _reduce(_clmul(a, b))


def _inverse(a: int) -> int:
    """a^-1 in GF(2^128), by the extended Euclidean algorithm on polynomials over GF(2)."""
    if a == 0:
        raise ValueError("inversion of zero")
    r0, r1 = a, _IRREDUCIBLE
    s0, s1 = 1, 0
    while r1:
        quotient, remainder = 0, r0
        degree = r1.bit_length()
        while remainder.bit_length() >= degree:
            shift = remainder.bit_length() - degree
            quotient ^= 1 << shift
            remainder ^= r1 << shift
        r0, r1 = r1, remainder
        s0, s1 = s1, s0 ^ _clmul(quotient, s1)
    return _reduce(s0)


class _Table:
    """Multiplication by one fixed element, 8 bits of the other operand at a time."""

    __slots__ = ("rows",)

    def __init__(self, element: int) -> None:
        self.rows = [_clmul(element, t) for t in range(256)]

    def times(self, value: int) -> int:
        rows, z, shift = self.rows, 0, 0
        while value:
            z ^= rows[value & 0xFF] << shift
            value >>= 8
            shift += 8
        return _reduce(z)


@lru_cache(maxsize=64)
def _lagrange_at_zero(indices: tuple[int, ...]) -> tuple[_Table, ...]:
    """l_j(0) = prod_{m != j} x_m / (x_j + x_m) for each x_j (characteristic 2: minus is plus)."""
    tables = []
    for j, x_j in enumerate(indices):
        numerator, denominator = 1, 1
        for m, x_m in enumerate(indices):
            if m != j:
                numerator = _mul(numerator, x_m)
                denominator = _mul(denominator, x_j ^ x_m)
        tables.append(_Table(_mul(numerator, _inverse(denominator))))
    return tuple(tables)


def _pad(secret: bytes) -> bytes:
    """PKCS#7 to a multiple of 16 bytes (what flwr does with pycryptodome's `pad`)."""
    n = _BLOCK - len(secret) % _BLOCK
    return secret + bytes([n]) * n


def _unpad(padded: bytes) -> bytes:
    n = padded[-1] if padded else 0
    if not 1 <= n <= _BLOCK or len(padded) % _BLOCK or padded[-n:] != bytes([n]) * n:
        raise ValueError("Failed to combine shares")
    return padded[:-n]


def create_shares(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """`num` shares of `secret`, any `threshold` of which rebuild it (flwr's layout)."""
    if not 1 <= threshold <= num:
        raise ValueError(f"threshold: must be in [1, {num}], got {threshold}")
    padded = _pad(secret)
    shares = [bytearray(i.to_bytes(4, "little")) for i in range(1, num + 1)]
    for start in range(0, len(padded), _BLOCK):
        # p(x) = secret chunk + c_1 x + ... + c_{t-1} x^{t-1}; Horner from the top coefficient
        coefficients = [int.from_bytes(os.urandom(_BLOCK), "big") for _ in range(threshold - 1)]
        coefficients.append(int.from_bytes(padded[start : start + _BLOCK], "big"))
        for i in range(1, num + 1):
            y = 0
            for c in coefficients:
                y = _reduce(_clmul(y, i)) ^ c
            shares[i - 1] += y.to_bytes(_BLOCK, "big")
    return [bytes(s) for s in shares]


def combine_shares(share_list: Sequence[bytes]) -> bytes:
    """The secret the shares were made from (flwr's `combine_shares`, same input and output).

    Raises ValueError for shares of different lengths, a repeated index, or a result that is not
    a padded secret (shares that do not belong together)."""
    if not share_list:
        raise ValueError("no shares")
    length = len(share_list[0])
    if length < 4 + _BLOCK or (length - 4) % _BLOCK or any(len(s) != length for s in share_list):
        raise ValueError("shares: expected equal lengths of 4 + 16 k bytes")
    indices = tuple(int.from_bytes(s[:4], "little") for s in share_list)
    if len(set(indices)) != len(indices) or 0 in indices:
        raise ValueError("Duplicate share")
    tables = _lagrange_at_zero(indices)
    out = bytearray()
    for start in range(4, length, _BLOCK):
        secret = 0
        for table, share in zip(tables, share_list, strict=True):
            secret ^= table.times(int.from_bytes(share[start : start + _BLOCK], "big"))
        out += secret.to_bytes(_BLOCK, "big")
    return _unpad(bytes(out))
