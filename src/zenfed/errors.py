"""Typed errors. Each message says what was wrong and what to do about it."""


class ZenfedError(Exception):
    """Base class of every error zenfed raises on purpose."""


class SpecError(ZenfedError):
    """A job spec, site policy or project file is malformed."""


class PolicyError(ZenfedError):
    """A site policy refuses the work, or lacks what the work needs."""


class DataError(ZenfedError):
    """A dataset file is missing or has a bad line."""


class ModelError(ZenfedError):
    """A base model cannot be found, prepared or loaded."""


class AdapterError(ZenfedError):
    """An adapter state dict does not match the expected names or shapes."""


class DeploymentError(ZenfedError):
    """A provisioned deployment cannot be provisioned, started, reached or stopped."""


class JobError(ZenfedError):
    """A job cannot be exported, submitted or completed."""
