"""Levels that chance alone gives, in plain math: the diagnosis reads them without torch."""

from __future__ import annotations

import math

__all__ = ["closest_pair_by_chance"]


def closest_pair_by_chance(count: int, rank: float) -> float:
    r"""The closest pair of ``count`` points spread independently over ``rank`` dimensions, as
    a fraction of their typical pairwise distance: ``(2 / (P (P - 1)))^(1 / r)``.

    Of the P(P-1)/2 pairs, a share of about x^r lies within a fraction x of the typical
    distance (the volume of a ball of radius x in r dimensions), so about one pair is expected
    that close when P(P-1)/2 x^r = 1: the expected-count argument of the birthday bound, in r
    dimensions (Silverman & Brown 1978, "Short distances, flat triangles and Poisson limits",
    J. Appl. Prob. 15: the number of pairs closer than a distance is Poisson in the limit, so
    the smallest distance scales as P^(-2/r)). Eight rows over rank 7 give 0.62 (a merge at
    5% of the mean distance is 12 times closer than chance); 1,347 rows over rank 7 give 0.14
    (a memory bank with one row per training image holds near-duplicates by chance). 1.0 for
    P <= 2 or a rank that is not positive (at most one pair, or no spread to scale by)."""
    pairs = count * (count - 1) / 2
    if pairs <= 1 or not rank > 0:
        return 1.0
    return math.exp(-math.log(pairs) / rank)
