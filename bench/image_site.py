"""Stand in for a GPU machine's image on the CPU: link the named distributions, and every distribution they require
(markers evaluated, extras left out), from this interpreter's site-packages into DIR, and nothing else.

`bash bench/gpu_check.sh verify` puts DIR, and the brought wheels installed with --no-index, in front of a bare
venv, so that anything `make gpu-check` imports which is neither in the image nor among the wheels fails here, on
the CPU, instead of on the GPU. The image is taken at its smallest (these distributions and what they need): a
check that passes here passes on any image that has them.
`--pins NEED... -- IMAGE...` prints, as name==version from this interpreter, every distribution NEED and its
requirements hold beyond what IMAGE and its requirements hold: the wheels a machine with that image lacks
(`bash bench/gpu_check.sh fetch` downloads them).
Usage: python bench/image_site.py DIR DIST [DIST ...]
       python bench/image_site.py --pins NEED [NEED ...] -- IMAGE [IMAGE ...]
"""
from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement


def closure(names: list[str]) -> dict[str, metadata.Distribution]:
    """The distributions `names` and all they require, by normalised name."""
    seen: dict[str, metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"image_site: {name} is not installed in {sys.prefix}, so the image cannot hold it")
        seen[name] = dist
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def link(dists: dict[str, metadata.Distribution], out: Path) -> int:
    """Symlink each distribution's top-level files and folders (its modules and its .dist-info) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    linked = 0
    for dist in dists.values():
        root = Path(dist.locate_file(""))
        for top in sorted({Path(f).parts[0] for f in dist.files or [] if not Path(f).parts[0].startswith("..")}):
            src, dst = root / top, out / top
            if src.exists() and not dst.exists() and top != "__pycache__":
                dst.symlink_to(src)
                linked += 1
    return linked


def main() -> None:
    if sys.argv[1:2] == ["--pins"] and "--" in sys.argv:
        cut = sys.argv.index("--")
        image = closure(sys.argv[cut + 1:])
        need = closure(sys.argv[2:cut])
        print("\n".join(f"{d.metadata['Name']}=={d.version}" for n, d in sorted(need.items()) if n not in image))
        return
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    dists = closure(sys.argv[2:])
    n = link(dists, Path(sys.argv[1]))
    print(f"image_site: {len(dists)} distributions ({', '.join(sorted(dists))}), {n} entries linked")


if __name__ == "__main__":
    main()
