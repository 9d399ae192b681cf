"""Exact integer apportionment (largest remainder / Hamilton), the one rounding rule of the ledger.

Payouts split an integer pool over parties in proportion to integer weights (records used).
Floats would make the coordinator's and the auditor's numbers drift apart; this works in exact
integers, always sums to the pool, and does not depend on the order the parties are given in,
because ties are broken by id, not by position.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

#: An id: all of one apportionment's ids are strings, or all are integers (a payout apportions
#: a hospital's pool over its rounds by round number), so that they sort.
Id = TypeVar("Id", str, int)


def apportion(total: int, weights: Mapping[Id, int]) -> dict[Id, int]:
    """Split `total` over `weights` by largest remainder; ties go to the smaller id.

    Each id gets floor(total * w / W); the units left over (fewer than the number of ids with a
    positive remainder) go one each to the largest remainders total * w mod W, ties broken by id
    in ascending order (code-point order for strings). The result has the same ids as
    `weights`, sums to `total` exactly, and an id of weight 0 always gets 0.

    Raises ValueError naming the bad argument: a negative or non-integer total or weight, or
    weights summing to 0 while `total` > 0.
    """
    if type(total) is not int or total < 0:
        raise ValueError(f"total: must be an integer >= 0, got {total!r}")
    whole = 0
    for name, weight in weights.items():
        if type(weight) is not int or weight < 0:
            raise ValueError(f"weights[{name!r}]: must be an integer >= 0, got {weight!r}")
        whole += weight
    if whole == 0:
        if total == 0:
            return dict.fromkeys(weights, 0)
        raise ValueError(f"weights: sum to 0, cannot apportion {total}")
    shares: dict[Id, int] = {}
    remainders: list[tuple[int, Id]] = []
    left = total
    for name, weight in weights.items():
        quota, remainder = divmod(total * weight, whole)
        shares[name] = quota
        left -= quota
        if remainder:
            remainders.append((-remainder, name))
    if left:
        remainders.sort()
        for _, name in remainders[:left]:
            shares[name] += 1
    return shares
