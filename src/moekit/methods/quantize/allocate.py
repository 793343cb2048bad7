"""Per-expert mixed-precision bit allocation: MC-MoE's pre-loading mixed-precision
quantization (Huang et al. 2024, "Mixture Compressor for Mixture-of-Experts LLMs Gains
More", arXiv 2410.06270).

Each item i (one routed expert of one decoder layer; a whole model's experts are
allocated at once, so bits move between layers as well as experts) is stored at one
width b of its options B_i, costing c_i(b) bytes (the packed expert, scales included,
exact) and incurring an error e_i(b) ≥ 0 (in MC-MoE the expert's importance, from its
activation frequency and gate weights, times its quantization error). The allocation
is the multiple-choice knapsack

    min_x  Σ_i Σ_{b∈B_i} e_i(b) · x_{i,b}
    s.t.   Σ_{b∈B_i} x_{i,b} = 1                 for every item i (one width each)
           Σ_i Σ_{b∈B_i} c_i(b) · x_{i,b} ≤ C    (the byte budget)
           x_{i,b} ∈ {0, 1},

solved by `scipy.optimize.milp` (HiGHS branch and bound; the one-hot rows are sparse):
exact, where a greedy by error per byte can be far off on a knapsack, and scipy is
already a dependency. Exact reductions come first:
- Each item's cheapest cost moves into the budget, the rest is divided by the greatest
  common divisor g of all cost differences and the budget rounded down to a multiple of
  g (Σ g·k_i ≤ R ⇔ Σ k_i ≤ ⌊R/g⌋ for integers k_i): for experts of one shape the weights
  w_i(b) become small integers that float tolerances cannot blur. Errors are shifted per
  item and scaled to [0, 1] (the argmin is unchanged).
- Lagrangian bound and reduced-cost fixing: for λ ≥ 0 and any x that fits,
  Σ e(x) ≥ L(λ) + Σ_i r_i(x_i) with L(λ) = Σ_i min_b (e_i(b) + λ·w_i(b)) − λ·R and r_i(b)
  ≥ 0 the excess of e_i(b) + λ·w_i(b) over item i's minimum. At the smallest λ whose
  per-item minimisers fit (bisection; L is then the LP bound) those minimisers are the
  incumbent U. If U − L is within the gap, U is the answer; otherwise options with
  r_i(b) > U − L cannot be in a better allocation and are dropped. If many items keep
  several options, a node-limited solve over those nearest the margin lowers U, and so
  the items left, before the final solve proves the optimum over them.
The solution is rounded and checked against C in integer arithmetic; should a tolerance
have let it exceed C, the incumbent (which fits exactly) is kept, not marked proven.
6144 experts of one shape take under a second at the default gap (the test measures it);
experts of many sizes make a knapsack in raw bytes whose optimum HiGHS can be slow to
prove, which `time_limit` bounds.

Average-bit budgets (`budget_for_average_bits`): "a bits on average" is the bytes of every
expert stored at a bits: c_i(a) when a is one of item i's widths, and between its nearest
widths lo < a < hi the interpolation c_i(lo) + (a − lo)/(hi − lo)·(c_i(hi) − c_i(lo)),
exact for formats whose bytes are affine in the width and the bytes of a share
(a − lo)/(hi − lo) of equal-sized experts at hi, the rest at lo. The budget is
⌊Σ_i budget_i⌋, summed in rationals.
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from numbers import Integral, Real

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from moekit.errors import MoekitError

MIN_AVERAGE_BITS = 2  # moekit's packed formats start at 2 bits; a lower average has no format to reach it
CORE_ITEMS = 256  # more free items than this: first a solve over this many, nearest the margin ...
CORE_NODES = 200  # ... limited to this many branch-and-bound nodes (deterministic, unlike a time share)
CORE_GAP_SHARE = 0.01  # ... and a gap this share of the final one, so that its incumbent fixes most items


@dataclass(frozen=True)
class Allocation:
    """The chosen width of every item and what it costs: `bits` {key: width} (in the order
    of `errors`), `total_bytes` Σ c_i(b_i) (exact, never above `budget_bytes`), `total_error`
    Σ e_i(b_i), `proven_optimal` (within `mip_rel_gap`; False when the time limit stopped
    the solver or its solution broke the budget), `mip_gap` (total_error − proven lower
    bound) / total_error, how far above the optimum total_error can at most be."""

    bits: dict[Hashable, int]
    total_bytes: int
    total_error: float
    budget_bytes: int
    proven_optimal: bool
    mip_gap: float
    solve_seconds: float

    @property
    def average_bits(self) -> float:
        """Mean chosen width over items (the weight-weighted mean when experts are of one size)."""
        return sum(self.bits.values()) / len(self.bits)


@dataclass(frozen=True)
class _Item:
    key: Hashable
    widths: tuple[int, ...]  # options in ascending cost, so option 0 is the cheapest
    costs: tuple[int, ...]
    errors: tuple[float, ...]


def allocate_bits(
    errors: Mapping[Hashable, Mapping[int, float]],
    costs: Mapping[Hashable, Mapping[int, int]],
    budget_bytes: int,
    *,
    time_limit: float | None = 60.0,
    mip_rel_gap: float = 1e-4,
) -> Allocation:
    """The widths b_i minimising Σ e_i(b_i) subject to Σ c_i(b_i) ≤ `budget_bytes`.

    Args:
        errors: {key: {width: e_i(width)}}, finite, ≥ 0; keys any hashable, e.g. (layer, expert).
        costs: {key: {width: c_i(width)}}, positive integer bytes, same keys and widths.
        budget_bytes: C, an integer (see `budget_for_average_bits`).
        time_limit: seconds for the branch and bound (None: no limit); on expiry the
            best allocation found is returned with `proven_optimal` False.
        mip_rel_gap: stop once Σ e_i(b_i) is proven within this fraction of the optimum
            (HiGHS' default 1e-4, far below the noise of measured errors; 0: exact).

    Raises:
        MoekitError: invalid inputs, or a budget below the cheapest allocation.
    """
    items = _validated_items(errors, costs)
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, Integral):
        raise MoekitError(f"budget_bytes {budget_bytes!r} is not a whole number of bytes; pass an int "
                          "(budget_for_average_bits gives one).")
    budget = int(budget_bytes)
    if time_limit is not None and (isinstance(time_limit, bool) or not isinstance(time_limit, Real) or time_limit <= 0):
        raise MoekitError(f"time_limit {time_limit!r} is not a positive number of seconds; pass one, or None for no limit.")
    if isinstance(mip_rel_gap, bool) or not isinstance(mip_rel_gap, Real) or not 0 <= mip_rel_gap < 1:
        raise MoekitError(f"mip_rel_gap {mip_rel_gap!r} is not a fraction in [0, 1); pass e.g. 1e-4 (0: prove the optimum).")
    smallest = sum(it.costs[0] for it in items)
    if budget < smallest:
        raise MoekitError(f"the byte budget {budget:,} cannot be met: the smallest allocation needs {smallest:,} bytes "
                          f"(every expert at its cheapest width); raise the budget to at least {smallest:,}.")
    start = time.perf_counter()
    # The budget does not bind when every item's least-error width (the cheapest among ties) fits.
    choice = [min(range(len(it.costs)), key=lambda j, it=it: (it.errors[j], j)) for it in items]
    proven, lower_bound = True, None
    if _total_cost(items, choice) > budget:
        choice, proven, lower_bound = _solve(items, budget, time_limit, mip_rel_gap)
    if _total_cost(items, choice) > budget:  # cannot happen: every path keeps an allocation that fits
        raise RuntimeError(f"bit allocation broke the byte budget {budget:,}; please report this with the inputs")
    total_error = math.fsum(it.errors[j] for it, j in zip(items, choice))
    gap = 0.0 if lower_bound is None or total_error == 0 else max(0.0, float((total_error - lower_bound) / total_error))
    return Allocation(
        bits={it.key: it.widths[j] for it, j in zip(items, choice)},
        total_bytes=_total_cost(items, choice),
        total_error=total_error,
        budget_bytes=budget, proven_optimal=proven, mip_gap=gap, solve_seconds=time.perf_counter() - start,
    )


def budget_for_average_bits(costs: Mapping[Hashable, Mapping[int, int]], average_bits: float) -> int:
    """The byte budget of every item stored at `average_bits` (module docstring):
    ⌊Σ_i c_i(a)⌋ with c_i linearly interpolated between item i's two nearest widths.

    Raises:
        MoekitError: an average below 2 bits or outside an item's widths, or invalid costs.
    """
    if isinstance(average_bits, bool) or not isinstance(average_bits, Real) or not math.isfinite(average_bits):
        raise MoekitError(f"average_bits {average_bits!r} is not a finite number; pass one such as 2.5 or 3.")
    if average_bits < MIN_AVERAGE_BITS:
        raise MoekitError(f"average_bits {average_bits} is below {MIN_AVERAGE_BITS} bits, the narrowest width moekit "
                          f"packs; choose an average of at least {MIN_AVERAGE_BITS}.")
    average = Fraction(average_bits)  # exact: a float's binary value, so whole widths stay whole
    total = Fraction(0)
    for key, options in _checked(costs, "costs").items():
        by_width = _cost_options(key, options)
        widths = sorted(by_width)
        if not widths[0] <= average <= widths[-1]:
            raise MoekitError(f"average_bits {average_bits} is outside expert {key!r}'s widths {widths[0]}–{widths[-1]}; "
                              f"choose an average between them, or give every expert widths that span it.")
        hi = next(w for w in widths if w >= average)
        lo = max(w for w in widths if w <= average)
        share = Fraction(0) if hi == lo else (average - lo) / (hi - lo)
        total += by_width[lo] + share * (by_width[hi] - by_width[lo])
    return math.floor(total)


def _solve(items: list[_Item], budget: int, time_limit: float | None,
           mip_rel_gap: float) -> tuple[list[int], bool, float]:
    """The integer program of the module docstring: each item's option index, whether the
    optimum was proven (within the gap), and a lower bound on Σ e_i(b_i)."""
    n, width = len(items), max(len(it.costs) for it in items)
    divisor = math.gcd(*(c - it.costs[0] for it in items for c in it.costs)) or 1
    room = (budget - sum(it.costs[0] for it in items)) // divisor
    weights, errors = np.zeros((n, width)), np.full((n, width), np.inf)  # a missing option: never chosen
    for i, it in enumerate(items):
        weights[i, :len(it.costs)] = [(c - it.costs[0]) // divisor for c in it.costs]  # integers < 2^53: exact
        errors[i, :len(it.costs)] = it.errors
    offsets = errors.min(axis=1)
    scale = np.max(np.where(np.isfinite(errors), errors - offsets[:, None], 0))  # > 0, or the budget would not bind
    errors = (errors - offsets[:, None]) / scale
    rows = np.arange(n)

    # At λ = 2 every item takes a weight-0 option (a costlier one pays λ·w ≥ 2 > any error);
    # argmin breaks ties to the cheaper option, options being in cost order.
    low, high = 0.0, 2.0
    for _ in range(60):
        mid = (low + high) / 2
        fits = weights[rows, np.argmin(errors + mid * weights, axis=1)].sum() <= room
        low, high = (low, mid) if fits else (mid, high)
    penalised = errors + high * weights
    incumbent = np.argmin(penalised, axis=1)
    lower = penalised.min(axis=1).sum() - high * room  # L(λ)
    reduced = penalised - penalised.min(axis=1, keepdims=True)
    upper = errors[rows, incumbent].sum()
    allowed_gap = mip_rel_gap * (offsets.sum() / scale + upper)  # relative to the whole Σ e
    deadline = None if time_limit is None else time.perf_counter() + time_limit
    proven = True
    if upper - lower > allowed_gap:
        keep = reduced <= (upper - lower) + 1e-9 * (1 + upper)  # holds the incumbent's options
        if (keep.sum(axis=1) > 1).sum() > CORE_ITEMS:
            runner_up = np.sort(np.where(keep, reduced, np.inf), axis=1)[:, 1]
            nearest = np.argsort(runner_up)[:CORE_ITEMS]
            core = np.zeros_like(keep)
            core[rows, incumbent] = True
            core[nearest] = keep[nearest]
            incumbent, _, _ = _best_within(items, budget, errors, weights, room, core, incumbent,
                                           CORE_GAP_SHARE * allowed_gap, deadline, CORE_NODES)
            upper = errors[rows, incumbent].sum()
            keep = reduced <= (upper - lower) + 1e-9 * (1 + upper)
        incumbent, status, bound = _best_within(items, budget, errors, weights, room, keep, incumbent,
                                                allowed_gap, deadline, None)
        proven, lower = status == 0, max(lower, bound)
    return incumbent.tolist(), proven, math.fsum(offsets) + scale * lower


def _best_within(items: list[_Item], budget: int, errors: np.ndarray, weights: np.ndarray, room: int,
                 keep: np.ndarray, incumbent: np.ndarray, allowed_gap: float, deadline: float | None,
                 node_limit: int | None) -> tuple[np.ndarray, int, float]:
    """The least-error allocation that fits using only options in `keep` (which holds the
    incumbent's), by milp over the items with more than one. Returns it (or `incumbent`,
    if better), milp's status (-1 if it broke the budget), and a lower bound over `keep`."""
    rows = np.arange(len(incumbent))
    free = np.flatnonzero(keep.sum(axis=1) > 1)
    upper = errors[rows, incumbent].sum()
    if not len(free):
        return incumbent, 0, upper
    item_of, option_of = np.nonzero(keep[free])
    fixed_weight = weights[rows, incumbent].sum() - weights[free, incumbent[free]].sum()
    fixed_error = upper - errors[free, incumbent[free]].sum()
    one_hot = sparse.csr_array((np.ones(len(item_of)), (item_of, np.arange(len(item_of)))),
                               shape=(len(free), len(item_of)))
    matrix = sparse.vstack([one_hot, sparse.csr_array(weights[free[item_of], option_of][None, :])], format="csr")
    ones = np.ones(len(free))
    # HiGHS' gap is relative to its own objective, the free items' error alone.
    options = {"disp": False, "mip_rel_gap": allowed_gap / max(upper - fixed_error, 1e-300)}
    if node_limit is not None:
        options["node_limit"] = node_limit
    if deadline is not None:
        options["time_limit"] = max(deadline - time.perf_counter(), 1e-3)
    result = milp(errors[free[item_of], option_of], integrality=np.ones(len(item_of)), bounds=Bounds(0, 1),
                  constraints=LinearConstraint(matrix, np.append(ones, -np.inf), np.append(ones, room - fixed_weight)),
                  options=options)
    status = result.status
    if result.x is not None:
        picked = np.full((len(free), errors.shape[1]), -1.0)
        picked[item_of, option_of] = result.x
        candidate = incumbent.copy()
        candidate[free] = np.argmax(picked, axis=1)  # rounding: each item's largest x
        if _total_cost(items, candidate.tolist()) > budget:  # a float tolerance let bytes slip:
            status = -1  # keep the incumbent, which fits exactly (integer weights, exact sums)
        elif errors[rows, candidate].sum() < upper:
            incumbent = candidate
    bound = result.mip_dual_bound if result.mip_dual_bound is not None else -np.inf
    return incumbent, status, fixed_error + bound


def _total_cost(items: list[_Item], choice: list[int]) -> int:
    return sum(it.costs[j] for it, j in zip(items, choice))


def _validated_items(errors: Mapping, costs: Mapping) -> list[_Item]:
    errors, costs = _checked(errors, "errors"), _checked(costs, "costs")
    for key in costs:
        if key not in errors:
            raise MoekitError(f"expert {key!r} has costs but no errors; give errors and costs the same experts.")
    items = []
    for key, options in errors.items():
        if key not in costs:
            raise MoekitError(f"expert {key!r} has errors but no costs; give errors and costs the same experts.")
        by_width = _cost_options(key, costs[key])
        if not isinstance(options, Mapping) or set(options) != set(by_width):
            got = sorted(options, key=repr) if isinstance(options, Mapping) else repr(options)
            raise MoekitError(f"expert {key!r} has errors for widths {got} but costs for {sorted(by_width)}; "
                              "give both the same widths.")
        for width, error in options.items():
            if isinstance(error, bool) or not isinstance(error, Real) or not math.isfinite(error) or error < 0:
                raise MoekitError(f"expert {key!r}: error {error!r} at {width} bits is not a finite number ≥ 0; "
                                  "errors are importance-weighted squared errors, check how they were measured.")
        widths = tuple(sorted(by_width, key=lambda w: (by_width[w], float(options[w]), w)))
        items.append(_Item(key, widths, tuple(by_width[w] for w in widths), tuple(float(options[w]) for w in widths)))
    return items


def _checked(mapping: Mapping, name: str) -> Mapping:
    """`mapping`, refused unless a non-empty mapping."""
    if not isinstance(mapping, Mapping) or not mapping:
        raise MoekitError(f"{name} is empty or not a mapping; pass {{(layer, expert): {{bits: value}}}} for every expert.")
    return mapping


def _cost_options(key: Hashable, options: Mapping) -> dict[int, int]:
    """Item `key`'s {width: bytes}, checked: a non-empty mapping of positive integers."""
    if not isinstance(options, Mapping) or not options:
        raise MoekitError(f"expert {key!r} has no bit widths to choose from; give it an error and a cost per width.")
    for width, cost in options.items():
        if isinstance(width, bool) or not isinstance(width, Integral) or width < 1:
            raise MoekitError(f"expert {key!r}: bit width {width!r} is not a positive integer; use widths such as 2, 3, 4, 8.")
        if isinstance(cost, bool) or not isinstance(cost, Integral) or cost < 1:
            raise MoekitError(f"expert {key!r}: cost {cost!r} at {width} bits is not a positive whole number of bytes; "
                              "give the packed expert's exact size, scales included.")
    return {int(w): int(c) for w, c in options.items()}
