"""What the server's round logic needs from whatever carries its tasks to the sites.

FLARE's controller implements :class:`Transport` with ``broadcast_and_wait``
(``zenfed.controllers.round_controller``); a test implements it by calling
each site's :class:`~zenfed.site.session.SiteSession` in the same process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from zenfed.protocol import Message

# Called once per site answer, as it arrives: (site name, its message).
ResultCallback = Callable[[str, Message], None]


class Transport(Protocol):
    """Sends one task to sites and hands each answer to a callback."""

    def sites(self) -> list[str]:
        """Return the names of the sites connected now."""
        ...

    def broadcast(self, *, task: str, message: Message, targets: Sequence[str], min_responses: int,
                  timeout_s: float, wait_after_min_s: float, on_result: ResultCallback) -> bool:
        """Send ``message`` as ``task`` to ``targets`` and wait for their answers.

        Args:
            task: The task name (``zenfed.protocol.TASK_*``).
            message: The task data.
            targets: The sites to send it to.
            min_responses: Answers to wait for before the ``wait_after_min_s`` grace period starts.
            timeout_s: How long a site may take.
            wait_after_min_s: How long to wait for more answers once ``min_responses`` arrived.
            on_result: Called with each answer as it arrives.

        Returns:
            False if the job was aborted while waiting, else True.
        """
        ...

    def stop(self, reason: str) -> None:
        """Stop the job: it cannot go on (too few sites, attestation quorum missed)."""
        ...
