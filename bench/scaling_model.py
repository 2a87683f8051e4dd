"""Rank model of the FE² example for rank counts beyond this machine (used by bench/scaling.py).

From per-point costs measured on one rank, the bytes the Coupler's collectives carry per
fallback point (pickled as mpi4py sends them, measured here) and the measured time of the
fallback load balancing, it estimates a load step's time and a rank's memory at P ranks. Its
assumptions are returned with the figures and printed (:data:`ASSUMPTIONS`).
"""

from __future__ import annotations

import math
import pickle
import time

import numpy as np

from neuroscale_couple.coupler import BALANCE_RANKS

ALPHA_S = 5e-6
"""Assumed latency of one message between nodes (s): a typical InfiniBand MPI figure."""
BETA_S_PER_BYTE = 1 / 5e9
"""Assumed inverse bandwidth per rank (s/byte): 5 GB/s."""
COLLECTIVES_PER_STEP = 12
"""Scalar allreduces per load step outside the evaluations (Coupler.end_step's report, the
model-version digest, reactions and convergence checks), counted in the code."""
ASSUMPTIONS = [
    f"network: latency {ALPHA_S * 1e6:g} µs per message, {1e-9 / BETA_S_PER_BYTE:g} GB/s per "
    "rank (assumed, not measured: this machine is one node)",
    "allgather and allreduce cost latency · ⌈log₂ P⌉ + bytes received / bandwidth; alltoall "
    "latency · (P − 1) + bytes / bandwidth",
    "per evaluation the Coupler allreduces the request and point counts over all P ranks, "
    "then, within its group of G = min(P, balance_ranks = 64) ranks, allgathers the group's "
    "fallback requests (id, F̄, structure, cost, rank) and one 'holds a solver' flag per "
    "request and group rank, runs the load balancing over G ranks, alltoalls the answers, "
    "and allreduces the failed count over all P; decoding gathered Python objects costs the "
    "measured seconds per object",
    f"{COLLECTIVES_PER_STEP} scalar allreduces per load step besides the evaluations",
    "operator and fine work per point as measured on one rank; points and fallback points "
    "spread evenly, fine work with the largest measured max/mean imbalance",
    "macro assembly + direct solve per Newton iteration: a power law in dofs fitted to the "
    "one-rank runs, divided by P (ideal strong scaling: an optimistic bound for MUMPS)",
    "memory per rank: a linear fit of peak RSS against points per rank (operator runs), plus "
    "the measured MiB per live RVE up to the 2 GiB --rve-memory budget, plus the gathered "
    "requests, flags and the balancing's (requests × P) cost matrices",
]


def collective_sizes(structures: list, repeats: int = 200) -> dict:
    """Bytes and decoding seconds of what the fallback collectives carry, per item, measured
    by pickling as mpi4py does: a request with one of ``structures`` (distinct objects, so no
    pickle memo shortens them), an answer (P̄, A, W, noise, time, rank), a 'holds a solver'
    flag."""
    from neuroscale_couple.coupler import FallbackRequest
    from neuroscale_couple.coupler_state import FineAnswer

    rng = np.random.default_rng(0)
    n = len(structures)
    requests = [FallbackRequest(i, np.eye(2) + 0.01 * rng.standard_normal((2, 2)), s, 0.1, -1)
                for i, s in enumerate(structures)]
    answers = [FineAnswer(rng.standard_normal((2, 2)), rng.standard_normal((2, 2, 2, 2)),
                          1.0, None, 0.1, 0) for _ in range(n)]
    flags = [bool(b) for b in rng.integers(0, 2, repeats * n)]
    out = {}
    for name, items in (("request", requests), ("answer", answers), ("flag", flags)):
        blob = pickle.dumps(items)
        t0 = time.perf_counter()
        pickle.loads(blob)
        out[f"{name}_bytes"] = len(blob) / len(items)
        out[f"{name}_decode_s"] = (time.perf_counter() - t0) / len(items)
    return out


