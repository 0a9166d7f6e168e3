"""The class allow-list that lets FLARE build zenfed's components from a code-free job."""

from __future__ import annotations

ZENFED_PREFIX = "zenfed."


def class_allow_list() -> list[str]:
    """Return FLARE's default allow-list plus the zenfed package prefix."""
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

    return [*DEFAULT_CLASS_ALLOW_LIST, ZENFED_PREFIX]
