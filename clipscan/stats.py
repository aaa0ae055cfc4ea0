"""The interval arithmetic every figure with a confidence interval uses: the z value, a ratio of
two proportions with its Katz log interval (the attribute contrast, the judge) and a share
with its Wilson score interval (the bias probes)."""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # two-sided 95 % normal quantile


def lift_ci(
    differ: int, pairs: int, control_differ: int, control_pairs: int, z: float = Z95
) -> tuple[float | None, float | None, float | None]:
    """Ratio of two proportions, (differ/pairs) / (control_differ/control_pairs), with its
    Katz log interval: exp(log lift +- z * sqrt(1/a - 1/n1 + 1/c - 1/n2)).

    When a cell of the 2 x 2 table is zero, 0.5 is added to all four (Haldane), for the
    lift and the interval alike. Returns (lift, lo, hi); all None when a group has no
    pairs or neither group has a differing pair (nothing to compare).
    """
    a, n1, c, n2 = float(differ), float(pairs), float(control_differ), float(control_pairs)
    if not (0 <= a <= n1 and 0 <= c <= n2):
        raise ValueError(
            f"lift_ci: counts must satisfy 0 <= differ <= pairs, got {differ}/{pairs} and "
            f"{control_differ}/{control_pairs}"
        )
    if n1 == 0 or n2 == 0 or a + c == 0:
        return None, None, None
    if 0 in (a, n1 - a, c, n2 - c):
        a, c, n1, n2 = a + 0.5, c + 0.5, n1 + 1.0, n2 + 1.0
    lift = (a / n1) / (c / n2)
    se = math.sqrt(1 / a - 1 / n1 + 1 / c - 1 / n2)
    return lift, lift * math.exp(-z * se), lift * math.exp(z * se)


def wilson(share: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval of a share over n scenes ((0, 1) when n is 0)."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    centre = (share + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(share * (1 - share), 0.0) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
