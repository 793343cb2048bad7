"""Per-expert mixed-precision bit allocation: MC-MoE's pre-loading mixed-precision
quantization (Huang et al. 2024, "Mixture Compressor for Mixture-of-Experts LLMs Gains
More", arXiv 2410.06270).

Each item i (one routed expert of one decoder layer; a whole model's experts are
allocated together, so bits move between layers as well as between experts) stores its
weights at one width b from its options B_i. Width b costs c_i(b) bytes (the packed
expert, scales included, exact) and incurs an error e_i(b) ≥ 0 (in MC-MoE the expert's
importance, from its activation frequency and gate weights, times its measured
quantization error). The allocation is the multiple-choice knapsack

    min_x  Σ_i Σ_{b∈B_i} e_i(b) · x_{i,b}
    s.t.   Σ_{b∈B_i} x_{i,b} = 1                 for every item i (one width each)
           Σ_i Σ_{b∈B_i} c_i(b) · x_{i,b} ≤ C    (the byte budget)
           x_{i,b} ∈ {0, 1},

solved as an integer program by `scipy.optimize.milp` (HiGHS branch and bound): exact,
where a greedy by error per byte can be far from the optimum on a knapsack, and scipy is
already a dependency. The one-hot rows are a sparse matrix.

Exact rewrites make it small and well conditioned before HiGHS sees it:
- Each item's cheapest cost moves into the budget and the rest is divided by the greatest
  common divisor g of all cost differences, the budget rounded down to a multiple of g
  (Σ g·k_i ≤ R ⇔ Σ k_i ≤ ⌊R/g⌋ for integers k_i). When bytes grow as b·n/8 plus fixed
  scales the weights become the width differences, and tolerances cannot let bytes slip.
- Errors are shifted per item and scaled to [0, 1] (neither changes the argmin).
- Lagrangian reduced-cost fixing: for λ ≥ 0, every allocation x that fits has
  Σ e(x) ≥ L(λ) + Σ_i r_i(b_i), with L(λ) = Σ_i min_b (e_i(b) + λ·w_i(b)) − λ·R and
  r_i(b) ≥ 0 the excess of e_i(b) + λ·w_i(b) over that minimum. With λ the smallest
  multiplier whose per-item minimisers fit (found by bisection) and an incumbent U
  (those minimisers, then improved greedily with the room left), an option with
  r_i(b) > U − L(λ) cannot be in a better allocation and is dropped; an item left with
  one option is fixed. On 6144 experts of one shape only a handful stay free.
The solution is rounded (each item takes its largest x_{i,b}) and checked against C in
integer arithmetic; if a tolerance still let it exceed C, the cheapest repairs bring it
back under and the result is marked as not proven optimal. Experts of many different
sizes make the budget row a knapsack in raw bytes whose optimum can take HiGHS long to
prove; `time_limit` then returns the best allocation found with its proven gap.

Average-bit budgets (`budget_for_average_bits`): "a bits on average" is the bytes of every
expert stored at a bits. When a is one of item i's widths that is exactly c_i(a); between
its two nearest widths lo < a < hi it is the linear interpolation
c_i(lo) + (a − lo)/(hi − lo) · (c_i(hi) − c_i(lo)): exact for formats whose bytes are
affine in the width, and the bytes of storing a share (a − lo)/(hi − lo) of equal-sized
experts at hi and the rest at lo. The budget is ⌊Σ_i budget_i⌋, summed in rationals.
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

MAX_FILL_MOVES = 1000  # `_fill_slack` is a heuristic: bounded work, the solver does the rest
MIN_AVERAGE_BITS = 2  # moekit's packed formats start at 2 bits; a lower average has no format to reach it


@dataclass(frozen=True)
class Allocation:
    """The chosen width of every item and what it costs.

    Attributes:
        bits: {key: chosen width}, in the order of the `errors` mapping.
        total_bytes: Σ c_i(b_i), exact; never above `budget_bytes`.
        total_error: Σ e_i(b_i).
        budget_bytes: the budget C it was solved for.
        proven_optimal: the optimum was proven (within `mip_rel_gap`); False when the time
            limit stopped the solver or a repair was needed.
        mip_gap: (total_error − proven lower bound) / total_error: how far above the optimum
            total_error can at most be.
        solve_seconds: wall time of the solve.
    """

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
    mip_rel_gap: float = 1e-6,
) -> Allocation:
    """The widths b_i minimising Σ e_i(b_i) subject to Σ c_i(b_i) ≤ `budget_bytes`.

    Args:
        errors: {key: {width: e_i(width)}}, finite and ≥ 0; keys are any hashable, e.g.
            (layer, expert).
        costs: {key: {width: c_i(width)}}, positive integer bytes, same keys and widths.
        budget_bytes: C, an integer (see `budget_for_average_bits`).
        time_limit: seconds for the branch and bound (None: no limit); on expiry the
            best allocation found is returned with `proven_optimal` False.
        mip_rel_gap: stop once Σ e_i(b_i) is proven within this fraction of the optimum.

    Raises:
        MoekitError: invalid inputs, or a budget below the cheapest allocation.
    """
    items = _validated_items(errors, costs)
    budget = _whole_bytes(budget_bytes)
    if time_limit is not None and (isinstance(time_limit, bool) or not isinstance(time_limit, Real) or time_limit <= 0):
        raise MoekitError(f"time_limit {time_limit!r} is not a positive number of seconds; pass one, or None for no limit.")
    if isinstance(mip_rel_gap, bool) or not isinstance(mip_rel_gap, Real) or not 0 <= mip_rel_gap < 1:
        raise MoekitError(f"mip_rel_gap {mip_rel_gap!r} is not a fraction in [0, 1); pass e.g. 1e-6 (0: prove the optimum).")
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
    total_error = math.fsum(it.errors[j] for it, j in zip(items, choice))
    gap = 0.0 if lower_bound is None or total_error == 0 else max(0.0, (total_error - lower_bound) / total_error)
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
    """The integer program of the module docstring: each item's option index, whether
    the optimum was proven, and a lower bound on Σ e_i(b_i)."""
    n, width = len(items), max(len(it.costs) for it in items)
    divisor = math.gcd(*(c - it.costs[0] for it in items for c in it.costs)) or 1
    room = (budget - sum(it.costs[0] for it in items)) // divisor
    # Padded [n, width] tables; a missing option has infinite error and is never chosen.
    weights, errors = np.zeros((n, width)), np.full((n, width), np.inf)
    for i, it in enumerate(items):
        weights[i, :len(it.costs)] = [(c - it.costs[0]) // divisor for c in it.costs]  # integers < 2^53: exact
        errors[i, :len(it.costs)] = it.errors
    # Per-item offsets and one global scale change no argmin but keep the objective near 1,
    # where HiGHS' absolute tolerances mean the same whatever unit the errors come in.
    offsets = errors.min(axis=1)
    scale = np.max(np.where(np.isfinite(errors), errors - offsets[:, None], 0))  # > 0, or the budget would not bind
    errors = (errors - offsets[:, None]) / scale
    rows = np.arange(n)

    # Lagrangian relaxation: at λ ≥ 0 each item takes argmin_b e + λ·w (ties to the cheaper,
    # options being in cost order). The smallest λ whose choice fits is found by bisection; at
    # λ = 2 every item takes a weight-0 option, since a costlier one pays λ·w ≥ 2 > any error.
    def chosen_at(lam: float) -> np.ndarray:
        return np.argmin(errors + lam * weights, axis=1)

    low, high = 0.0, 2.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (low, mid) if weights[rows, chosen_at(mid)].sum() <= room else (mid, high)
    incumbent = chosen_at(high)
    penalised = errors + high * weights
    lower = penalised.min(axis=1).sum() - high * room  # L(λ) ≤ the objective of any allocation that fits
    reduced = penalised - penalised.min(axis=1, keepdims=True)
    _fill_slack(errors, weights, incumbent, room)
    upper = errors[rows, incumbent].sum()
    # Reduced-cost fixing: an allocation using option (i, b) has objective ≥ L(λ) + reduced[i, b],
    # so options whose reduced cost exceeds upper − lower cannot beat the incumbent.
    keep = reduced <= (upper - lower) + 1e-9 * (1 + upper)
    free = np.flatnonzero(keep.sum(axis=1) > 1)
    choice = incumbent.copy()  # a fixed item's one survivor is the incumbent's (reduced cost 0)
    proven = True
    if len(free):
        item_of, option_of = np.nonzero(keep[free])
        fixed_weight = weights[rows, incumbent].sum() - weights[free, incumbent[free]].sum()
        one_hot = sparse.csr_array((np.ones(len(item_of)), (item_of, np.arange(len(item_of)))),
                                   shape=(len(free), len(item_of)))
        matrix = sparse.vstack([one_hot, sparse.csr_array(weights[free[item_of], option_of][None, :])], format="csr")
        bounds_low = np.concatenate([np.ones(len(free)), [-np.inf]])
        bounds_high = np.concatenate([np.ones(len(free)), [room - fixed_weight]])
        # HiGHS measures its gap against the free items' error alone; scale it so the gap
        # is relative to the whole Σ e_i(b_i), as `mip_rel_gap` is documented.
        free_error = errors[free, incumbent[free]].sum()
        whole_error = offsets.sum() / scale + upper
        options = {"disp": False,
                   "mip_rel_gap": mip_rel_gap * whole_error / free_error if free_error > 0 else mip_rel_gap}
        if time_limit is not None:
            options["time_limit"] = float(time_limit)
        result = milp(errors[free[item_of], option_of], integrality=np.ones(len(item_of)), bounds=Bounds(0, 1),
                      constraints=LinearConstraint(matrix, bounds_low, bounds_high), options=options)
        proven = result.status == 0
        if result.x is not None:
            picked = np.full((len(free), width), -1.0)
            picked[item_of, option_of] = result.x
            candidate = incumbent.copy()
            candidate[free] = np.argmax(picked, axis=1)
            if _total_cost(items, candidate.tolist()) > budget:  # a tolerance let bytes slip
                candidate, proven = np.array(_repair_to_budget(items, candidate.tolist(), budget)), False
            if errors[rows, candidate].sum() < upper:
                choice = np.array(candidate)
        dual_bound = getattr(result, "mip_dual_bound", None)
        if dual_bound is not None and np.isfinite(dual_bound):
            lower = max(lower, upper - free_error + dual_bound)
    else:
        lower = upper
    return choice.tolist(), proven, math.fsum(offsets) + scale * lower


def _fill_slack(errors: np.ndarray, weights: np.ndarray, choice: np.ndarray, room: float) -> None:
    """Improve `choice` in place: while some item has a better option that fits the room
    left, take the one that lowers the error most. A tighter incumbent makes the
    reduced-cost fixing in `_solve` fix more items."""
    rows = np.arange(len(choice))
    for _ in range(MAX_FILL_MOVES):
        slack = room - weights[rows, choice].sum()
        gain = errors[rows, choice][:, None] - errors
        gain[weights - weights[rows, choice][:, None] > slack] = 0
        item, option = np.unravel_index(np.argmax(gain), gain.shape)
        if gain[item, option] <= 0:
            return
        choice[item] = option


def _repair_to_budget(items: list[_Item], choice: list[int], budget: int) -> list[int]:
    """Cheaper widths until `choice` fits: each step takes the least error increase among
    the moves that remove the whole excess, or, when none does, the least increase per
    byte saved. Only needed when solver tolerances let a few bytes slip, so the excess is
    small; it ends because the all-cheapest allocation fits (checked before solving)."""
    choice = list(choice)
    excess = _total_cost(items, choice) - budget
    while excess > 0:
        moves = [(it.errors[j] - it.errors[choice[i]], it.costs[choice[i]] - it.costs[j], i, j)
                 for i, it in enumerate(items) for j in range(len(it.widths)) if it.costs[j] < it.costs[choice[i]]]
        covering = [m for m in moves if m[1] >= excess]
        _, saved, i, j = min(covering) if covering else min(moves, key=lambda m: m[0] / m[1])
        choice[i], excess = j, excess - saved
    return choice


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


def _whole_bytes(budget: object) -> int:
    if isinstance(budget, bool) or not isinstance(budget, Integral):
        raise MoekitError(f"budget_bytes {budget!r} is not a whole number of bytes; pass an int "
                          "(budget_for_average_bits gives one).")
    return int(budget)
