"""Long-run cost of a continuous-time network, simulated event by event: the fast path of `queueing.longrun`.

    python -m queueing.eventsim --instance reentrant-2 --policy lbfs
    python -m queueing.eventsim --checkpoint runs/<run>/best.pt
    python -m queueing.eventsim --instance reentrant-7 --policy cmu --from-empty 10000 50000 100000 400000

The env (`queueing.env`) steps the uniformized chain: a slot holds at most one event, and on the re-entrant lines
four slots in five hold none (a service draw at an idle buffer, or at a buffer its server did not pick). Here each
step is one real event of the continuous-time Markov chain, compiled with numba, so a static priority costs a
small fraction of what the env costs per unit of simulated time. The chain is the same: state k leaves at total rate
R(k) = sum of the arrival rates + sum over the buffers being served of their service rates, to the event drawn in
proportion to its rate. The uniformized chain's time average per slot is the chain's average cost per unit time.

Each copy's cost integral charges state k its expected holding time 1/R(k) instead of a drawn one (conditional
Monte Carlo: the same long-run average, less variance). The estimator is `queueing.longrun`'s: `copies` independent
copies start empty and run T units of time; each copy's time-average cost over [T/2, T) is one replication, the 95%
CI is Student's t over them, T doubles until the half-width is within `precision` of the mean, and the paired
difference of the last two quarters checks stationarity. Horizons are given in slots of the uniformized chain (the
env's unit, T_slots = T * Lambda) so that both simulators read the same. Decisions depend on the simulated values
only: a seed gives the same answer on any machine.

An index rule (a static priority, c-mu, MaxWeight, LBFS, FBFS: each server serves its non-empty buffers of the
largest slope_k q_k + offset_k) runs entirely in compiled code. Any other policy, a checkpoint's network for one, is
a function of the queue lengths called once per event for all copies at once, as the env would call it.
"""

from __future__ import annotations

import math
import sys
import time

import numba
import numpy as np

from queueing.env import Network, server_allocation
from queueing.longrun import DEFAULT_COPIES, DEFAULT_FIRST_HORIZON, DEFAULT_MAX_HORIZON, DEFAULT_PRECISION, \
    LongRun, Policy, check_sizes, doubling_estimate


def check_network(network: Network) -> None:
    if not network.continuous_time:
        raise ValueError(f"{network.name} is a discrete-time network: its slots are its events; use queueing.longrun")


@numba.njit(cache=True)
def _seed(seed):
    np.random.seed(seed)


@numba.njit(cache=True)
def _event(queues, copy, service, arrival_rates, routing_high, has_routing):
    """Draws the next event of one copy from its rates (arrivals, then the served buffers) and applies it."""
    num_buffers = queues.shape[1]
    total = arrival_rates.sum() + service.sum()
    draw = np.random.random() * total
    for k in range(num_buffers):
        draw -= arrival_rates[k]
        if draw < 0.0:
            queues[copy, k] += 1
            return
    for k in range(num_buffers):
        draw -= service[k]
        if draw < 0.0:
            queues[copy, k] -= 1
            if has_routing:
                route = np.random.random()
                for destination in range(num_buffers):
                    if route < routing_high[k, destination]:
                        queues[copy, destination] += 1
                        break
            return


@numba.njit(cache=True)
def _hold_and_jump(queues, copy, clock, integral, service, end, arrival_rates, holding_costs, routing_high,
                   has_routing):
    """Charges one copy its state's cost for the expected holding time 1/R, then applies its next event. Returns the
    cost integral at `end` if this holding time reaches `end` (the interval split exactly), else NaN."""
    cost = 0.0
    for k in range(queues.shape[1]):
        cost += holding_costs[k] * queues[copy, k]
    holding = 1.0 / (arrival_rates.sum() + service.sum())
    at_end = integral[copy] + cost * (end - clock[copy]) if clock[copy] + holding >= end else np.nan
    integral[copy] += cost * holding
    clock[copy] += holding
    _event(queues, copy, service, arrival_rates, routing_high, has_routing)
    return at_end


