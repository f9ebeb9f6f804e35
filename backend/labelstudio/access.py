"""Where a Label Studio is and the key it takes: the one credential this backend ever sends.

The key goes only to Label Studio's own origin (``backend.labelstudio.task_images`` decides that
per request), is left out of every ``repr`` and log line, and is sent in the form Label
Studio expects for its kind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# A personal access token is a JWT: three base64url parts separated by dots.
_JWT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class LabelStudioAccess:
    """Where Label Studio is (LABEL_STUDIO_URL) and its key (LABEL_STUDIO_API_KEY).

    The key is a legacy token, sent as ``Token <key>``, or a personal access
    token, a JWT, sent as ``Bearer <key>``. It is left out of ``repr`` so that
    logging the object does not log it.
    """

    url: str | None = None
    api_key: str | None = field(default=None, repr=False)


def authorization_header(api_key: str) -> str:
    """``Bearer <key>`` for a personal access token (a JWT), ``Token <key>`` for a legacy token."""
    key = api_key.strip()
    return f"Bearer {key}" if _JWT.fullmatch(key) else f"Token {key}"
