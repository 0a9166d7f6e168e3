"""What a site's session remembers between the tasks of one job run, kept in the run folder.

FLARE may run a site's tasks in more than one process: the simulator, when its
sites outnumber its worker processes, starts a fresh process for each task. So
that any process can take the next task, the few facts a site decides in one
task and checks in a later one live in one file of the job's run folder
(``site-session.json``, 0600 in a 0700 folder), not in memory:

- ``last_sent_values``: how many values the last update packed (a mask correction covers as many);
- ``masked_round``: the round this site last masked, its cohort, the peers' public keys, and
  whether a correction was already sent (a second one is refused);
- ``final_global_sha256`` and ``released``: the one adapter this site may release, and whether it did;
- ``accountant``: the job's privacy accountant, where the kit keeps no signed ledger (the simulator);
- ``last_task_seq`` and ``last_task_sha256``: the number and statement of the last signed task taken
  (a replayed task is refused, FLARE's resend of it recognised; ``zenfed.task_auth``).

The file holds no secret: public keys, digests and counters. What a site keeps across job
runs (strategy state, optimizer moments, the DPO reference) is in ``site/state.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from zenfed.atomic import atomic_write_bytes
from zenfed.errors import PolicyError

RUN_STATE_FILE = "site-session.json"
FORMAT = "zenfed-site-session/1"


class SiteRunState:
    """The site session's facts for one job run, read once and written through on every change.

    Args:
        folder: The job's run folder at this site.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / RUN_STATE_FILE
        self._values: dict[str, Any] = self._read()

    @property
    def resumed(self) -> bool:
        """True if an earlier process of this job run left facts here."""
        return bool(self._values)

    def get(self, key: str, default: Any = None) -> Any:
        """The fact ``key``, or ``default`` if no task set it yet."""
        return self._values.get(key, default)

    def set(self, **facts: Any) -> None:
        """Record ``facts`` (JSON data) and write the file at once, all or nothing."""
        self._values.update(facts)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = {"format": FORMAT, **self._values}
        atomic_write_bytes(self.path, json.dumps(data, sort_keys=True).encode())

    def _read(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PolicyError(f"{self.path} cannot be read ({err}); the site cannot resume this job run: restart "
                              "the job (its rounds resume from the server's checkpoint)") from None
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise PolicyError(f"{self.path} is not a zenfed site session file ({FORMAT}); restart the job")
        return data
