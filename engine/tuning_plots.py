"""Charts for ``tuanyuan tune --plot``: rings over the population, and reach over time.

matplotlib is imported here only, and drawn through its Agg canvas without pyplot, so
no display and no global backend setting is involved.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine import tuning

#: Fewest and most cells across the density map; between them, as many as leave about
#: 25 devices to a cell on average, so a small population does not turn to noise.
_MIN_BINS, _MAX_BINS = 40, 240
_DEVICES_PER_BIN = 25
# Colours of the density classes of sampled centres.
_CLASS_COLOURS = ("#d62728", "#ff7f0e", "#2ca02c")


def _figure(width: float = 7.5, height: float = 6.5):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError(
            "--plot needs matplotlib: pip install matplotlib (or the bench extra)"
        ) from None
    figure = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(figure)
    return figure


def _label(metres: float) -> str:
    return f"{metres / 1000:g} km" if metres >= 1000 else f"{metres:g} m"


def rings(
    path: Path,
    lat: np.ndarray,
    lng: np.ndarray,
    centre: tuple[float, float],
    radii: list[float],
    title: str,
    *,
    labels: list[str] | None = None,
    centres: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    extent_m: float | None = None,
) -> None:
    """Devices per km² around ``centre`` in the azimuthal equidistant projection (the
    distance from the centre is the great-circle distance, so each ring is drawn as the
    true circle of its radius), the rings on top. ``centres`` (lat, lng, class index)
    are drawn as dots coloured by density class. The map reaches ``extent_m`` metres
    from the centre each way (default: a quarter beyond the widest ring)."""
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Circle

    extent = 1.25 * max(radii) if extent_m is None else extent_m
    x, y = tuning.project(lat, lng, *centre)
    shown = int(((np.abs(x) <= extent) & (np.abs(y) <= extent)).sum())
    bins = int(np.clip(np.sqrt(shown / _DEVICES_PER_BIN), _MIN_BINS, _MAX_BINS))
    counts, x_edges, y_edges = np.histogram2d(
        x, y, bins=bins, range=[[-extent, extent], [-extent, extent]]
    )
    cell_km2 = (2 * extent / bins / 1000.0) ** 2
    per_km2 = np.ma.masked_equal(counts.T / cell_km2, 0.0)

    figure = _figure()
    axes = figure.add_subplot()
    axes.set_facecolor("#f4f4f4")
    if per_km2.count():
        mesh = axes.pcolormesh(
            x_edges / 1000.0,
            y_edges / 1000.0,
            per_km2,
            norm=LogNorm(vmin=per_km2.min(), vmax=per_km2.max()),
            cmap="viridis",
            shading="flat",
        )
        figure.colorbar(mesh, ax=axes, label="devices per km²")
    if centres is not None:
        cx, cy = tuning.project(centres[0], centres[1], *centre)
        inside = (np.abs(cx) <= extent) & (np.abs(cy) <= extent)
        for index, name in enumerate(tuning.CLASSES):
            mine = inside & (centres[2] == index)
            if mine.any():
                axes.scatter(
                    cx[mine] / 1000.0,
                    cy[mine] / 1000.0,
                    s=9,
                    color=_CLASS_COLOURS[index],
                    edgecolors="white",
                    linewidths=0.4,
                    label=f"sampled centre: {name}",
                    zorder=3,
                )
    for index, radius in enumerate(radii):
        text = labels[index] if labels else _label(radius)
        axes.add_patch(
            Circle((0.0, 0.0), radius / 1000.0, fill=False, color="white", lw=1.6, zorder=4)
        )
        axes.add_patch(
            Circle((0.0, 0.0), radius / 1000.0, fill=False, color="#d62728", lw=0.9, zorder=5)
        )
        angle = np.radians(35.0 + 12.0 * index)
        axes.annotate(
            text,
            (radius / 1000.0 * np.cos(angle), radius / 1000.0 * np.sin(angle)),
            color="black",
            fontsize=8,
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8},
            zorder=6,
        )
    axes.plot([0.0], [0.0], marker="+", color="#d62728", markersize=10, zorder=6)
    axes.set_xlim(-extent / 1000.0, extent / 1000.0)
    axes.set_ylim(-extent / 1000.0, extent / 1000.0)
    axes.set_aspect("equal")
    axes.set_xlabel("km east of the centre")
    axes.set_ylabel("km north of the centre")
    axes.set_title(title, fontsize=10)
    if centres is not None:
        axes.legend(loc="lower left", fontsize=7, framealpha=0.8)
    figure.savefig(path, bbox_inches="tight")


def reach(
    path: Path,
    schedule,
    title: str,
    *,
    static: np.ndarray | None = None,
    moving: tuple[np.ndarray, np.ndarray] | None = None,
    bands: dict[str, np.ndarray] | None = None,
) -> None:
    """Cumulative recipients against hours since the alert started.

    ``static``: cumulative recipients at the end of each stage (one centre, nobody
    moving); ``moving``: (step times in seconds, cumulative at each step) of the
    continuous geofence; ``bands``: p10/p50/p90 of the cumulative recipients per stage
    over sampled centres.
    """
    starts = np.array([*schedule.stage_starts(), schedule.duration_s], dtype=float) / 3600.0
    figure = _figure(8.0, 4.8)
    axes = figure.add_subplot()

    def steps(values: np.ndarray) -> np.ndarray:
        return np.append(values, values[-1])

    if static is not None:
        axes.step(starts, steps(static), where="post", lw=1.8, label="nobody moves")
    if moving is not None:
        times, curve = moving
        hours = np.append(times, schedule.duration_s) / 3600.0
        axes.step(hours, steps(curve), where="post", lw=1.4, label="people moving")
    if bands is not None:
        axes.fill_between(
            starts,
            steps(bands["p10"]),
            steps(bands["p90"]),
            step="post",
            alpha=0.25,
            label="p10 to p90 of sampled centres",
        )
        axes.step(starts, steps(bands["p50"]), where="post", lw=1.8, label="p50")
    for start in starts[1:-1]:
        axes.axvline(start, color="grey", ls=":", lw=0.8)
    axes.set_xlim(0.0, starts[-1])
    axes.set_ylim(bottom=0.0)
    axes.set_xlabel("hours since the alert started")
    axes.set_ylabel("devices notified")
    axes.yaxis.set_major_formatter(lambda value, _pos: f"{value:,.0f}")
    axes.set_title(title, fontsize=10)
    axes.legend(loc="upper left", fontsize=8)
    axes.grid(alpha=0.3)
    figure.savefig(path, bbox_inches="tight")
