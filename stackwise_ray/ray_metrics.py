"""Phases' progress as Ray metrics, so it shows wherever Ray's metrics go: each node's
Prometheus endpoint, the dashboard's Metrics view (with Prometheus and Grafana:
cluster/README.md), any scraper. Prometheus sees each name with Ray's `ray_` prefix.

Tags say whose numbers they are: the experiment (a sweep's or run's name), the trial (its
id, or the run's name), the phase id and the stack. The rank-0 worker of a training phase
sets the step, loss and speed gauges while it trains; the driver of the run (the trial)
sets the phase-end numbers and counts phases trained and reused.
"""

from __future__ import annotations

import functools
import threading

TAGS = ("experiment", "trial", "phase", "stack")
PREFIX = "stackwise_"

GAUGES = {
    "step": "optimizer steps done in the phase now training",
    "steps": "optimizer steps the phase trains in all",
    "train_loss": "training loss at the last logged step",
    "tokens_per_s": "training tokens per second of the phase (global batch)",
    "val_loss": "validation loss of the full rack at the end of the phase",
    "cache_bytes": "bytes of the activation cache the phase read (0: none)",
    "cache_build_s": "seconds spent building the phase's cache",
    "phase_wall_s": "wall time of the phase (0 for a reused phase)",
}
COUNTERS = {
    "phases_trained": "phases trained (or recovered from a checkpoint)",
    "phases_reused": "finished phases reused instead of trained",
}
NAMES = [PREFIX + n for n in GAUGES] + [PREFIX + n + "_total" for n in COUNTERS]  # as Prometheus shows them, without ray_


@functools.lru_cache(maxsize=1)
def _instruments() -> dict:
    from ray.util.metrics import Counter, Gauge

    out = {n: Gauge(PREFIX + n, description=d, tag_keys=TAGS) for n, d in GAUGES.items()}
    out.update({n: Counter(PREFIX + n, description=d, tag_keys=TAGS) for n, d in COUNTERS.items()})
    return out


HOLD_EVERY_S = 1.0
_held: dict[tuple, tuple] = {}  # (name, tags) -> (gauge, tags, value)
_lock = threading.Lock()


def _set(name: str, t: dict, value: float) -> None:
    """Set a gauge and keep setting it while this process lives: Ray exports a gauge value
    that is not set again once, then drops it (two export intervals later), so a phase's
    last numbers would vanish from Prometheus before anyone scraped them."""
    gauge = _instruments()[name]
    gauge.set(value, tags=t)
    with _lock:
        _held[(name, tuple(sorted(t.items())))] = (gauge, t, value)
        if len(_held) == 1:
            threading.Thread(target=_hold, daemon=True, name="stackwise-metrics").start()


def _hold() -> None:
    while True:
        threading.Event().wait(HOLD_EVERY_S)
        with _lock:
            held = list(_held.values())
        for gauge, t, value in held:
            try:
                gauge.set(value, tags=t)
            except Exception:  # noqa: BLE001 - Ray shut down under this process: nothing to hold for
                return


def tags(labels: dict, phase: str, stack: int) -> dict:
    return {"experiment": ascii_tag(labels["experiment"]), "trial": ascii_tag(labels["trial"]), "phase": phase,
            "stack": str(stack)}


def ascii_tag(text: str) -> str:
    """`text` as Ray takes it for a metric tag: ASCII only (Ray encodes tags as ASCII, and
    Ray Train tags its own metrics with the run's name). Other characters become their
    code point: `café` -> `caf-u00e9`, so different names stay different."""
    return "".join(c if c.isascii() else f"-u{ord(c):04x}" for c in text)


def phase_progress(t: dict, step: int, steps: int, loss: float, tokens_per_s: float) -> None:
    """From the rank-0 worker while it trains."""
    for name, value in (("step", step), ("steps", steps), ("train_loss", loss), ("tokens_per_s", tokens_per_s)):
        _set(name, t, float(value))


def phase_finished(t: dict, metrics: dict) -> None:
    """From the run's driver when a phase is trained or reused."""
    m = _instruments()
    reused = metrics.get("status") == "reused"
    m["phases_reused" if reused else "phases_trained"].inc(1, tags=t)
    cache = metrics.get("cache", {})
    _set("val_loss", t, float(metrics["val_loss"]))
    _set("cache_bytes", t, float(cache.get("bytes") or 0))
    _set("cache_build_s", t, float(cache.get("build_s") or 0.0) if cache.get("built") else 0.0)
    _set("phase_wall_s", t, 0.0 if reused else float(metrics.get("phase_wall_s", 0.0)))
