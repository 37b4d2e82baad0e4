"""The gating goal (`analysis.evaluation.frontier`) and its plot, on planted rate tables."""
from __future__ import annotations

from activations.stats import rate_from_counts
from analysis.evaluation.frontier import (
    envelope_at,
    gating_frontier,
    unconditional_curve,
)
from analysis.reporting.frontier_plots import plot_frontier

N = 200


def table(over: int, harm: int) -> dict:
    return {"over_refusal": rate_from_counts(over, N), "harmful_refusal": rate_from_counts(harm, N)}


def point(condition: str, strength: float, over: int, harm: int) -> dict:
    return {"condition": condition, "strength": strength, "over_refusal": rate_from_counts(over, N),
            "harmful": rate_from_counts(harm, N)}


# unconditional steering trades one for the other: away lowers both, toward raises both
SWEEP = [point("steer_away", 1, 44, 158), point("steer_away", 2, 40, 120), point("steer_away", 4, 10, 60),
         point("steer_toward", 2, 100, 180), point("steer_toward", 4, 160, 196)]
BASE = table(60, 160)  # over-refusal 0.30, harmful 0.80


def test_unconditional_curve_and_envelope():
    curve = unconditional_curve(BASE, SWEEP)
    assert [p["signed_strength"] for p in curve] == [-4, -2, -1, 0, 2, 4]
    assert envelope_at(curve, 0.01) is None  # no strength gets over-refusal that low
    # mixing strengths -1 (0.22, 0.79) and +2 (0.50, 0.90) beats the baseline (0.30, 0.80) itself
    assert abs(envelope_at(curve, 0.30) - (0.79 + 0.11 * 0.08 / 0.28)) < 1e-9
    assert abs(envelope_at(curve, 0.25) - (0.79 + 0.11 * 0.03 / 0.28)) < 1e-9
    assert abs(envelope_at(curve, 0.20) - (0.30 + 0.49 * 0.15 / 0.17)) < 1e-9  # (0.20, 0.60) lies under the hull


def test_a_gate_that_meets_the_goal_and_gates_that_do_not():
    tables = {"baseline": BASE,
              "good": table(30, 158),      # much less over-refusal, harmful within 2 points, above the frontier
              "lossy": table(30, 120),     # less over-refusal, but loses 20 points of harmful refusal
              "raises": table(90, 170),    # raises over-refusal
              "below": table(50, 157)}     # within tolerance and lower, but unconditional steering does better
    assert envelope_at(unconditional_curve(BASE, SWEEP), 0.25) > 0.785  # planted: the frontier passes above "below"
    found = gating_frontier(tables, SWEEP, ["good", "lossy", "raises", "below"], tolerance=0.02)
    g = found["gates"]
    assert g["good"]["meets_goal"] and found["best_gate"] == "good" and found["goal_met"]
    assert g["lossy"]["lowers_over_refusal"] and not g["lossy"]["harmful_within_tolerance"]
    assert not g["raises"]["lowers_over_refusal"] and not g["raises"]["meets_goal"]
    assert g["below"]["harmful_within_tolerance"] and not g["below"]["above_frontier"]
    assert "good meets the goal" in found["verdict"]
    none = gating_frontier({k: tables[k] for k in ("baseline", "lossy", "raises")}, SWEEP, ["lossy", "raises"])
    assert not none["goal_met"] and none["best_gate"] is None
    assert none["verdict"].startswith("no gate meets the goal") and "loses more than 0.02" in none["verdict"]


def test_frontier_plot_draws_gates_and_unconditional_points(tmp_path):
    found = gating_frontier({"baseline": BASE, "good": table(30, 158)}, SWEEP, ["good"])
    png = plot_frontier(found, tmp_path / "f.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
