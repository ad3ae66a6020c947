"""Headless Chromium screenshots of local HTML files, for integration tests of the report.

Chromium comes from the Debian package (``apt-get install -y chromium``). The flags keep
it from reaching the network (closed here): no QUIC, no background/component/sync
traffic, a fresh profile per call, and no sandbox because tests may run as root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
)


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable (``$CHROMIUM`` first), or None when there is none."""
    override = os.environ.get("CHROMIUM")
    if override and shutil.which(override):
        return shutil.which(override)
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(
    html_path: str | Path,
    png_path: str | Path,
    width: int = 1400,
    height: int = 1000,
    wait_ms: int = 2000,
    timeout_s: float = 120.0,
) -> Path:
    """Render ``html_path`` headless at ``width`` × ``height`` and save a PNG to ``png_path``.

    ``wait_ms`` is Chromium's virtual time budget: how long page scripts and loads may run
    before the capture. Raises RuntimeError when Chromium is absent, fails or writes nothing.
    """
    chromium = find_chromium()
    if chromium is None:
        raise RuntimeError("no Chromium found (apt-get install -y chromium)")
    html_path, png_path = Path(html_path).resolve(), Path(png_path).resolve()
    if not html_path.is_file():
        raise FileNotFoundError(html_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    png_path.unlink(missing_ok=True)  # so a stale file never passes for a fresh capture
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [
            chromium,
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--screenshot={png_path}",
            f"--window-size={width},{height}",
            f"--virtual-time-budget={wait_ms}",
            html_path.as_uri(),
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0 or not png_path.is_file() or png_path.stat().st_size == 0:
        raise RuntimeError(f"chromium failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return png_path
