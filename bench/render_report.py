"""Render a report.html to a PNG with headless Chromium, to look at the page without a browser.

    python bench/render_report.py runs/x/report.html --out /tmp/report.png
    python bench/render_report.py runs/x/report.html --out /tmp/report.png --window-size 1400,8000

Chromium runs with a fresh temporary profile and with background networking, sync and component
updates off; the report is self-contained, so nothing needs the network. Prints the PNG path.
Needs `/usr/bin/chromium` (Debian/Ubuntu: `apt-get install -y chromium`) or `--chromium PATH`.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_CHROMIUM = Path("/usr/bin/chromium")
INSTALL_HINT = "install it with `apt-get update && apt-get install -y chromium` (or pass --chromium PATH)"


def find_chromium(explicit: str | None) -> Path:
    """The Chromium binary: `explicit`, else /usr/bin/chromium, else `chromium`/`chromium-browser` on PATH."""
    if explicit:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise FileNotFoundError(f"--chromium {path} is not an executable file")
        return path
    if DEFAULT_CHROMIUM.is_file():
        return DEFAULT_CHROMIUM
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return Path(found)
    raise FileNotFoundError(f"Chromium not found at {DEFAULT_CHROMIUM} or on PATH; {INSTALL_HINT}")


def render(html: Path, out_png: Path, chromium: Path, window_size: str = "1400,4000", timeout_s: float = 120.0) -> Path:
    """Screenshot `html` into `out_png` (window `W,H` pixels); returns `out_png`."""
    out_png.parent.mkdir(parents=True, exist_ok=True)
    profile = tempfile.mkdtemp(prefix="render-report-profile-")
    fd, tmp_png = tempfile.mkstemp(prefix=f".{out_png.name}.", suffix=".png", dir=out_png.parent)
    os.close(fd)
    command = [str(chromium), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={tmp_png}",
               f"--window-size={window_size}", html.resolve().as_uri()]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0 or os.path.getsize(tmp_png) == 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"chromium exited with {done.returncode} and wrote no screenshot: {' | '.join(tail)}")
        os.chmod(tmp_png, 0o644)  # mkstemp creates 0600
        os.replace(tmp_png, out_png)
    finally:
        if os.path.exists(tmp_png):
            os.unlink(tmp_png)
        shutil.rmtree(profile, ignore_errors=True)
    return out_png


def _window_size(text: str) -> str:
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"window size must be WIDTH,HEIGHT in pixels, got {text!r}")
    return text.replace(" ", "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path, help="the report.html to render")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: next to the HTML, .png)")
    parser.add_argument("--window-size", type=_window_size, default="1400,4000", help="WIDTH,HEIGHT in pixels")
    parser.add_argument("--chromium", default=None, help="path of the Chromium binary")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before giving up on Chromium")
    args = parser.parse_args(argv)
    try:
        if not args.html.is_file():
            raise FileNotFoundError(f"report not found: {args.html}")
        chromium = find_chromium(args.chromium)
        out = render(args.html, args.out or args.html.with_suffix(".png"), chromium, args.window_size, args.timeout)
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
