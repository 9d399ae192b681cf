"""Secure aggregation for the study rounds: Flower's SecAgg+ protocol (docs/secure-aggregation.md).

- `params`: the protocol's parameters for one round (shares, threshold, quantization);
- `client`: the hospital side, Flower's own `secaggplus_mod` behind two small adapters;
- `server`: the coordinator side, the four SecAgg+ stages on our own fast exchange.
"""
