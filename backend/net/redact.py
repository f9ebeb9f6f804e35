"""URLs as logs and error messages may show them: no user, password, query string or fragment.

Presigned URLs carry credentials in their query string and Redis URLs in their user part;
every message that names a URL goes through ``without_credentials``.
"""

from __future__ import annotations

from urllib.parse import urlsplit


def without_credentials(url: str) -> str:
    """``scheme://host:port/path`` of ``url`` (a ``data:`` URI is cut after its header)."""
    if url.lower().startswith("data:"):
        return url.partition(",")[0][:60] + ",..."
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(an invalid URL)"
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else parts.path
