"""The Flower deployment: launchers, the warm executor, the in-process ServerApp runner.

Submodules are imported lazily so that `python -m federated.runtime.executor` and the launchers
can switch telemetry off before flwr is imported.
"""
