"""Optional PNG of a run: view completeness and suspicions over time, detection CDF.

matplotlib is not a dependency of meshd; when it is not importable the plot is
skipped with a note, and the JSON holds everything the plot would show.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

try:
    import matplotlib  # type: ignore[import-not-found,unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]

    MISSING = ""
except ImportError:  # pragma: no cover - depends on the environment
    plt = None
    MISSING = "matplotlib is not installed"


#: (JSON key, percentage) of the dissemination levels plotted.
LEVELS = (("t50_s", 50), ("t90_s", 90), ("t99_s", 99), ("t99.99_s", 99.99), ("t100_s", 100))


def plot(doc: dict[str, Any], path: Path) -> Path | None:
    """Write the PNG for ``doc`` (one row of panels per run); None without matplotlib."""
    if plt is None:
        return None
    runs = list(doc["runs"].items())
    fig, axes = plt.subplots(len(runs), 2, figsize=(12, 3.5 * len(runs)), squeeze=False)
    for row, (name, run) in zip(axes, runs, strict=True):
        r = run["result"]
        ts = r["timeseries"]
        t = [s["t"] for s in ts]
        ax = row[0]
        ax.plot(t, [s["incomplete_nodes"] for s in ts], label="nodes with incomplete view")
        ax.plot(t, [s["suspect_pairs"] for s in ts], label="SUSPECT entries")
        ax.plot(t, [s["dead_pairs"] for s in ts], label="DEAD entries")
        ax.set_xlabel("simulated time (s)")
        ax.set_title(f"{doc['scenario']} [{name}]")
        ax.legend(fontsize="small")
        ax = row[1]
        for c in r["crashes"]:
            d = c["dead_s"]
            if d["n"]:
                ax.axvline(d["median"], linestyle="--", label=f"crash {c['node']}: median DEAD")
        for item in r["dissemination"]["per_item"][:10]:
            pts = [(item[k], y) for k, y in LEVELS if item.get(k) is not None]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", alpha=0.5)
        ax.set_xlabel("seconds after injection / crash")
        ax.set_ylabel("% of nodes reached")
        ax.set_title("dissemination and detection")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
