"""Put a uv binary at .tools/bin/uv using only the standard library.

`make` uses uv from PATH when there is one. A fresh Debian 12 has python3 but often no pip,
and where pip exists it refuses to install into the system Python (PEP 668,
"externally-managed-environment"). So this script asks PyPI's simple index (the JSON form of
PEP 691) for the pinned uv release, downloads the wheel for this machine, checks its sha256
against the hash the index publishes, and extracts the uv executable. Nothing is installed
outside the checkout.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import stat
import sys
import urllib.request
import zipfile
from pathlib import Path

UV_VERSION = "0.13.9"
ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / ".tools" / "bin" / "uv"
TIMEOUT = 60  # seconds per request

# wheel platform tags that run on each machine (manylinux first, musllinux as a fallback)
PLATFORM_TAGS = {
    "x86_64": ("manylinux_2_17_x86_64", "musllinux_1_1_x86_64"),
    "aarch64": ("manylinux_2_17_aarch64", "manylinux_2_28_aarch64", "musllinux_1_1_aarch64"),
}


def pick_wheel(files: list[dict[str, object]], machine: str) -> dict[str, object]:
    prefix = f"uv-{UV_VERSION}-"
    wheels = [
        f
        for f in files
        if str(f.get("filename", "")).startswith(prefix)
        and str(f["filename"]).endswith(".whl")
        and not f.get("yanked")
    ]
    for tag in PLATFORM_TAGS.get(machine, ()):
        for f in wheels:
            if tag in str(f["filename"]):
                return f
    names = ", ".join(str(f["filename"]) for f in wheels)
    raise SystemExit(f"bootstrap_uv: no uv {UV_VERSION} wheel for {machine} among: {names}")


def main() -> int:
    if TARGET.exists():
        return 0
    index = os.environ.get("UV_BOOTSTRAP_INDEX", "https://pypi.org/simple")
    req = urllib.request.Request(
        f"{index.rstrip('/')}/uv/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
        project = json.load(resp)
    wheel = pick_wheel(project["files"], platform.machine())
    print(f"bootstrap_uv: downloading {wheel['filename']}", file=sys.stderr)
    with urllib.request.urlopen(str(wheel["url"]), timeout=TIMEOUT) as resp:
        data = resp.read()
    expected = wheel["hashes"]["sha256"]  # type: ignore[index]
    if hashlib.sha256(data).hexdigest() != expected:
        raise SystemExit("bootstrap_uv: sha256 of the downloaded wheel does not match PyPI's")
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        member = next(n for n in zf.namelist() if n.endswith("/scripts/uv"))
        TARGET.parent.mkdir(parents=True, exist_ok=True)
        tmp = TARGET.with_suffix(".part")
        tmp.write_bytes(zf.read(member))
    tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.replace(tmp, TARGET)
    print(f"bootstrap_uv: {TARGET}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
