"""Long-run cost of a continuous-time network, simulated event by event: the fast path of `queueing.longrun`.

    python -m queueing.eventsim --instance reentrant-2 --policy lbfs
    python -m queueing.eventsim --checkpoint runs/<run>/best.pt

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

A static priority order runs entirely in compiled code. Any other policy (a checkpoint's network, MaxWeight) is a
function of the queue lengths called once per event for all copies at once, as the env would call it.
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
def _run_static(queues, clock, integral, end, rank_order, server_of_buffer, num_servers, service_rates,
                arrival_rates, holding_costs, routing_high, has_routing):
    """Advances every copy under the static priority `rank_order` (buffers, highest priority first) until its clock
    reaches `end`; `integral` gets each copy's cost integral up to `end` exactly (the last holding time is split)."""
    copies, num_buffers = queues.shape
    service = np.zeros(num_buffers)
    served = np.zeros(num_servers, dtype=np.bool_)
    at_end = np.empty(copies)
    for copy in range(copies):
        while True:
            service[:] = 0.0
            served[:] = False
            cost = 0.0
            for k in range(num_buffers):
                cost += holding_costs[k] * queues[copy, k]
            for k in rank_order:
                server = server_of_buffer[k]
                if not served[server] and queues[copy, k] > 0:
                    served[server] = True
                    service[k] = service_rates[k]
            holding = 1.0 / (arrival_rates.sum() + service.sum())
            if clock[copy] + holding >= end:
                at_end[copy] = integral[copy] + cost * (end - clock[copy])
                integral[copy] += cost * holding
                clock[copy] += holding
                _event(queues, copy, service, arrival_rates, routing_high, has_routing)
                break
            integral[copy] += cost * holding
            clock[copy] += holding
            _event(queues, copy, service, arrival_rates, routing_high, has_routing)
    return at_end


@numba.njit(cache=True)
def _step_given_service(queues, clock, integral, at_end, active, end, service, arrival_rates, holding_costs,
                        routing_high, has_routing):
    """One event for each active copy, with its service rates (copies, K) already chosen by a policy; a copy whose
    clock passes `end` records its cost integral at `end` and turns inactive."""
    copies, num_buffers = queues.shape
    for copy in range(copies):
        if not active[copy]:
            continue
        cost = 0.0
        for k in range(num_buffers):
            cost += holding_costs[k] * queues[copy, k]
        holding = 1.0 / (arrival_rates.sum() + service[copy].sum())
        if clock[copy] + holding >= end:
            at_end[copy] = integral[copy] + cost * (end - clock[copy])
            active[copy] = False
        integral[copy] += cost * holding
        clock[copy] += holding
        _event(queues, copy, service[copy], arrival_rates, routing_high, has_routing)


def event_long_run(network: Network | str | dict, policy: Policy | None = None, order: list[int] | None = None,
                   seed: int = 0, copies: int = DEFAULT_COPIES, precision: float = DEFAULT_PRECISION,
                   first_horizon: int = DEFAULT_FIRST_HORIZON, max_horizon: int = DEFAULT_MAX_HORIZON) -> LongRun:
    """`queueing.longrun.long_run` for a continuous-time network, event by event: give the policy as `order` (a
    static priority, buffers highest first, all compiled) or as `policy` (observations -> actions, as the env takes
    them under the network's allocation rule). Horizons in slots of the uniformized chain; the result's `horizon`
    too (rounded), its `lta_return` minus the cost per unit time."""
    if (policy is None) == (order is None):
        raise ValueError("give exactly one of policy or order")
    check_sizes(copies, first_horizon)
    start = time.perf_counter()
    network = Network.from_instance(network)
    check_network(network)
    num_buffers = network.num_buffers
    if order is not None and sorted(order) != list(range(num_buffers)):
        raise ValueError(f"a priority order must list each of the buffers 0..{num_buffers - 1} once, got {order}")
    arrays = dict(arrival_rates=network.arrival_rates.astype(np.float64),
                  holding_costs=network.holding_costs.astype(np.float64),
                  routing_high=(network.routing_high if network.routing_high is not None
                                else np.zeros((num_buffers, num_buffers))).astype(np.float64),
                  has_routing=network.routing_high is not None)
    _seed(seed)
    queues = np.zeros((copies, num_buffers), dtype=np.int64)
    clock, integral = np.zeros(copies), np.zeros(copies)
    connected = np.ones((copies, num_buffers), dtype=bool)

    def advance(end: float) -> np.ndarray:
        if (clock >= end).any():  # a holding time longer than a quarter of the horizon
            raise ValueError(f"first_horizon {first_horizon} is too short for {network.name}: raise it")
        if order is not None:
            return _run_static(queues, clock, integral, end, np.asarray(order, dtype=np.int64),
                               network.server_of_buffer.astype(np.int64), len(network.server_membership),
                               network.service_rates.astype(np.float64), **arrays)
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


STATIC_ORDERS = {
    "lbfs": lambda network: list(range(network.num_buffers))[::-1],
    "fbfs": lambda network: list(range(network.num_buffers)),
}


def static_order(name: str, network: Network) -> list[int] | None:
    """The priority order of a classical rule that is a static priority (LBFS, FBFS, and c-mu without ties within
    a server), or None: then the rule runs as a policy function."""
    if name in STATIC_ORDERS:
        return STATIC_ORDERS[name](network)
    if name == "cmu":
        index = network.holding_costs * network.service_rates
        for buffers in network.server_membership.astype(bool):
            if len(set(index[buffers])) < buffers.sum():
                return None  # ties share the server: not a strict order
        return [int(k) for k in np.argsort(-index, kind="stable")]
    return None


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
    args = parser.parse_args(argv)
    if bool(args.policy) == bool(args.checkpoint):
        parser.error("give exactly one of --policy (with --instance) or --checkpoint")
    if args.copies < 2 or not 0 < args.precision < 1:
        parser.error("--copies must be >= 2 and --precision in (0, 1)")
    try:
        if args.checkpoint:
            policy, network = checkpoint_policy(args.checkpoint)
            order, what = None, f"checkpoint {args.checkpoint}"
        else:
            network = Network.from_instance(args.instance or "criss-cross-bh")
            order = static_order(args.policy, network)
            policy = None if order is not None else make_policy(args.policy, network, np.random.default_rng(args.seed))
            what = f"policy {args.policy}"
        result = event_long_run(network, policy, order, args.seed, args.copies, args.precision)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(f"instance {network.name}, {what}: {result.describe()} (event by event); seed {args.seed}; "
          f"{result.seconds:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