def balance_time(n_items: int, n_ranks: int) -> float:
    """Seconds of one fallback load balancing (:func:`~neuroscale_couple.parallel.balance`) of
    ``n_items`` new points over ``n_ranks`` ranks (measured; every rank runs it)."""
    from neuroscale_couple.parallel import balance

    costs = np.random.default_rng(1).uniform(0.1, 0.2, n_items)
    t0 = time.perf_counter()
    balance(costs, -np.ones(n_items, dtype=np.int64), n_ranks, 0.05)
    return time.perf_counter() - t0


def power_fit(x: list[float], y: list[float]) -> tuple[float, float]:
    """(a, b) of y ≈ a·x^b by least squares in log space (one point: b = 1)."""
    lx, ly = np.log(x), np.log(y)
    if len(x) < 2:
        return float(y[0] / x[0]), 1.0
    b, la = np.polyfit(lx, ly, 1)
    return float(np.exp(la)), float(b)


def predict(costs: dict, sizes: dict, n_points: int, n_ranks: int) -> dict:
    """Time per load step (s, split) and memory per rank (MiB) at ``n_points`` points on
    ``n_ranks`` ranks, from measured ``costs`` (keys: ``operator_s_per_point_eval``,
    ``fine_s_per_solve``, ``solves_per_fallback_point_step``, ``fallback_rate``,
    ``evaluations_per_step``, ``newton_per_step``, ``dofs_per_point``, ``macro_fit`` (a, b)
    per Newton iteration, ``imbalance``, ``rss_fit`` (MiB at 0 points, MiB per point),
    ``rve_mib``, ``rve_budget_mib``) and :func:`collective_sizes` ``sizes``."""
    P, N = n_ranks, n_points
    E = costs["evaluations_per_step"]
    n_fb = N * costs["fallback_rate"]
    log_p = math.ceil(math.log2(P)) if P > 1 else 0
    operator = costs["operator_s_per_point_eval"] * N / P * E
    fine = (costs["fine_s_per_solve"] * costs["solves_per_fallback_point_step"] * n_fb / P
            * costs["imbalance"])
    a, b = costs["macro_fit"]
    macro = a * (N * costs["dofs_per_point"]) ** b / P * costs["newton_per_step"]
    G = min(P, BALANCE_RANKS)  # the balancing group
    log_g = math.ceil(math.log2(G)) if G > 1 else 0
    n_group = n_fb * G / P  # fallback points of one group
    gathered = n_group * sizes["request_bytes"] + n_group * G * sizes["flag_bytes"]
    decode = n_group * sizes["request_decode_s"] + n_group * G * sizes["flag_decode_s"]
    answers = n_fb / P * sizes["answer_bytes"]
    per_eval = (3 * ALPHA_S * log_p + 3 * ALPHA_S * log_g + ALPHA_S * (G - 1)
                + BETA_S_PER_BYTE * (gathered + answers) + decode
                + balance_time(int(min(n_group, 20000)), G)) if n_fb else ALPHA_S * log_p
    comm = E * per_eval + COLLECTIVES_PER_STEP * ALPHA_S * log_p
    base, per_point = costs["rss_fit"]
    live = min(math.ceil(n_fb / P) * costs["rve_mib"], costs["rve_budget_mib"])
    balance_mib = 3 * 8 * n_group * G / 2**20  # cost, extra and trial matrices of float64
    rss = base + per_point * N / P + live + (gathered + balance_mib * 2**20) / 2**20
    return {"points": N, "ranks": P, "points_per_rank": N / P, "operator_s": operator,
            "fine_s": fine, "macro_s": macro, "communication_s": comm,
            "step_s": operator + fine + macro + comm, "rss_mib_per_rank": rss,
            "rss_gib_all_ranks": rss * P / 1024, "gathered_mib_per_eval": gathered / 2**20}
