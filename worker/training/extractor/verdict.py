"""The lookalike stage's report: its curve, one line per meta-epoch, and whether F may
ship, which it may only if it kept what it knew (held-out people, race, attributes)."""

from __future__ import annotations

from typing import Any

CURVE_POINTS = 10
# The most F may lose, in points (percent), between the start of the stage and its end.
MAX_LFW_DROP = 0.5
MAX_HEAD_DROP = 1.0


def siamese_curve(losses: list[float], points: int = CURVE_POINTS) -> dict[str, Any]:
    """L_siamese over one meta-epoch's steps: the mean of each of ``points`` equal runs of
    steps (fewer with fewer steps), first and last: flat at the end means converged."""
    if not losses:
        return {"steps": 0, "means": []}
    n = min(points, len(losses))
    bounds = [round(i * len(losses) / n) for i in range(n + 1)]
    means = [sum(losses[a:b]) / (b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return {"steps": len(losses), "means": means, "first": means[0], "last": means[-1]}


def _points(entry: dict[str, Any]) -> dict[str, float | None]:
    m = entry["metrics"]
    held = entry.get("lfw")
    return {
        "lfw": None if held is None else 100 * held["accuracy"],
        "race": 100 * m["race_top1"],
        "attr": 100 * m["attribute_map"],
    }


def curve_line(entry: dict[str, Any]) -> str:
    """One measurement: Same/Diff/Lookalike angles under F then, L_siamese, LFW, race, attr."""
    m, looks = entry["metrics"], entry.get("lookalikes")
    p = _points(entry)
    curve = entry.get("siamese_curve") or {}
    theta = m.get("threshold_deg")
    return (
        f"meta-epoch {entry['meta_epoch']}: same {m['angle_same']['mean']:.1f}°, "
        f"diff {m['angle_diff']['mean']:.1f}°, lookalike "
        + (
            "—"
            if looks is None
            else f"{looks['angle']['mean']:.1f}±{looks['angle']['sd']:.1f}° (at generation "
            f"{looks['angle_at_generation']['mean']:.1f}°, accepted {looks['accepted']:.0%})"
        )
        + ", L_siamese "
        + ("—" if not curve.get("steps") else f"{curve['first']:.3f}→{curve['last']:.3f}")
        + f", LFW {'n/a' if p['lfw'] is None else format(p['lfw'], '.2f') + '%'}"
        + f", race {p['race']:.2f}%, attr {p['attr']:.2f}%"
        + f", θ_t {'n/a' if theta is None else format(theta, '.1f')}°"
    )


def stage_verdict(history: list[dict[str, Any]], meta_epochs: int) -> tuple[bool, list[str]]:
    """(ship?, why not): the stage finished, and from its first measurement to its last
    F lost at most ``MAX_LFW_DROP`` points of LFW accuracy on held-out people and
    ``MAX_HEAD_DROP`` of race top-1 and attribute mAP (gains never block)."""
    if not history or history[-1]["meta_epoch"] < meta_epochs:
        done = history[-1]["meta_epoch"] if history else 0
        return False, [f"the stage has not finished ({done} of {meta_epochs} meta-epochs)"]
    start, end = _points(history[0]), _points(history[-1])
    why = []
    if start["lfw"] is None or end["lfw"] is None:
        why.append("LFW was not measured (needs lfw/ in the data root and --lfw-pairs > 0)")
    for name, limit in (("lfw", MAX_LFW_DROP), ("race", MAX_HEAD_DROP), ("attr", MAX_HEAD_DROP)):
        a, b = start[name], end[name]
        if a is not None and b is not None and a - b > limit:
            why.append(f"{name} fell {a - b:.2f} points ({a:.2f}% → {b:.2f}%; at most {limit})")
    return not why, why
