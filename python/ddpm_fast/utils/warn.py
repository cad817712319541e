"""One warning per cause and process, whatever the warning filters (pytest's or the user's) say."""

from __future__ import annotations

import threading
import warnings

_SEEN: set[str] = set()
_LOCK = threading.Lock()


def warn_once(key: str, message: str, category: type[Warning] = RuntimeWarning, stacklevel: int = 3) -> None:
    """``warnings.warn(message)`` the first time ``key`` is seen in this process, nothing afterwards."""
    with _LOCK:
        if key in _SEEN:
            return
        _SEEN.add(key)
    warnings.warn(message, category, stacklevel=stacklevel)
