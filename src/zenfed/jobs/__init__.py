"""JobSpec -> FLARE job folder."""

from zenfed.jobs.export import export_job

__all__ = ["export_job"]
