"""Classical policies for the queueing networks, and a search for the best static priority.

    python -m queueing.baselines --instance criss-cross --policy maxweight     # its steady-state LTA return

A policy maps a batch of observations (N, obs_dim) to action weights (N, K), exactly like the
agent, so every policy goes through the environment's own allocation rule and dynamics. Their LTA returns
come from `queueing.longrun` (simulation to a stated precision, the command above) or
`queueing.exact` (exact on a truncated chain).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

from queueing.env import Network

Policy = Callable[[np.ndarray], np.ndarray]


def _as_network(instance: str | dict | Network) -> Network:
    return Network.from_instance(instance)


def _queues_and_connectivity(network: Network, observations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    queues = observations[..., : network.num_buffers]
    if network.connectivity is None:
        return queues, np.ones(queues.shape, dtype=bool)
    return queues, observations[..., network.num_buffers :] > 0.5


def _best_per_server(network: Network, scores: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """Weight 1 on each server's eligible buffers with the top score (ties share the server), else 0."""
    masked = np.where(eligible, scores, -np.inf)
    top_per_server = (masked[..., None, :] - network.outside_server_penalty).max(axis=-1)
    top = top_per_server[..., network.server_of_buffer]
    return (eligible & (masked == top)).astype(np.float32)


def _priority_policy(network: Network, score: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Policy:
    def policy(observations: np.ndarray) -> np.ndarray:
        queues, connected = _queues_and_connectivity(network, observations)
        return _best_per_server(network, score(queues, connected), (queues > 0) & connected)

    return policy


def cmu_policy(instance, rng: np.random.Generator | None = None) -> Policy:
    """Strict priority to the non-empty connected buffer with the largest c_k * mu_k."""
    network = _as_network(instance)
    index = network.holding_costs * network.service_rates
    return _priority_policy(network, lambda queues, connected: np.broadcast_to(index, queues.shape))


def maxweight_policy(instance, rng: np.random.Generator | None = None) -> Policy:
    """Serve the connected buffer with the largest c_k * mu_k * q_k."""
    network = _as_network(instance)
    index = network.holding_costs * network.service_rates
    return _priority_policy(network, lambda queues, connected: index * queues * connected)


def longest_policy(instance, rng: np.random.Generator | None = None) -> Policy:
    """Serve the longest connected queue (LCQ) of each server."""
    network = _as_network(instance)
    return _priority_policy(network, lambda queues, connected: queues * connected)


def random_policy(instance, rng: np.random.Generator | None = None) -> Policy:
    """Independent uniform weights in [0, 1] per buffer (still never serves an empty buffer)."""
    generator = rng if rng is not None else np.random.default_rng()
    num_buffers = _as_network(instance).num_buffers

    def policy(observations: np.ndarray) -> np.ndarray:
        return generator.random((*observations.shape[:-1], num_buffers)).astype(np.float32)

    return policy


def priority_policy(instance, order: list[int]) -> Policy:
    """Static priority: each server serves its eligible buffer that comes first in `order`."""
    network = _as_network(instance)
    if sorted(order) != list(range(network.num_buffers)):
        raise ValueError(
            f"a priority order must list each of the buffers 0..{network.num_buffers - 1} once, got {order}"
        )
    rank = np.empty(network.num_buffers)
    rank[order] = np.arange(network.num_buffers)
    return _priority_policy(network, lambda queues, connected: np.broadcast_to(-rank, queues.shape))


def lbfs_policy(instance, rng: np.random.Generator | None = None) -> Policy:
    """Last buffer first served: each server serves its eligible buffer with the highest index."""
    network = _as_network(instance)
    return priority_policy(network, list(range(network.num_buffers))[::-1])


def fbfs_policy(instance, rng: np.random.Generator | None = None) -> Policy:
    """First buffer first served: each server serves its eligible buffer with the lowest index."""
    network = _as_network(instance)
    return priority_policy(network, list(range(network.num_buffers)))


# Factories: POLICIES[name](instance, rng) -> policy; only randomised policies use rng.
POLICIES: dict[str, Callable[..., Policy]] = {
    "cmu": cmu_policy,
    "lbfs": lbfs_policy,
    "fbfs": fbfs_policy,
    "maxweight": maxweight_policy,
    "longest": longest_policy,
    "random": random_policy,
}
PRIORITY_PREFIX = "priority:"


def policy_names() -> list[str]:
    """Names `make_policy` accepts."""
    return sorted(POLICIES) + [f"{PRIORITY_PREFIX}ORDER (e.g. {PRIORITY_PREFIX}0,2,1)"]


def make_policy(name: str, instance, rng: np.random.Generator | None = None, exact: bool = False) -> Policy:
    """The policy called `name`: a key of POLICIES, or "priority:" and a buffer order, highest first.

    `exact=True` asks for a policy whose servers' choices have the same distribution without
    drawing random numbers, for the exact solver: "random" then gives all-zero weights, which
    the allocation rule turns into a uniform choice among the eligible buffers, the same law as
    independent uniform weights (they are exchangeable).
    """
    if name.startswith(PRIORITY_PREFIX):
        try:
            order = [int(part) for part in name[len(PRIORITY_PREFIX) :].split(",")]
        except ValueError:
            raise ValueError(f"policy {name!r}: the order must be comma-separated buffer indices") from None
        return priority_policy(instance, order)
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; available policies: {', '.join(policy_names())}")
    if exact and name == "random":
        num_buffers = _as_network(instance).num_buffers
        return lambda observations: np.zeros((*observations.shape[:-1], num_buffers), dtype=np.float32)
    return POLICIES[name](instance, rng)


def server_orders(order: list[int], network: Network) -> list[list[int]]:
    """A global priority order split into each server's own order, highest priority first."""
    return [[buffer for buffer in order if network.server_of_buffer[buffer] == server]
            for server in range(len(network.server_membership))]


def best_static_priority(instance, start_orders: list[list[int]], seed: int = 0, copies: int = 128,
                         horizon: int = 40_000, max_passes: int = 3, log: Callable[[str], None] | None = None
                         ) -> tuple[list[int], float]:
    """The best static priority rule a coordinate search finds; returns the order (highest first) and its score.

    Every candidate is simulated from the same seed, `copies` copies of `horizon` slots, the first half discarded:
    in discrete time by the env (common random numbers, copy i's slot t draws the same numbers under every
    candidate, so candidates are compared paired), in continuous time event by event (`queueing.eventsim`,
    compiled and far faster, but not paired: candidates that serve differently consume the stream differently).
    The search starts from the best of `start_orders` and then, server by server, tries every order of that
    server's buffers with the others fixed, keeping the best; it stops after a pass that changes nothing (or
    `max_passes`). Deterministic given the seed.
    """
    from queueing.eventsim import event_long_run
    from queueing.longrun import long_run

    network = _as_network(instance)
    scores: dict[tuple[int, ...], float] = {}

    def score(order: list[int]) -> float:
        key = tuple(order)
        if key not in scores:
            if network.continuous_time:
                result = event_long_run(network, order=order, seed=seed, copies=copies, precision=1.0,
                                        first_horizon=horizon, max_horizon=horizon)
            else:
                result = long_run(network, priority_policy(network, order), seed, copies, precision=1.0,
                                  first_horizon=horizon, max_horizon=horizon)
            scores[key] = result.lta_return
        return scores[key]

    best = max(start_orders, key=score)
    for _ in range(max_passes):
        changed = False
        for server in range(len(network.server_membership)):
            per_server = server_orders(best, network)
            candidates = []
            for permutation in itertools.permutations(per_server[server]):
                per_server[server] = list(permutation)
                candidates.append([buffer for own in per_server for buffer in own])
            candidate = max(candidates, key=score)
            if score(candidate) > score(best):
                best, changed = candidate, True
                if log:
                    log(f"server {server}: order {server_orders(best, network)[server]}, LTA return {score(best):.4f}")
        if not changed:
            break
    return best, score(best)


def main(argv: list[str] | None = None) -> None:
    from queueing.longrun import main as long_run_main

    long_run_main(argv, prog="python -m queueing.baselines")


if __name__ == "__main__":
    main()
