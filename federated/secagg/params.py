"""The SecAgg+ parameters of one round, chosen as Flower's `SecAggPlusWorkflow` chooses them.

Why a module of its own: the coordinator checks at submission whether a study can have secure
aggregation (`MIN_HOSPITALS`), and the server picks the threshold from the round's hospitals;
both must agree with what the hospitals' `secaggplus_mod` accepts.
"""

from __future__ import annotations

from dataclasses import dataclass

from federated.study_spec import SECAGG_MIN_HOSPITALS

#: Fewest hospitals a study needs for secure aggregation: with two, each one learns the other's
#: update from the aggregate; with three, a round still completes when one drops out.
MIN_HOSPITALS = SECAGG_MIN_HOSPITALS
#: Flower's defaults (SecAggPlusWorkflow): clip to +-8, quantize to 2**22 levels, masks mod 2**32.
CLIPPING_RANGE = 8.0
QUANTIZATION_RANGE = 2**22
MODULUS_RANGE = 2**32
#: Weights (records used) are divided by this before quantization (Flower's default 1000).
MAX_WEIGHT = 1000.0


class SecAggParamsError(ValueError):
    """The round's hospitals cannot run SecAgg+ with these parameters."""


@dataclass(frozen=True)
class SecAggParams:
    """One round's protocol parameters (sent to every hospital in the setup stage)."""

    sample_num: int
    share_num: int
    threshold: int
    clipping_range: float = CLIPPING_RANGE
    quantization_range: int = QUANTIZATION_RANGE
    modulus_range: int = MODULUS_RANGE
    max_weight: float = MAX_WEIGHT

    @property
    def max_dropouts(self) -> int:
        """How many of the round's hospitals may drop out and the round still completes."""
        return self.share_num - self.threshold

    @classmethod
    def for_round(cls, hospitals: int, *, min_members: int = 1) -> SecAggParams:
        """Every hospital shares with every other (share_num = sample_num; SecAgg+ with a full
        graph, fine for the tens of hospitals a study has) and a strict majority reconstructs:
        threshold = n // 2 + 1, at least 2 and at least the study's `min_members`, so the
        server can never obtain both secrets of one hospital from the others, and an aggregate
        always has at least `min_members` inputs."""
        if hospitals < MIN_HOSPITALS:
            raise SecAggParamsError(
                f"secure aggregation needs at least {MIN_HOSPITALS} hospitals in a "
                f"round, {hospitals} are connected"
            )
        threshold = max(2, hospitals // 2 + 1, min_members)
        if threshold > hospitals:
            raise SecAggParamsError(
                f"the study needs {min_members} hospitals per aggregate, only {hospitals} are connected"
            )
        if hospitals > MODULUS_RANGE // QUANTIZATION_RANGE:
            raise SecAggParamsError(f"{hospitals} hospitals could overflow the {MODULUS_RANGE} modulus")
        return cls(sample_num=hospitals, share_num=hospitals, threshold=threshold)

    def q_ratio(self, num_examples: int) -> int:
        """The quantized weight `secaggplus_mod` puts in front of a masked vector (same formula,
        same float arithmetic), so the server can predict the unmasked weight sum exactly."""
        return round(num_examples / self.max_weight * self.quantization_range)
