"""Fixtures shared by the federated tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: torch's thread pool only adds contention."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def task_identity() -> Iterator[Any]:
    """Flower's process-global TaskIdentity, restored afterwards. A test that builds a server's
    instruction `Message` itself (no grid) sets it first, as the ServerApp's process does:
    `Message()` reads the run and task ids from it, and relying on whatever an earlier test's
    grid left there made such a test pass in the suite and fail alone."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    yield TaskIdentity
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