@numba.njit(cache=True)
def _run_index(queues, clock, integral, end, slope, offset, server_of_buffer, num_servers, service_rates,
               arrival_rates, holding_costs, routing_high, has_routing):
    """Advances every copy under an index rule until its clock reaches `end`: each server serves its non-empty
    buffers of the largest slope_k * q_k + offset_k (tied buffers share it equally, as `queueing.baselines` rules
    do); `integral` gets each copy's cost integral up to `end` exactly (the last holding time is split)."""
    copies, num_buffers = queues.shape
    service = np.zeros(num_buffers)
    score = np.zeros(num_buffers)
    top = np.zeros(num_servers)
    ties = np.zeros(num_servers)
    at_end = np.empty(copies)
    for copy in range(copies):
        while True:
            top[:] = -np.inf
            ties[:] = 0.0
            for k in range(num_buffers):
                score[k] = slope[k] * queues[copy, k] + offset[k] if queues[copy, k] > 0 else -np.inf
                top[server_of_buffer[k]] = max(top[server_of_buffer[k]], score[k])
            for k in range(num_buffers):
                if score[k] > -np.inf and score[k] == top[server_of_buffer[k]]:
                    ties[server_of_buffer[k]] += 1.0
            for k in range(num_buffers):
                served = score[k] > -np.inf and score[k] == top[server_of_buffer[k]]
                service[k] = service_rates[k] / ties[server_of_buffer[k]] if served else 0.0
            value = _hold_and_jump(queues, copy, clock, integral, service, end, arrival_rates, holding_costs,
                                   routing_high, has_routing)
            if not np.isnan(value):
                at_end[copy] = value
                break
    return at_end


@numba.njit(cache=True)
def _step_given_service(queues, clock, integral, at_end, active, end, service, arrival_rates, holding_costs,
                        routing_high, has_routing):
    """One event for each active copy, with its service rates (copies, K) already chosen by a policy; a copy whose
    clock passes `end` records its cost integral at `end` and turns inactive."""
    for copy in range(queues.shape[0]):
        if active[copy]:
            value = _hold_and_jump(queues, copy, clock, integral, service[copy], end, arrival_rates, holding_costs,
                                   routing_high, has_routing)
            if not np.isnan(value):
                at_end[copy], active[copy] = value, False


def chain_arrays(network: Network) -> dict:
    """The compiled kernels' view of the chain: arrival rates, holding costs and routing."""
    num_buffers = network.num_buffers
    return dict(arrival_rates=network.arrival_rates.astype(np.float64),
                holding_costs=network.holding_costs.astype(np.float64),
                routing_high=(network.routing_high if network.routing_high is not None
                              else np.zeros((num_buffers, num_buffers))).astype(np.float64),
                has_routing=network.routing_high is not None)


def event_long_run(network: Network | str | dict, policy: Policy | None = None, order: list[int] | None = None,
                   seed: int = 0, copies: int = DEFAULT_COPIES, precision: float = DEFAULT_PRECISION,
                   first_horizon: int = DEFAULT_FIRST_HORIZON, max_horizon: int = DEFAULT_MAX_HORIZON,
                   index: tuple[np.ndarray, np.ndarray] | None = None) -> LongRun:
    """`queueing.longrun.long_run` for a continuous-time network, event by event. Give the policy as one of: `order`
    (a static priority, buffers highest first), `index` (slope, offset: each server serves its non-empty buffers of
    the largest slope_k q_k + offset_k; see `index_rule`), both run compiled, or `policy` (observations -> actions,
    as the env takes them under the network's allocation rule). Horizons in slots of the uniformized chain; the
    result's `horizon` too, its `lta_return` minus the cost per unit time."""
    if sum(given is not None for given in (policy, order, index)) != 1:
        raise ValueError("give exactly one of policy, order or index")
    check_sizes(copies, first_horizon)
    start = time.perf_counter()
    network = Network.from_instance(network)
    check_network(network)
    num_buffers = network.num_buffers
    if order is not None:
        if sorted(order) != list(range(num_buffers)):
            raise ValueError(f"a priority order must list each of the buffers 0..{num_buffers - 1} once, got {order}")
        rank = np.empty(num_buffers)
        rank[order] = np.arange(num_buffers)
        index = (np.zeros(num_buffers), -rank)
    arrays = chain_arrays(network)
    _seed(seed)
    queues = np.zeros((copies, num_buffers), dtype=np.int64)
    clock, integral = np.zeros(copies), np.zeros(copies)
    connected = np.ones((copies, num_buffers), dtype=bool)

    def advance(end: float) -> np.ndarray:
        if (clock >= end).any():  # a holding time longer than a quarter of the horizon
            raise ValueError(f"first_horizon {first_horizon} is too short for {network.name}: raise it")
        if index is not None:
            return _run_index(queues, clock, integral, end, np.asarray(index[0], dtype=np.float64),
                              np.asarray(index[1], dtype=np.float64), network.server_of_buffer.astype(np.int64),
                              len(network.server_membership), network.service_rates.astype(np.float64), **arrays)
        at_end, active = np.empty(copies), np.ones(copies, dtype=bool)
        while active.any():
            actions = policy(queues.astype(np.float32))
            probabilities = server_allocation(actions, queues, connected, network.server_membership, network.allocation)
            _step_given_service(queues, clock, integral, at_end, active, end, probabilities * network.service_rates,
                                **arrays)
        return at_end

    to_time = 1.0 / network.uniformization_rate
    # The cost integral up to time T, as a reward summed over T * Lambda slots of the uniformized chain.
    return doubling_estimate(lambda end: -advance(end * to_time) / to_time, copies, precision, first_horizon,
                             max_horizon, start)


