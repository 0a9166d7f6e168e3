"""Where a participant's files live: its provisioned kit, or the simulator's shared ``local/``.

A provisioned kit keeps secrets in ``startup/`` and site-editable files in
``local/``. The FLARE simulator has no kits and gives every site a copy of one
shared ``local/`` folder, so there each site's own files sit under
``local/zenfed_sites/``. Every lookup of a kit file goes through
:func:`find_kit_file`, so that order is written once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zenfed.errors import ZenfedError

SHARED_SITE_DIR = "zenfed_sites"  # the simulator's shared local/ folder, one entry per site


@dataclass(frozen=True)
class KitFolders:
    """The folders a participant's code may read, as FLARE's workspace names them.

    Args:
        startup: The kit's ``startup/`` folder (keys, certificates); None in the simulator.
        local: The kit's ``local/`` folder (site policy, ledger); None if there is none.
        root: The kit's root folder (holding both).
        run: This job's run folder, where the participant writes its job files.
    """

    startup: Path | None
    local: Path | None
    root: Path
    run: Path

    @classmethod
    def of_workspace(cls, workspace: Any, *, job_id: str) -> KitFolders:
        """Read the folders from a FLARE ``Workspace`` (any object with its four getters); no FLARE import.

        The job's files go to ``RUN_DIR/zenfed`` inside FLARE's run folder for the job.
        """
        startup, local = workspace.get_startup_kit_dir(), workspace.get_site_config_dir()
        return cls(
            startup=Path(startup) if startup else None, local=Path(local) if local else None,
            root=Path(workspace.get_root_dir()), run=Path(workspace.get_run_dir(job_id)) / "zenfed",
        )


def find_kit_file(
    folders: KitFolders, *, startup: Sequence[str] = (), local: Sequence[str] = (), shared: Sequence[str] = (),
    what: str, hint: str, error: type[ZenfedError] = ZenfedError,
) -> Path:
    """Return the first existing kit file, looking in ``startup/``, then ``local/``, then the simulator's place.

    Args:
        folders: The participant's folders.
        startup: File names looked for in ``startup/`` (secrets, provisioned files).
        local: File names looked for in ``local/`` (files site IT edits, or the simulator's server files).
        shared: File names looked for under ``local/zenfed_sites/`` (the simulator's per-site files).
        what: What the file is, for the error message.
        hint: What to do when it is missing.
        error: The error type raised when none exists.

    Raises:
        ZenfedError: (of type ``error``) naming every place tried, if none exists.
    """
    candidates: list[Path] = []
    if folders.startup is not None:
        candidates += [folders.startup / name for name in startup]
    if folders.local is not None:
        candidates += [folders.local / name for name in local]
        candidates += [folders.local / SHARED_SITE_DIR / name for name in shared]
    for path in candidates:
        if path.is_file():
            return path
    tried = ", ".join(str(p) for p in candidates) or "no kit folder is configured"
    raise error(f"{what} not found (tried: {tried}); {hint}")
