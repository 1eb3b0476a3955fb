"""A quick check whether the Hugging Face Hub can be reached at all.

Without it, an offline machine spends close to a minute in retries per ``from_pretrained`` call
before falling back to a local source. When the hub is unreachable we set ``HF_HUB_OFFLINE=1`` so
that transformers and datasets use their local caches at once.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Return (reachable, reason). Honors HF_HUB_OFFLINE and HF_ENDPOINT."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False, "HF_HUB_OFFLINE=1"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True, "reachable"
    except OSError as exc:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        return False, f"{host} unreachable ({exc})"