def cost_from_empty(network: Network | str | dict, index: tuple[np.ndarray, np.ndarray], edges: list[int],
                    seed: int = 0, copies: int = 256) -> list[tuple[int, int, float, float]]:
    """How long a network takes to forget its empty start under an index rule: `copies` independent copies start
    empty, and each window [a, b) of consecutive `edges` (slots of the uniformized chain, the first window starting
    at 0) gets the copies' mean cost per unit time over it, with the 95% CI half-width (Student's t over copies).
    Returns [(a, b, mean, half_width)]."""
    from scipy import stats

    network = Network.from_instance(network)
    check_network(network)
    if copies < 2 or not edges or list(edges) != sorted(set(edges)) or edges[0] <= 0:
        raise ValueError("give at least 2 copies and increasing positive window edges")
    _seed(seed)
    queues = np.zeros((copies, network.num_buffers), dtype=np.int64)
    clock, integral, before = np.zeros(copies), np.zeros(copies), np.zeros(copies)
    to_time, start, windows = 1.0 / network.uniformization_rate, 0, []
    for end in edges:
        at_end = _run_index(queues, clock, integral, end * to_time, np.asarray(index[0], dtype=np.float64),
                            np.asarray(index[1], dtype=np.float64), network.server_of_buffer.astype(np.int64),
                            len(network.server_membership), network.service_rates.astype(np.float64),
                            **chain_arrays(network))
        costs = (at_end - before) / ((end - start) * to_time)
        half_width = stats.t.ppf(0.975, copies - 1) * costs.std(ddof=1) / math.sqrt(copies)
        windows.append((start, end, float(costs.mean()), float(half_width)))
        before, start = at_end, end
    return windows


def index_rule(name: str, network: Network) -> tuple[np.ndarray, np.ndarray] | None:
    """(slope, offset) of a classical rule that is an index rule, as `queueing.baselines` defines it (ties share the
    server), or None: c-mu (offset c_k mu_k), MaxWeight (slope c_k mu_k), LBFS and FBFS (offset from the index)."""
    num_buffers, zeros = network.num_buffers, np.zeros(network.num_buffers)
    index = network.holding_costs * network.service_rates
    rules = {"cmu": (zeros, index), "maxweight": (index, zeros), "lbfs": (zeros, np.arange(num_buffers, dtype=float)),
             "fbfs": (zeros, -np.arange(num_buffers, dtype=float))}
    return rules.get(name)


def main(argv: list[str] | None = None) -> None:
    from queueing.baselines import make_policy, policy_names
    from queueing.longrun import _OneLineErrorParser, checkpoint_policy

    parser = _OneLineErrorParser(prog="python -m queueing.eventsim", description=__doc__.split("\n")[0])
    parser.add_argument("--instance", help="instance name or JSON file (with --policy)")
    parser.add_argument("--policy", help=f"a classical policy: {', '.join(policy_names())}")
    parser.add_argument("--checkpoint", help="a ppo_continuous.py checkpoint: its deterministic policy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--copies", type=int, default=DEFAULT_COPIES, help="independent replications")
    parser.add_argument("--precision", type=float, default=DEFAULT_PRECISION,
                        help="target 95%% CI half-width, relative to the value")
    parser.add_argument("--from-empty", type=int, nargs="+", metavar="SLOTS",
                        help="instead: mean cost per window between these slot counts from an empty start (index rules)")
    args = parser.parse_args(argv)
    if bool(args.policy) == bool(args.checkpoint):
        parser.error("give exactly one of --policy (with --instance) or --checkpoint")
    if args.copies < 2 or not 0 < args.precision < 1:
        parser.error("--copies must be >= 2 and --precision in (0, 1)")
    try:
        if args.checkpoint:
            (policy, network), index = checkpoint_policy(args.checkpoint), None
            what = f"checkpoint {args.checkpoint}"
        else:
            network = Network.from_instance(args.instance or "criss-cross-bh")
            index = index_rule(args.policy, network)
            policy = None if index is not None else make_policy(args.policy, network, np.random.default_rng(args.seed))
            what = f"policy {args.policy}"
        if args.from_empty:
            if index is None:
                raise ValueError("--from-empty takes an index rule: --policy cmu, maxweight, lbfs or fbfs")
            for start, end, mean, half_width in cost_from_empty(network, index, args.from_empty, args.seed,
                                                                  args.copies):
                print(f"slots {start:>9,}-{end:>9,}: cost {mean:.3f} +- {half_width:.3f}")
            return
        result = event_long_run(network, policy, None, args.seed, args.copies, args.precision, index=index)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(f"instance {network.name}, {what}: {result.describe()} (event by event); seed {args.seed}; "
          f"{result.seconds:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
