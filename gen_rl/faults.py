"""Named fault-injection points for the crash tests: ``GEN_RL_FAULT=<action>:<stage>[@<n>]``.

``kill:checkpoint.manifest@2`` SIGKILLs the process the second time it reaches the ``checkpoint.manifest``
stage; ``enospc:checkpoint.staged`` raises ``OSError(ENOSPC)`` there, as a full disk would. Without the
variable every point is a no-op costing one dictionary lookup. Stages are named where they are reached
(``gen_rl/checkpoint.py``, ``gen_rl/metrics.py``).
"""

from __future__ import annotations

import errno
import os
import signal
from collections import Counter
from collections.abc import Callable

ENV = "GEN_RL_FAULT"
_arrivals: Counter[str] = Counter()


def _planned() -> tuple[str, str, int] | None:
    spec = os.environ.get(ENV, "")
    if not spec:
        return None
    action, _, target = spec.partition(":")
    stage, _, count = target.partition("@")
    if action not in ("kill", "enospc") or not stage:
        raise ValueError(f"{ENV}={spec!r}: expected kill:<stage>[@n] or enospc:<stage>[@n]")
    return action, stage, int(count or 1)


def reached(stage: str, before_kill: Callable[[], None] | None = None) -> None:
    """Mark arrival at ``stage``; when ``GEN_RL_FAULT`` targets this arrival, kill the process or fail the write.

    ``before_kill`` runs just before a SIGKILL (e.g. to leave half a line in a file, as a kill mid-write does).
    """
    plan = _planned()
    if plan is None or plan[1] != stage:
        return
    _arrivals[stage] += 1
    if _arrivals[stage] != plan[2]:
        return
    if plan[0] == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"<{ENV} at {stage}>")
    if before_kill is not None:
        before_kill()
    os.kill(os.getpid(), signal.SIGKILL)
