"""`flower-supernode` with shortened sleeps: ``python -m federated.runtime.supernode_main ARGS``.

Takes exactly `flower-supernode`'s arguments. Before handing over to flwr's own entry point it
turns telemetry and update checks off and, unless ``EXCHANGE_FLOWER_MODE=plain``, applies the
sleep and back-off patches of `flwr_internals` (which fail loudly if flwr's layout changed).
Values come from the environment so the launcher needs no argument parsing of its own:
``EXCHANGE_SUPERNODE_IDLE_SLEEP``, ``EXCHANGE_SUPERNODE_IDLE_SLEEP_MAX``, ``EXCHANGE_SUPERNODE_HOT_S``,
``EXCHANGE_SUPERNODE_FOLLOW_UP_SLEEP``, ``EXCHANGE_SUPERNODE_FOLLOW_UP_S``,
``EXCHANGE_SUPERNODE_REPLY_SLEEP``, ``EXCHANGE_PULL_BACKOFF``, ``EXCHANGE_SUPERNODE_HEARTBEAT``,
``EXCHANGE_EXECUTOR_POLL``, ``EXCHANGE_EXECUTOR_POLL_MAX``, ``EXCHANGE_EXECUTOR_IN_PROCESS`` (0 or 1:
`hosted_supernode` only).
"""

from __future__ import annotations

import os
import sys

from federated.runtime import flwr_internals
from federated.runtime.settings import RuntimeSettings, disable_phone_home


def settings_from_env() -> RuntimeSettings:
    """The patch values this launcher was started with (defaults: RuntimeSettings())."""
    default = RuntimeSettings()
    mode = os.environ.get("EXCHANGE_FLOWER_MODE", default.mode)
    return RuntimeSettings(
        mode=mode,  # type: ignore[arg-type]  # validated in __post_init__
        supernode_idle_sleep=float(os.environ.get("EXCHANGE_SUPERNODE_IDLE_SLEEP",
                                                  default.supernode_idle_sleep)),
        supernode_idle_sleep_max=float(os.environ.get("EXCHANGE_SUPERNODE_IDLE_SLEEP_MAX",
                                                      default.supernode_idle_sleep_max)),
        supernode_hot_s=float(os.environ.get("EXCHANGE_SUPERNODE_HOT_S", default.supernode_hot_s)),
        supernode_follow_up_sleep=float(os.environ.get("EXCHANGE_SUPERNODE_FOLLOW_UP_SLEEP",
                                                       default.supernode_follow_up_sleep)),
        supernode_follow_up_s=float(os.environ.get("EXCHANGE_SUPERNODE_FOLLOW_UP_S",
                                                   default.supernode_follow_up_s)),
        executor_poll=float(os.environ.get("EXCHANGE_EXECUTOR_POLL", default.executor_poll)),
        executor_poll_max=float(os.environ.get("EXCHANGE_EXECUTOR_POLL_MAX", default.executor_poll_max)),
        supernode_reply_sleep=float(os.environ.get("EXCHANGE_SUPERNODE_REPLY_SLEEP",
                                                   default.supernode_reply_sleep)),
        pull_backoff=float(os.environ.get("EXCHANGE_PULL_BACKOFF", default.pull_backoff)),
        supernode_heartbeat=float(os.environ.get("EXCHANGE_SUPERNODE_HEARTBEAT",
                                                 default.supernode_heartbeat)),
        executor_in_process=_flag("EXCHANGE_EXECUTOR_IN_PROCESS", default.executor_in_process),
    )


def _flag(name: str, default: bool) -> bool:
    """A boolean from the environment: "1" or "0" (unset: `default`)."""
    value = os.environ.get(name)
    if value is None:
        return default
    if value not in ("0", "1"):
        raise ValueError(f"{name}: must be 0 or 1, got {value!r}")
    return value == "1"


def apply_supernode_patches(settings: RuntimeSettings) -> None:
    """The fast mode's SuperNode patches (this process must be the SuperNode's)."""
    flwr_internals.patch_supernode_sleeps(settings.supernode_idle_sleep, settings.supernode_reply_sleep,
                                          idle_sleep_max=settings.supernode_idle_sleep_max,
                                          hot_s=settings.supernode_hot_s,
                                          follow_up_sleep=settings.supernode_follow_up_sleep,
                                          follow_up_s=settings.supernode_follow_up_s)
    flwr_internals.patch_supernode_pull_backoff(settings.pull_backoff)
    flwr_internals.patch_supernode_heartbeat(settings.supernode_heartbeat)


def main() -> None:
    disable_phone_home()
    settings = settings_from_env()
    if settings.mode == "fast":
        apply_supernode_patches(settings)
        print(f"[exchange] supernode patches: idle sleep {settings.supernode_idle_sleep} s (up to "
              f"{settings.supernode_idle_sleep_max} s after {settings.supernode_hot_s} s without a "
              "message), reply sleep "
              f"{settings.supernode_reply_sleep} s, pull back-off {settings.pull_backoff} s, heartbeat "
              f"{settings.supernode_heartbeat} s", file=sys.stderr, flush=True)
    sys.argv[0] = "flower-supernode"
    flwr_internals.flower_supernode_main()


if __name__ == "__main__":
    main()
