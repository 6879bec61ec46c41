"""Fetching the bytes behind a URL column entry: local paths, `file://` URLs and `http(s)://` URLs.

Every failure becomes a `SampleError` with a countable reason (`missing_file`, `http_404`, `download_timeout`,
...), so one dead link costs one sample and never the shard.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .resize import SampleError

DEFAULT_USER_AGENT = "defocus-clip/0.1 (+https://github.com/; image-text dataset builder; img2dataset-compatible)"

# Server-side and throttling codes are worth another try; 4xx otherwise means the link is gone.
RETRY_HTTP_CODES = {408, 425, 429, 500, 502, 503, 504}


@dataclass
class FetchConfig:
    """Download options; `timeout` is per attempt, `retries` counts extra attempts after the first."""

    timeout: float = 10.0
    retries: int = 2
    retry_backoff: float = 0.5  # seconds, doubled on each retry
    user_agent: str = DEFAULT_USER_AGENT
    max_bytes: int = 50 * 1024 * 1024  # reject bodies above this (a guard against endless streams)
    threads: int = 16  # concurrent downloads per worker process (http only)
    base_dir: str | None = None  # relative local paths are resolved against this (default: the input file's folder)


def is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def local_path(url: str, base_dir: str | None = None) -> Path:
    """The filesystem path behind a local path or `file://` URL."""
    if url.startswith("file://"):
        parsed = urllib.parse.urlparse(url)
        return Path(urllib.request.url2pathname(parsed.path))
    p = Path(os.path.expanduser(url))
    if not p.is_absolute() and base_dir:
        p = Path(base_dir) / p
    return p


def read_local(url: str, cfg: FetchConfig) -> bytes:
    path = local_path(url, cfg.base_dir)
    try:
        size = path.stat().st_size
        if size > cfg.max_bytes:
            raise SampleError("too_large", f"{path}: {size} bytes > max_bytes={cfg.max_bytes}")
        return path.read_bytes()
    except FileNotFoundError:
        raise SampleError("missing_file", f"{path}: no such file") from None
    except IsADirectoryError:
        raise SampleError("missing_file", f"{path}: is a directory") from None
    except PermissionError as e:
        raise SampleError("unreadable_file", f"{path}: {e}") from None
    except OSError as e:
        raise SampleError("unreadable_file", f"{path}: {e}") from None


def download(url: str, cfg: FetchConfig) -> bytes:
    """GET `url` with timeouts and retries; transient failures are retried with exponential backoff."""
    last: SampleError | None = None
    for attempt in range(cfg.retries + 1):
        if attempt:
            time.sleep(cfg.retry_backoff * 2 ** (attempt - 1))
        try:
            req = urllib.request.Request(url, headers={"User-Agent": cfg.user_agent})
            with urllib.request.urlopen(req, timeout=cfg.timeout) as resp:
                data = resp.read(cfg.max_bytes + 1)
            if len(data) > cfg.max_bytes:
                raise SampleError("too_large", f"body exceeds max_bytes={cfg.max_bytes}")
            return data
        except SampleError:
            raise
        except urllib.error.HTTPError as e:
            last = SampleError(f"http_{e.code}", f"HTTP {e.code} {e.reason}")
            if e.code not in RETRY_HTTP_CODES:
                raise last from None
        except TimeoutError as e:
            last = SampleError("download_timeout", f"timed out after {cfg.timeout}s: {e}")
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                last = SampleError("download_timeout", f"timed out after {cfg.timeout}s")
            else:
                last = SampleError("download_error", f"{e.reason}")
        except Exception as e:  # connection resets, bad status lines, invalid URLs
            last = SampleError("download_error", f"{type(e).__name__}: {e}")
    assert last is not None
    raise last


def fetch(url: str, cfg: FetchConfig) -> bytes:
    """The bytes behind `url`, or `SampleError`."""
    if not isinstance(url, str) or not url.strip():
        raise SampleError("missing_url", "empty url")
    url = url.strip()
    if is_remote(url):
        return download(url, cfg)
    if "://" in url and not url.startswith("file://"):
        raise SampleError("unsupported_url", f"{url[:80]}: only local paths, file:// and http(s):// are supported")
    return read_local(url, cfg)
