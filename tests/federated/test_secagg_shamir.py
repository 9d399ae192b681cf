"""`federated.secagg.shamir` is flwr's SecAgg+ secret sharing, faster: the same shares and secrets
in both directions (either side may be a hospital running flwr's own functions), and the same
refusals of shares that do not belong together."""

from __future__ import annotations

import os
import random

import pytest
from flwr.common.secure_aggregation.crypto import shamir as flwr_shamir

from federated.runtime import flwr_internals
from federated.secagg import shamir


@pytest.mark.parametrize("length", [1, 15, 16, 32, 306])
def test_shares_interoperate_with_flwr_both_ways(length: int) -> None:
    rng = random.Random(length)
    secret = os.urandom(length)
    for threshold, num in ((2, 3), (3, 5), (6, 10)):
        ours = shamir.create_shares(secret, threshold, num)
        theirs = flwr_shamir.create_shares(secret, threshold, num)
        assert [len(s) for s in ours] == [len(s) for s in theirs]
        assert [s[:4] for s in ours] == [s[:4] for s in theirs]  # same indices, same layout
        for _ in range(3):
            pick = rng.sample(range(num), rng.randint(threshold, num))
            assert flwr_shamir.combine_shares([ours[i] for i in pick]) == secret
            assert shamir.combine_shares([theirs[i] for i in pick]) == secret
            assert shamir.combine_shares([ours[i] for i in pick]) == secret


def test_fewer_than_threshold_shares_do_not_rebuild_the_secret() -> None:
    secret = os.urandom(32)
    shares = shamir.create_shares(secret, 4, 6)
    try:
        rebuilt = shamir.combine_shares(shares[:3])
    except ValueError:
        return  # the wrong polynomial usually leaves no valid padding
    assert rebuilt != secret


@pytest.mark.parametrize(
    ("shares", "reason"),
    [
        ([], "no shares"),
        ([b"\x01\x00\x00\x00" + bytes(16), b"\x02\x00\x00\x00" + bytes(15)], "equal lengths"),
        ([b"\x01\x00\x00\x00" + bytes(16), b"\x01\x00\x00\x00" + bytes(16)], "Duplicate share"),
        ([b"\x00\x00\x00\x00" + bytes(16), b"\x01\x00\x00\x00" + bytes(16)], "Duplicate share"),
        ([b"\x01\x00\x00\x00" + bytes(16), b"\x02\x00\x00\x00" + bytes(16)], "Failed to combine"),
    ],
)
def test_malformed_shares_are_refused(shares: list[bytes], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        shamir.combine_shares(shares)


def test_the_patch_makes_flowers_mod_share_with_ours() -> None:
    flwr_internals.patch_secagg_shamir()
    module = __import__("flwr.client.mod.secure_aggregation.secaggplus_mod", fromlist=["create_shares"])
    assert module.create_shares is shamir.create_shares
    flwr_internals.patch_secagg_shamir()  # idempotent
    assert module.create_shares is shamir.create_shares


def test_field_inverse() -> None:
    rng = random.Random(7)
    for a in [1, 2, 3, 0x87, (1 << 128) - 1, *(rng.getrandbits(128) or 1 for _ in range(20))]:
        assert shamir._mul(a, shamir._inverse(a)) == 1
    with pytest.raises(ValueError):
        shamir._inverse(0)


def test_the_key_parsing_patch_gives_the_mod_each_private_key_it_serialised_back() -> None:
    """`patch_secagg_key_parsing`: the PEM a setup stage wrote parses to the very key object
    (no re-parse per neighbour); a PEM it never saw parses as before, to an equal key; the cache
    keeps at most `PRIVATE_KEYS_KEPT` keys."""
    from flwr.supercore.primitives import asymmetric

    flwr_internals.patch_secagg_key_parsing()
    module = __import__("flwr.client.mod.secure_aggregation.secaggplus_mod",
                        fromlist=["bytes_to_private_key"])
    flwr_internals.patch_secagg_key_parsing()  # idempotent
    assert flwr_internals.is_patched(module.bytes_to_private_key)
    sk, _ = module.generate_key_pairs()
    pem = module.private_key_to_bytes(sk)
    assert pem == asymmetric.private_key_to_bytes(sk)
    assert module.bytes_to_private_key(pem) is sk
    other, _ = asymmetric.generate_key_pairs()
    other_pem = asymmetric.private_key_to_bytes(other)
    parsed = module.bytes_to_private_key(other_pem)
    assert parsed.private_numbers() == other.private_numbers()
    assert module.bytes_to_private_key(other_pem) is parsed  # parsed once
    for _ in range(flwr_internals.PRIVATE_KEYS_KEPT):
        module.private_key_to_bytes(asymmetric.generate_key_pairs()[0])
    again = module.bytes_to_private_key(pem)  # pushed out: parsed anew, the same key
    assert again is not sk and again.private_numbers() == sk.private_numbers()
