"""Runtime settings for the Flower deployment and the environment of every Flower process.

Two modes:
- ``fast`` (default): SuperNodes with `--isolation process` behind our warm executor, shortened
  SuperNode sleeps and pull back-offs, ServerApp polling every `server_poll` seconds (per-round overhead:
  docs/benchmarks/flower.md).
- ``plain``: the supported out-of-the-box configuration: `flower-supernode` in its default
  subprocess isolation (one `flwr-clientapp` process per message), no patches, 3 s server polls.
  Much slower per round (docs/benchmarks/flower.md); the fallback if an flwr upgrade breaks a patch.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

RuntimeMode = Literal["fast", "plain"]

#: Set in every process we start: this product must never call out.
NO_PHONE_HOME_ENV: dict[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}


@dataclass(frozen=True)
class RuntimeSettings:
    """Knobs of the Flower deployment; every default works on one machine."""

    mode: RuntimeMode = "fast"
    #: SuperNode sleep when a poll finds no message (flwr: 3 s; why ours: docs/benchmarks/flower.md),
    #: while the node's messages keep coming: for `supernode_hot_s` after its last message or reply.
    supernode_idle_sleep: float = 0.1
    #: ... then each empty poll sleeps 1.5x longer, up to this: the most an idle node adds to a
    #: message's latency; every poll costs the SuperLink a request (docs/benchmarks/flower.md, "Polling").
    supernode_idle_sleep_max: float = 0.5
    supernode_hot_s: float = 2.0
    #: SuperNode sleep after its reply to a SecAgg+ stage that the server answers at once with the
    #: round's next stage (setup, share keys, collect: the unmask message follows the collect replies
    #: within the server's own work), for at most `supernode_follow_up_s` or until that message
    #: came; the hospital's ClientApp tells its hosted SuperNode (`secagg.client`). 0: off (the
    #: idle sleep above; the default until a settled A/B shows the gain: 0.02 is the value meant,
    #: docs/secure-aggregation.md, "Between the stages").
    supernode_follow_up_sleep: float = 0.0
    supernode_follow_up_s: float = 0.5
    #: SuperNode sleep while waiting for the ClientApp's reply (flwr: 0.5 s).
    supernode_reply_sleep: float = 0.02
    #: Initial back-off when an object is not stored yet (flwr: 1 s).
    pull_backoff: float = 0.02
    #: Executor poll of the SuperNode's runtime API for new ClientApp tasks (a separate executor
    #: process; in `hosted_supernode` the SuperNode wakes its executor thread instead), growing to
    #: `executor_poll_max` when no task came for a while.
    executor_poll: float = 0.05
    executor_poll_max: float = 0.5
    #: In `hosted_supernode` (the executor a thread of the SuperNode's process): the executor's
    #: Runtime API calls go to the SuperNode's handlers in the process (`flwr_internals.
    #: InProcessRuntimeClient`), not over loopback HTTP. Off: over HTTP, as a separate executor
    #: process does (benchmarks compare the two; docs/flower.md).
    executor_in_process: bool = True
    #: ServerApp poll for replies (flwr's HttpGrid.send_and_receive: 3 s).
    server_poll: float = 0.05
    #: ServerApp: the replies one reply pull got are fetched (objects, receipt) this many at a time
    #: (`flwr_internals.patch_grid_reply_pulls`); 1 (the default): one after another, as flwr does.
    #: Three unmask replies fetched in a row were a quarter of an exchange at 3 hospitals, but no
    #: gain was shown under load (and more concurrent object requests were slower at 10 hospitals
    #: before): 1 until a quiet A/B (docs/benchmarks/flower.md, "The latency of one exchange").
    server_reply_pulls: int = 1
    #: Heartbeat interval the SuperNode declares (flwr: 30 s; the SuperLink accepts >= 10). A dead
    #: node stays listed for 2x this, and a restarted authenticated node cannot rejoin until then.
    supernode_heartbeat: float = 10.0
    #: SuperLink: how long one empty full poll of a SuperNode vouches that it has nothing pending;
    #: until then its polls are answered before Flower's middleware and database (a message stored
    #: for it ends this at once). After it, one full poll re-checks the node against the database.
    superlink_idle_recheck: float = 5.0
    #: SuperLink: such a poll (and a ServerApp's reply pull that would be answered empty) is held
    #: up to this long, answered at once when a message for it is stored (a long poll: an idle
    #: node asks once per hold, not once per `supernode_idle_sleep`); 0 (the default): answered at
    #: once. Off by default: fewer requests, but mixed timings (faster or slower by the case and the
    #: load: docs/benchmarks/flower.md, "Long polls at the SuperLink"). Must stay well inside Flower's
    #: clients' 30 s timeout and its signed time stamps' window.
    superlink_long_poll: float = 0.0
    #: ... at most this many held at a time (more are answered at once, as with 0).
    superlink_long_poll_max: int = 256
    #: SuperLink: hand a message out (a SuperNode's poll, the ServerApp's reply pull) only once all
    #: its objects are pushed (`superlink_delivery`), and wake idle and held polls then, not when
    #: the message alone is stored. Off (the default): Flower's own order (the receiver's object
    #: pulls then wait for the sender's pushes, retried with a back-off). On removes those retries
    #: (docs/benchmarks/flower.md, "Messages handed out once their objects are there"), but no
    #: faster round was shown under load and one loaded run stalled unexplained: off until a quiet
    #: A/B. The deployment tests run with it on.
    superlink_deliver_complete: bool = False
    #: SuperLink CPU patches in fast mode (path-scoped middleware, early idle-poll answers, 503 on
    #: a locked database): off runs Flower's SuperLink as shipped (benchmarks compare the two; an
    #: escape hatch should a Flower quirk meet them) while the SuperNode side stays fast.
    superlink_patches: bool = True
    #: Train and evaluate messages (plain and SecAgg+) and their replies packed into one ConfigRecord
    #: each (`federated.packing`): fewer
    #: objects per message, so fewer requests to the SuperLink (off: the records travel as built;
    #: benchmarks compare the two). Both ends must run this code: a hospital reads either form.
    message_packing: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("fast", "plain"):
            raise ValueError(f"mode: must be 'fast' or 'plain', got {self.mode!r}")
        for name in ("supernode_idle_sleep", "supernode_idle_sleep_max", "supernode_reply_sleep",
                     "pull_backoff", "executor_poll", "executor_poll_max", "server_poll",
                     "superlink_idle_recheck"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 < value <= 60):
                raise ValueError(f"{name}: must be a number of seconds in (0, 60], got {value!r}")
        for fast, slow in (("supernode_idle_sleep", "supernode_idle_sleep_max"),
                           ("executor_poll", "executor_poll_max")):
            if getattr(self, slow) < getattr(self, fast):
                raise ValueError(f"{slow}: must be >= {fast} ({getattr(self, fast)!r}), "
                                 f"got {getattr(self, slow)!r}")
        follow_up = self.supernode_follow_up_sleep
        if not (isinstance(follow_up, int | float) and not isinstance(follow_up, bool)
                and 0 <= follow_up <= self.supernode_idle_sleep):
            raise ValueError("supernode_follow_up_sleep: must be a number of seconds in [0, "
                             f"supernode_idle_sleep ({self.supernode_idle_sleep!r})], got {follow_up!r}")
        window = self.supernode_follow_up_s
        if not (isinstance(window, int | float) and not isinstance(window, bool) and 0 <= window <= 10):
            raise ValueError(f"supernode_follow_up_s: must be a number of seconds in [0, 10], got {window!r}")
        if not (isinstance(self.supernode_hot_s, int | float) and 0 <= self.supernode_hot_s <= 600):
            raise ValueError("supernode_hot_s: must be a number of seconds in [0, 600], "
                             f"got {self.supernode_hot_s!r}")
        if not isinstance(self.executor_in_process, bool):
            raise ValueError(f"executor_in_process: must be true or false, got {self.executor_in_process!r}")
        hold = self.superlink_long_poll
        if not (isinstance(hold, int | float) and 0 <= hold <= 10):
            raise ValueError(f"superlink_long_poll: must be a number of seconds in [0, 10], got {hold!r}")
        held = self.superlink_long_poll_max
        if not (isinstance(held, int) and not isinstance(held, bool) and 0 <= held <= 100_000):
            raise ValueError(f"superlink_long_poll_max: must be an integer in [0, 100000], got {held!r}")
        if not isinstance(self.superlink_deliver_complete, bool):
            raise ValueError("superlink_deliver_complete: must be true or false, "
                             f"got {self.superlink_deliver_complete!r}")
        pulls = self.server_reply_pulls
        if not (isinstance(pulls, int) and not isinstance(pulls, bool) and 1 <= pulls <= 64):
            raise ValueError(f"server_reply_pulls: must be an integer in [1, 64], got {pulls!r}")
        beat = self.supernode_heartbeat
        if not (isinstance(beat, int | float) and 10 <= beat <= 1800):
            raise ValueError("supernode_heartbeat: must be a number of seconds in [10, 1800] (the "
                             f"SuperLink's range), got {beat!r}")

    @property
    def effective_server_poll(self) -> float:
        """In plain mode the ServerApp polls like flwr's own grid does (3 s)."""
        return 3.0 if self.mode == "plain" else self.server_poll


def flower_env(flwr_home: Path | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a Flower process: telemetry and update checks off, own FLWR_HOME.

    FLWR_HOME keeps installed FABs and state out of the user's ~/.flwr and apart per process tree.
    """
    env = dict(os.environ if base is None else base)
    env.update(NO_PHONE_HOME_ENV)
    # Flower starts helpers by name (`flower-superexec`, `flwr-clientapp`): they must be found in
    # the same environment as the interpreter we run, even when its bin/ is not on PATH.
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = os.pathsep.join(filter(None, [bin_dir, env.get("PATH", "")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    if flwr_home is not None:
        flwr_home.mkdir(parents=True, exist_ok=True)
        env["FLWR_HOME"] = str(flwr_home)
    return env


def disable_phone_home() -> None:
    """Set the no-telemetry variables in this process (before flwr is imported)."""
    os.environ.update(NO_PHONE_HOME_ENV)
