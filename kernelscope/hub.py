"""A quick answer to "can the Hugging Face hub be reached?", so offline runs fail in seconds."""

from __future__ import annotations

import os
import urllib.error
import urllib.request


def hub_unreachable_reason(timeout: float = 5.0) -> str | None:
    """None when the hub answers at all, else a short reason (offline mode set, or no connection)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    request = urllib.request.Request(endpoint + "/api/models?limit=1", method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # an HTTP error is still an answer
    except (OSError, ValueError) as exc:
        return f"{endpoint} is unreachable ({getattr(exc, 'reason', exc)})"
    return None
