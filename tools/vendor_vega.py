"""Write `.dvc/plots_offline/index.html`: DVC's plots page with Vega, Vega-Lite and vega-embed
inlined from their published npm packages, so `dvc plots show` / `dvc plots diff` render with no
network. The versions are the ones dvc-render loads from a CDN; each package is checked against
the integrity hash the npm registry publishes, and its licence is copied beside the page.

    python tools/vendor_vega.py        # needs the npm registry once; the result is committed
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
import urllib.request
from pathlib import Path

PACKAGES = {"vega": "5.20.2", "vega-lite": "5.2.0", "vega-embed": "6.18.2"}
REGISTRY = "https://registry.npmjs.org"
OUT = Path(__file__).resolve().parents[1] / ".dvc" / "plots_offline"

PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def package_files(name: str, version: str) -> tuple[str, str]:
    """(minified build, licence) of one npm package version, checked against its published integrity."""
    meta = json.loads(fetch(f"{REGISTRY}/{name}/{version}"))
    tarball = fetch(meta["dist"]["tarball"])
    algorithm, expected = meta["dist"]["integrity"].split("-", 1)
    if base64.b64encode(hashlib.new(algorithm, tarball).digest()).decode() != expected:
        raise SystemExit(f"{name}@{version}: the tarball does not match the registry's integrity hash")
    with tarfile.open(fileobj=io.BytesIO(tarball)) as archive:
        build = archive.extractfile(f"package/build/{name}.min.js").read().decode()
        licence = archive.extractfile("package/LICENSE").read().decode()
    return build, licence


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    scripts = []
    for name, version in PACKAGES.items():
        build, licence = package_files(name, version)
        (OUT / f"LICENSE.{name}").write_text(licence)
        if "</script" in build or any(f"{{{key}}}" in build for key in ("plot_divs", "scripts", "refresh_tag")):
            raise SystemExit(f"{name}@{version}: its build cannot be inlined in the page as it stands")
        scripts.append(f"    <!-- {name} {version}, BSD-3-Clause: LICENSE.{name} -->\n    <script>{build}</script>")
    (OUT / "index.html").write_text(PAGE.format(scripts="\n".join(scripts)))
    print(f"{OUT / 'index.html'}: {', '.join(f'{n} {v}' for n, v in PACKAGES.items())}")


if __name__ == "__main__":
    main()
