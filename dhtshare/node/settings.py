"""Node settings kept across restarts (``home/settings.json``): rate limits, log level and
bootstrap nodes.

``node start`` options that are not given take the value of the last start; options that
are given replace it. The node writes the file once it is up, so a start that fails does
not change what the next one uses.
"""

from __future__ import annotations

import contextlib
import ipaddress
from typing import Any

from dhtshare.atomic import read_json, write_json
from dhtshare.home import Home

__all__ = ["LOG_LEVELS", "Settings", "load", "merge", "save"]

LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LOG_LEVEL = "info"
Settings = dict[str, Any]
"""``upload_limit`` and ``download_limit`` (bytes/s, ``None``: no limit), ``log_level``,
``bootstrap`` (the ``--bootstrap`` addresses last given: a node that loses every contact
joins again through them, also after a restart without ``--bootstrap``)."""

MAX_BOOTSTRAP = 8


def _limit(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1e15:
        return float(value)
    return None


def load(home: Home) -> Settings:
    """The saved settings, each checked; a missing or damaged file gives the defaults."""
    doc: Any = {}
    with contextlib.suppress(OSError, ValueError):
        doc = read_json(home.settings)
    if not isinstance(doc, dict):
        doc = {}
    level = doc.get("log_level")
    return {
        "upload_limit": _limit(doc.get("upload_limit")),
        "download_limit": _limit(doc.get("download_limit")),
        "log_level": level if level in LOG_LEVELS else DEFAULT_LOG_LEVEL,
        "bootstrap": _addresses(doc.get("bootstrap")),
    }


def _addresses(value: Any) -> tuple[tuple[str, int], ...]:
    """The saved ``--bootstrap`` addresses that are IP addresses and ports (at most 8)."""
    out: list[tuple[str, int]] = []
    for item in value[:MAX_BOOTSTRAP] if isinstance(value, list) else ():
        if not isinstance(item, list) or len(item) != 2:
            continue
        host, port = item
        if not isinstance(host, str) or isinstance(port, bool) or not isinstance(port, int):
            continue
        if not 0 < port < 65536:
            continue
        with contextlib.suppress(TypeError, ValueError):
            out.append((str(ipaddress.ip_address(host)), port))
    return tuple(out)


def merge(saved: Settings, **given: Any) -> Settings:
    """``saved`` with every value in ``given`` that is not ``None`` (a limit of 0 given
    on the command line means no limit, and is kept as such)."""
    out = dict(saved)
    for key, value in given.items():
        if value is not None and value != ():
            out[key] = _limit(value) if key.endswith("_limit") else value
    return out


def save(home: Home, settings: Settings) -> None:
    """Write ``settings`` atomically."""
    write_json(home.settings, settings)
