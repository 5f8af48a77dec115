"""`allo masks show MASK`: where a mask's selected elements are, per layer and module, as a table and a heatmap.

Reads only the counts (the JSON sidecar `locate` writes, else the file's metadata, else a count of the file) and the
tensor shapes from the safetensors header, so it is instant for a 70B mask.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

from allo.masks.io import mask_counts, mask_shapes, read_metadata

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+?)(?:\.weight|\.bias)?$")


def fractions(path: str | Path) -> tuple[dict[int, dict[str, float]], dict[str, float], float]:
    """({layer: {module: selected fraction}}, {tensor outside the layers: fraction}, overall fraction)."""
    counts, shapes = mask_counts(path), mask_shapes(path)
    layers: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    other: dict[str, float] = {}
    sel = tot = 0
    for name, shape in shapes.items():
        n, c = math.prod(shape), int(counts.get(name, 0))
        sel, tot = sel + c, tot + n
        m = LAYER.search(name)
        if m:
            cell = layers[int(m.group(1))][m.group(2)]
            cell[0] += c
            cell[1] += n
        else:
            other[name] = c / n if n else 0.0
    table = {i: {mod: s / t for mod, (s, t) in mods.items()} for i, mods in sorted(layers.items())}
    return table, other, sel / tot if tot else 0.0


def render(path: str | Path) -> str:
    table, other, overall = fractions(path)
    meta = read_metadata(path)
    sidecar = Path(path).with_suffix(".json")
    if sidecar.exists():
        import json

        meta = {**meta, **{k: v for k, v in json.loads(sidecar.read_text()).items() if k != "counts"}}
    modules = sorted({m for mods in table.values() for m in mods})
    lines = [f"{path}: {100 * overall:.3f}% of elements selected"
             + (f" (ratio {meta['ratio']}%, scope {meta.get('scope')}, lr {meta.get('lr')})" if "ratio" in meta else "")]
    if table:
        short = [m.split(".")[-1] for m in modules]
        width = [max(8, len(s)) for s in short]
        lines.append("layer  " + " ".join(f"{s:>{w}s}" for s, w in zip(short, width)))
        for i, mods in table.items():
            lines.append(f"{i:5d}  " + " ".join(f"{100 * mods[m]:{w - 1}.2f}%" if m in mods else f"{'-':>{w}s}"
                                                 for m, w in zip(modules, width)))
    for name, f in sorted(other.items()):
        lines.append(f"{name}: {100 * f:.2f}%")
    return "\n".join(lines)


def heatmap(path: str | Path, out: str | Path) -> Path:
    """PNG: layers down, modules across, colour = selected fraction (%)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    table, other, overall = fractions(path)
    modules = sorted({m for mods in table.values() for m in mods})
    grid = np.array([[100 * table[i].get(m, np.nan) for m in modules] for i in table]) if table else np.zeros((0, 0))
    fig, ax = plt.subplots(figsize=(1.1 * max(4, len(modules)) + 2, 0.28 * max(8, len(table)) + 1.5))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(modules)), [m.replace("self_attn.", "attn.") for m in modules], rotation=45, ha="right")
    ax.set_yticks(range(len(table)), [str(i) for i in table])
    ax.set_ylabel("layer")
    ax.set_title(f"{Path(path).name}: {100 * overall:.2f}% selected" +
                 (" (outside layers: " + ", ".join(f"{n.split('.')[-2]} {100 * f:.1f}%" for n, f in sorted(other.items()))
                  + ")" if other else ""), fontsize=9)
    fig.colorbar(im, ax=ax, label="% of elements selected")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
