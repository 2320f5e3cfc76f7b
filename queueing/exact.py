"""Exact long-term-average (LTA) returns of a queueing instance on a truncated state space.

    python -m queueing.exact --instance criss-cross                      # the optimum
    python -m queueing.exact --instance criss-cross --policy maxweight   # a classical policy
    python -m queueing.exact --checkpoint runs/<run>/best.pt             # a trained agent

The model is the environment's own (`queueing.env`): the per-slot probabilities come from the
same `Network` fields and the servers' choices from the same `server_allocation` the simulator
uses. States are the queue vectors with at most L jobs in total (the truncation level); an
outside arrival that would take the total above L is lost (when two arrive in one slot and only
one fits, the one at the lower-numbered buffer is kept). Service and routing never change the
total upwards, so they are never blocked. Buffers that no job can ever reach stay at 0. With
connectivity, the bits of a slot are independent of the past, so the chain on the queues alone
is Markov and the bits are averaged over inside each step.

Both computations are relative value iteration on scipy sparse matrices (one per joint choice
of the servers), stopped when the span of the last update, which brackets the gain (Odoni's
bounds), is below `TOLERANCE` times the gain:

- the optimum: the update takes the best choice in each state. The env is work-conserving, so a
  server with a non-empty connected buffer serves one of them; randomised weights never do
  better than the best deterministic choice;
- a fixed policy (classical, or a checkpoint's deterministic policy): the update follows the
  policy's own chain, whose transition matrix mixes the choice matrices with the probabilities
  `server_allocation` gives to the policy's weights in each state. (A direct sparse solve for the
  stationary distribution fills in far too much on these chains: 120M factor entries at 118k
  states.)

The truncation level is raised by `TRUNCATION_GROWTH` until two successive levels give values that differ by
less than a tolerance (`--tolerance`, default `MAX_RELATIVE_CHANGE` = 0.1%): "exact on a truncated chain, converged to
the tolerance". That stop rule is a heuristic (blocking lowers the cost, so values rise towards the limit); both
levels are reported. A policy's gap to the optimum is computed on the SAME truncated chain at every level (the policy
is one of the stationary policies the optimum minimises over there, so the gap is never negative), and the change of
the gap between the last two levels is reported as what the truncation leaves uncertain. Optima are cached per model
and level (`cached_optimum`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse
from filelock import FileLock, Timeout

from queueing.baselines import make_policy, policy_names
from queueing.env import Network, load_instance, observation, server_allocation

MAX_RELATIVE_CHANGE = 0.001
TRUNCATION_GROWTH = 1.25
# Refuse state spaces (queue states x connectivity patterns) above this: the solver would need
# more than a few minutes or gigabytes of memory on a small machine.
MAX_STATES = 1_500_000
DEFAULT_START_TRUNCATION = 40
# Relative width of the bracket on the gain at which relative value iteration stops.
TOLERANCE = 1e-6
MAX_ITERATIONS = 1_000_000

Policy = Callable[[np.ndarray], np.ndarray]


def reachable_buffers(network: Network) -> np.ndarray:
    """(K,) bool: buffers some job can ever enter (outside arrivals, or routing from such a buffer)."""
    reachable = network.arrival_probabilities > 0
    while True:
        grown = reachable.copy()
        if network.routing is not None:
            grown |= (network.routing[reachable] > 0).any(axis=0)
        if np.array_equal(grown, reachable):
            return reachable
        reachable = grown


@dataclass(frozen=True)
class StateSpace:
    """All queue vectors with at most `level` jobs in total, in lexicographic order."""

    level: int
    limits: np.ndarray  # (K,) the largest value of each queue: `level`, or 0 for unreachable buffers
    queues: np.ndarray  # (n, K) int64
    codes: np.ndarray  # (n,) each state's index in the box prod(limits + 1), increasing

    @classmethod
    def truncated(cls, network: Network, level: int) -> StateSpace:
        limits = np.where(reachable_buffers(network), level, 0)
        queues = np.zeros((1, 0), dtype=np.int64)
        for limit in limits:  # extend by one buffer at a time, keeping the total within the level
            counts = np.minimum(level - queues.sum(axis=1), limit) + 1
            values = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            queues = np.column_stack([np.repeat(queues, counts, axis=0), values])
        return cls(level, limits, queues, np.ravel_multi_index(tuple(queues.T), tuple(limits + 1)))

    @property
    def size(self) -> int:
        return len(self.queues)

    def index(self, queues: np.ndarray) -> np.ndarray:
        """Positions of queue vectors (..., K) that are in the space."""
        return np.searchsorted(self.codes, np.ravel_multi_index(tuple(np.moveaxis(queues, -1, 0)), tuple(self.limits + 1)))


def space_size(network: Network, level: int) -> int:
    """Number of (queue vector, connectivity pattern) pairs the solver handles at this level."""
    return math.comb(level + int(reachable_buffers(network).sum()), level) * len(connectivity_patterns(network)[0])


def connectivity_patterns(network: Network) -> tuple[np.ndarray, np.ndarray]:
    """All connectivity bit patterns with positive probability, (P, K) bool, and their probabilities (P,)."""
    if network.connectivity is None:
        return np.ones((1, network.num_buffers), dtype=bool), np.ones(1)
    per_buffer = [
        [(bit, probability) for bit, probability in ((True, p), (False, 1 - p)) if probability > 0]
        for p in network.connectivity
    ]
    patterns, probabilities = [], []
    for combination in itertools.product(*per_buffer):
        patterns.append([bit for bit, _ in combination])
        probabilities.append(math.prod(probability for _, probability in combination))
    return np.array(patterns, dtype=bool), np.array(probabilities)


def service_configurations(network: Network) -> list[tuple[int, ...]]:
    """Every joint choice of the servers: per server one of its buffers, or -1 (idle)."""
    per_server = [list(np.flatnonzero(row)) + [-1] for row in network.server_membership]
    return list(itertools.product(*per_server))


def slot_outcomes(network: Network, served: list[int]) -> dict[tuple[tuple[int, ...], tuple[int, ...]], float]:
    """What one slot can do when the buffers `served` are served: {(service change, arrivals): probability}.

    The service change holds the completions and routing (-1 at a completing buffer, +1 where
    its job goes); arrivals are 0/1 per buffer. Uses exactly the simulator's per-slot
    probabilities: in discrete time every completion, routing and arrival is independent; in
    continuous time a slot holds at most one event.
    """
    num_buffers = network.num_buffers
    zero = np.zeros(num_buffers, dtype=np.int64)

    def unit(buffer: int) -> np.ndarray:
        change = zero.copy()
        change[buffer] = 1
        return change

    def destinations(buffer: int) -> list[tuple[np.ndarray, float]]:
        """Where a job completed at `buffer` goes: another buffer, or out (a zero change)."""
        if network.routing is None:
            return [(zero, 1.0)]
        row = network.routing[buffer]
        moves = [(unit(target), float(row[target])) for target in np.flatnonzero(row > 0)]
        leave = 1.0 - float(row.sum())
        return moves + ([(zero, leave)] if leave > 0 else [])

    outcomes: dict[tuple[tuple[int, ...], tuple[int, ...]], float] = {}

    def add(service_change: np.ndarray, arrivals: np.ndarray, probability: float) -> None:
        if probability > 0:
            key = (tuple(int(v) for v in service_change), tuple(int(v) for v in arrivals))
            outcomes[key] = outcomes.get(key, 0.0) + probability

    if network.continuous_time:
        for buffer in np.flatnonzero(network.arrival_probabilities > 0):
            add(zero, unit(buffer), float(network.arrival_probabilities[buffer]))
        for buffer in served:
            for move, probability in destinations(buffer):
                add(move - unit(buffer), zero, float(network.service_probabilities[buffer]) * probability)
        nothing = 1.0 - network.arrival_probabilities.sum() - network.service_probabilities[served].sum()
        add(zero, zero, float(nothing))
        return outcomes

    # Discrete time: each served buffer completes or not, each completion is routed, each buffer
    # gets an arrival or not, all independently.
    service_branches = []
    for buffer in served:
        mu = float(network.service_probabilities[buffer])
        service_branches.append(
            [(move - unit(buffer), mu * probability) for move, probability in destinations(buffer)] + [(zero, 1.0 - mu)]
        )
    arrival_branches = [
        [(unit(buffer), float(p)), (zero, 1.0 - float(p))] for buffer, p in enumerate(network.arrival_probabilities) if p > 0
    ]
    for services in itertools.product(*service_branches):
        for arrivals in itertools.product(*arrival_branches):
            add(
                sum((change for change, _ in services), zero),
                sum((change for change, _ in arrivals), zero),
                math.prod(probability for _, probability in services + arrivals),
            )
    return outcomes


@dataclass(frozen=True)
class TransitionModel:
    """The truncated chain: one sparse matrix per joint choice of the servers, on the rows where it is possible."""

    network: Network
    space: StateSpace
    configurations: list[tuple[int, ...]]
    rows: list[np.ndarray]  # per configuration: the states where every chosen buffer is non-empty
    matrices: list[scipy.sparse.csr_matrix]  # per configuration: (len(rows), n) transition probabilities
    costs: np.ndarray  # (n,) holding cost of each state

    @classmethod
    def build(cls, network: Network, level: int) -> TransitionModel:
        space = StateSpace.truncated(network, level)
        configurations = service_configurations(network)
        rows, matrices = [], []
        for configuration in configurations:
            served = [buffer for buffer in configuration if buffer >= 0]
            row_states = np.flatnonzero((space.queues[:, served] > 0).all(axis=1))
            outcomes = slot_outcomes(network, served)
            service_changes = np.array([change for change, _ in outcomes], dtype=np.int64)
            arrivals = np.array([arrival for _, arrival in outcomes], dtype=np.int64)
            # (outcomes, rows, K): after service; then the arrivals that fit, lowest buffer first.
            after_service = space.queues[row_states][None, :, :] + service_changes[:, None, :]
            room = level - after_service.sum(axis=2, keepdims=True)
            kept = arrivals[:, None, :] * (np.cumsum(arrivals, axis=1)[:, None, :] <= room)
            columns = space.index(after_service + kept).ravel()
            row_ids = np.tile(np.arange(len(row_states)), len(outcomes))
            values = np.repeat(np.array(list(outcomes.values())), len(row_states))
            matrices.append(scipy.sparse.csr_matrix((values, (row_ids, columns)), shape=(len(row_states), space.size)))
            rows.append(row_states)
        costs = (space.queues * network.holding_costs).sum(axis=1)
        return cls(network, space, configurations, rows, matrices, costs)


def allowed_configurations(model: TransitionModel, patterns: np.ndarray) -> np.ndarray:
    """(P, C, n) bool: joint choice c is what a work-conserving env can do in state n with pattern p.

    Each server with a non-empty connected buffer serves one of them; the others idle.
    """
    network, queues = model.network, model.space.queues
    allowed = np.zeros((len(patterns), len(model.configurations), model.space.size), dtype=bool)
    for pattern_index, pattern in enumerate(patterns):
        eligible = (queues > 0) & pattern  # (n, K)
        server_busy = (eligible[:, None, :] & (network.server_membership > 0)).any(axis=2)  # (n, S)
        for config_index, configuration in enumerate(model.configurations):
            ok = np.ones(model.space.size, dtype=bool)
            for server, buffer in enumerate(configuration):
                ok &= eligible[:, buffer] if buffer >= 0 else ~server_busy[:, server]
            allowed[pattern_index, config_index] = ok
    return allowed


def policy_transition(model: TransitionModel, policy: Policy) -> scipy.sparse.csr_matrix:
    """(n, n) transition matrix of the chain a policy (observations -> weights) drives.

    Each server picks its buffers with the probabilities `server_allocation` gives, as in the
    env, independently of the other servers; connectivity patterns are averaged over.
    """
    network, space = model.network, model.space
    patterns, pattern_probabilities = connectivity_patterns(network)
    transition = scipy.sparse.csr_matrix((space.size, space.size))
    for pattern, pattern_probability in zip(patterns, pattern_probabilities):
        connected = np.broadcast_to(pattern, space.queues.shape)
        weights = np.asarray(policy(observation(network, space.queues, connected)), dtype=np.float64)
        allocation = server_allocation(weights, space.queues, connected, network.server_membership, network.allocation)
        for configuration, rows, matrix in zip(model.configurations, model.rows, model.matrices):
            probability = np.full(len(rows), pattern_probability)
            for server, buffer in enumerate(configuration):
                own = network.server_membership[server] > 0
                # An idle server is one with nothing to pick (its allocation sums to 0).
                chosen = allocation[rows, buffer] if buffer >= 0 else 1.0 - allocation[rows][:, own].sum(axis=1)
                probability = probability * chosen
            spread = scipy.sparse.csr_matrix((probability, (rows, np.arange(len(rows)))), shape=(space.size, len(rows)))
            transition = transition + spread @ matrix
    return transition.tocsr()


@dataclass(frozen=True)
class Solution:
    lta_return: float  # minus the average holding cost per slot
    level: int
    states: int
    iterations: int
    seconds: float


def relative_value_iteration(
    update: Callable[[np.ndarray], np.ndarray], initial: np.ndarray, tolerance: float, max_iterations: int
) -> tuple[float, np.ndarray, int]:
    """Iterates h <- T(h) - T(h)[0] until the span of T(h) - h is below tolerance * |gain|.

    T(h) = expected cost of the next state + h(next state), minimised over the choices for the
    optimum. min and max of T(h) - h bracket the average cost per slot; returns their midpoint,
    the relative values h and the number of iterations.
    """
    bias = initial
    for iteration in range(1, max_iterations + 1):
        updated = update(bias)
        difference = updated - bias
        low, high = float(difference.min()), float(difference.max())
        bias = updated - updated[0]
        if high - low <= tolerance * max(abs(high), 1e-12):
            return (low + high) / 2, bias, iteration
    raise ValueError(f"relative value iteration did not converge in {max_iterations} iterations")


def solve_truncation(
    network: Network, level: int, policy: Policy | None = None, tolerance: float = TOLERANCE,
    max_iterations: int = MAX_ITERATIONS, warm_start: Callable[[StateSpace], np.ndarray] | None = None,
) -> tuple[Solution, Callable[[StateSpace], np.ndarray]]:
    """LTA return on the truncation at `level`: optimal (policy None) or of the given policy.

    Returns the solution and a function giving its relative values on another state space (the
    value at the nearest state of this one), to warm-start a finer truncation.
    """
    start = time.perf_counter()
    model = TransitionModel.build(network, level)
    size = model.space.size
    patterns, pattern_probabilities = connectivity_patterns(network)
    next_costs = [matrix @ model.costs for matrix in model.matrices]
    if policy is None and len(patterns) == 1:
        # Without connectivity a choice is allowed in a fixed set of states: keep only those rows.
        allowed = allowed_configurations(model, patterns)[0]
        kept = [np.flatnonzero(allowed[config_index, rows]) for config_index, rows in enumerate(model.rows)]
        rows_kept = [rows[keep] for rows, keep in zip(model.rows, kept)]
        matrices_kept = [matrix[keep] for matrix, keep in zip(model.matrices, kept)]
        next_costs_kept = [next_cost[keep] for next_cost, keep in zip(next_costs, kept)]
        q_values = np.full((len(model.configurations), size), np.inf)

        def update(bias: np.ndarray) -> np.ndarray:
            for config_index, (rows, matrix, next_cost) in enumerate(zip(rows_kept, matrices_kept, next_costs_kept)):
                q_values[config_index, rows] = next_cost + matrix @ bias
            return q_values.min(axis=0)
    elif policy is None:
        allowed = allowed_configurations(model, patterns)
        q_values = np.full((len(model.configurations), size), np.inf)

        def update(bias: np.ndarray) -> np.ndarray:
            for config_index, (rows, matrix, next_cost) in enumerate(zip(model.rows, model.matrices, next_costs)):
                q_values[config_index, rows] = next_cost + matrix @ bias
            # The best allowed choice for each connectivity pattern, averaged over the patterns.
            return pattern_probabilities @ np.where(allowed, q_values[None], np.inf).min(axis=1)
    else:
        transition = policy_transition(model, policy)
        policy_next_cost = transition @ model.costs

        def update(bias: np.ndarray) -> np.ndarray:
            return policy_next_cost + transition @ bias

    initial = np.zeros(size) if warm_start is None else warm_start(model.space)
    gain, bias, iterations = relative_value_iteration(update, initial, tolerance, max_iterations)

    def bias_on(space: StateSpace) -> np.ndarray:
        scale = np.minimum(1.0, level / np.maximum(space.queues.sum(axis=1, keepdims=True), 1))
        nearest = np.minimum(np.floor(space.queues * scale).astype(np.int64), model.space.limits)
        return bias[model.space.index(nearest)]

    solution = Solution(-gain, level, size * len(patterns), iterations, time.perf_counter() - start)
    return solution, bias_on


def greedy_policy(network: Network, level: int) -> Policy:
    """The optimal policy of the truncation at `level`, for simulating on the untruncated network.

    In each state it serves what minimises the one-step cost plus the optimum's relative value of the next state;
    a state beyond the truncation acts as the state with its queues scaled down into it. Actions are one-hot per
    server, so both allocation rules read them as the same deterministic choice. Instances without connectivity.
    """
    if network.connectivity is not None:
        raise ValueError("greedy_policy needs an instance without connectivity")
    solution, bias_on = solve_truncation(network, level)
    model = TransitionModel.build(network, level)
    bias = bias_on(model.space)
    allowed = allowed_configurations(model, connectivity_patterns(network)[0])[0]
    q_values = np.full((len(model.configurations), model.space.size), np.inf)
    for config_index, (rows, matrix) in enumerate(zip(model.rows, model.matrices)):
        q_values[config_index, rows] = matrix @ model.costs + matrix @ bias
    q_values[~allowed] = np.inf
    weights = np.zeros((len(model.configurations), network.num_buffers), dtype=np.float32)
    for config_index, configuration in enumerate(model.configurations):
        weights[config_index, [buffer for buffer in configuration if buffer >= 0]] = 1.0
    actions = weights[q_values.argmin(axis=0)]  # (n, K)

    def policy(observations: np.ndarray) -> np.ndarray:
        queues = np.rint(observations[..., : network.num_buffers]).astype(np.int64)
        scale = np.minimum(1.0, level / np.maximum(queues.sum(axis=-1, keepdims=True), 1))
        inside = np.minimum(np.floor(queues * scale).astype(np.int64), model.space.limits)
        return actions[model.space.index(inside)]

    return policy


@dataclass(frozen=True)
class Converged:
    """A value at two successive truncation levels whose relative change is below the tolerance."""

    coarse: Solution
    fine: Solution

    @property
    def relative_change(self) -> float:
        return abs(self.fine.lta_return - self.coarse.lta_return) / max(abs(self.fine.lta_return), 1e-12)


def next_level(level: int) -> int:
    return max(level + 1, round(level * TRUNCATION_GROWTH))


def _check_size(network: Network, level: int, max_states: int, reached: str) -> None:
    size = space_size(network, level)
    if size > max_states:
        raise ValueError(
            f"instance {network.name!r} is too large for the exact solver at this tolerance: truncation {level} needs "
            f"{size:,} states (limit {max_states:,}){reached}"
        )


def solve_until_converged(network: Network, start_level: int, policy: Policy | None = None,
                          max_states: int = MAX_STATES, tolerance: float = MAX_RELATIVE_CHANGE) -> Converged:
    """Raises the truncation until the value changes by less than `tolerance` (relative) from one level to the next.

    `policy` None: the optimum (cached, see `cached_optimum`). Each level starts from the previous one's relative
    values. ValueError if the state space would exceed `max_states` first.
    """
    level, previous, warm_start = start_level, None, None
    while True:
        reached = "" if previous is None else f"; at truncation {previous.level} the LTA return was {previous.lta_return:.4f}"
        _check_size(network, level, max_states, reached)
        if policy is None:
            solution, warm_start = cached_optimum(network, level, warm_start)
        else:
            solution, warm_start = solve_truncation(network, level, policy, warm_start=warm_start)
        if previous is not None:
            converged = Converged(previous, solution)
            if converged.relative_change < tolerance:
                return converged
        previous, level = solution, next_level(level)


@dataclass(frozen=True)
class Gap:
    """A policy and the optimum on the same truncated chain, at each level tried; the last two are converged."""

    levels: list[tuple[Solution, Solution]]  # (optimum, policy) per level, coarse to fine

    @property
    def optimum(self) -> Solution:
        return self.levels[-1][0]

    @property
    def policy(self) -> Solution:
        return self.levels[-1][1]

    @staticmethod
    def relative_gap(optimum: Solution, policy: Solution) -> float:
        """How much more the policy costs than the optimum, relative to the optimum (rewards are minus costs)."""
        return (optimum.lta_return - policy.lta_return) / abs(optimum.lta_return)

    @property
    def gap(self) -> float:
        return self.relative_gap(*self.levels[-1])

    @property
    def truncation_uncertainty(self) -> float:
        """The change of the gap between the last two levels: what raising the truncation may still move."""
        return abs(self.gap - self.relative_gap(*self.levels[-2]))


def gap_until_converged(network: Network, start_level: int, policy: Policy, tolerance: float = MAX_RELATIVE_CHANGE,
                        max_states: int = MAX_STATES) -> Gap:
    """The policy and the optimum on the same truncated chains, raising the level until both change by < tolerance.

    On one truncated chain the policy is one of the stationary policies the optimum is taken over, so its cost is
    never below the optimum's (up to the value iteration's `TOLERANCE`): the gap cannot go negative.
    """
    level, levels, warm_start, optimum_warm_start = start_level, [], None, None
    while True:
        reached = "" if not levels else f"; at truncation {levels[-1][0].level} the gap was {Gap(levels).gap:+.3%}"
        _check_size(network, level, max_states, reached)
        policy_solution, warm_start = solve_truncation(network, level, policy, warm_start=warm_start)
        optimum, optimum_warm_start = cached_optimum(network, level, optimum_warm_start)
        levels.append((optimum, policy_solution))
        if len(levels) >= 2 and all(
            Converged(coarse, fine).relative_change < tolerance for coarse, fine in zip(levels[-2], levels[-1])
        ):
            return Gap(levels)
        level = next_level(level)


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "ppo_continuous" / "exact_optima.json"


def _cache_key(network: Network, level: int) -> str:
    """The model, not its name: the instance's numbers (description left out) and the value iteration's settings."""
    model = {key: value for key, value in network.definition.items() if key not in ("name", "description")}
    text = json.dumps({"model": model, "level": level, "tolerance": TOLERANCE}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def cached_optimum(network: Network, level: int, warm_start: Callable[[StateSpace], np.ndarray] | None = None
                   ) -> tuple[Solution, Callable[[StateSpace], np.ndarray] | None]:
    """The optimum on the truncation at `level`, computed once per model and level on this machine.

    Kept in ~/.cache/ppo_continuous/exact_optima.json (or under $XDG_CACHE_HOME), keyed by the instance's numbers,
    the level and the value iteration's tolerance, so reports and checkpoints of one instance share it. Returns the
    solution and, when it was computed here, its warm start for a finer level (None from the cache).
    """
    path = _cache_file()
    key = _cache_key(network, level)
    try:
        stored = json.loads(path.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        stored = None
    if isinstance(stored, dict):
        try:
            return Solution(**stored), None
        except TypeError:
            pass
    solution, bias_on = solve_truncation(network, level, warm_start=warm_start)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=60):
            try:
                cache = json.loads(path.read_text())
            except (OSError, ValueError):
                cache = {}
            cache = cache if isinstance(cache, dict) else {}
            cache[key] = dataclasses.asdict(solution)
            temporary = path.with_suffix(".tmp")
            temporary.write_text(json.dumps(cache, indent=1))
            os.replace(temporary, path)
    except (OSError, Timeout):
        pass  # a cache that cannot be written only costs time
    return solution, bias_on


def checkpoint_policy(path: str) -> tuple[Policy, dict | str, str]:
    """A trained checkpoint's deterministic policy, the instance it was trained on, and the env's allocation rule.

    The instance comes from the checkpoint's own copy of the problem (`problem_definition`), so it is found from any
    directory; older checkpoints name it in their env kwargs (a shipped name, or a path relative to where they ran).
    """
    import pickle

    import torch

    from ppo_continuous import agent_from_checkpoint
    from ppo_support import deterministic_numpy_policy, observation_stats, read_checkpoint

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint '{path}': no such file") from None
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError, IndexError):
        raise ValueError(f"'{path}' is not a readable checkpoint (corrupt, empty or another kind of file)") from None
    definition = saved.get("problem_definition") if isinstance(saved, dict) else None
    if definition is None:
        try:
            definition = json.loads(saved["args"]["env_kwargs"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"'{path}' is not a ppo_continuous.py checkpoint") from None
    if not isinstance(definition, dict) or "instance" not in definition:
        env_id = saved.get("args", {}).get("env_id", "?") if isinstance(saved.get("args"), dict) else "?"
        raise ValueError(f"checkpoint '{path}' was trained on {env_id}, not on a queueing instance (--env-kwargs had no \"instance\")")
    # The numpy mirror of the deterministic policy (what evaluation scores): no torch call per step, so no thread
    # pool that stalls on a busy machine.
    checkpoint = read_checkpoint(path)
    agent = agent_from_checkpoint(checkpoint, path)
    policy = deterministic_numpy_policy(agent, observation_stats(checkpoint), checkpoint["args"]["clip_obs"])
    return policy, definition["instance"], definition.get("allocation", "proportional")


def format_levels(gap: Gap) -> str:
    """One line per truncation level: states, optimum, policy, gap."""
    lines = []
    for optimum, policy in gap.levels:
        lines.append(f"  truncation {optimum.level:>4}: {optimum.states:>9,} states  optimum {-optimum.lta_return:.5f}  "
                     f"policy {-policy.lta_return:.5f}  gap {Gap.relative_gap(optimum, policy):+.4%}")
    return "\n".join(lines)


class _OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> None:
    parser = _OneLineErrorParser(
        prog="python -m queueing.exact",
        description="Exact LTA return (optimal, of a classical policy, or of a checkpoint, with its gap to the optimum on the "
                    "same truncated chain), on truncations raised until the values settle.",
    )
    parser.add_argument("--instance", help="instance name or JSON file (default: the checkpoint's, else single-server-2class)")
    parser.add_argument("--policy", help=f"a classical policy: {', '.join(policy_names())}; default: the optimum")
    parser.add_argument("--checkpoint", help="a ppo_continuous.py checkpoint: its deterministic policy")
    parser.add_argument("--truncation", type=int, default=DEFAULT_START_TRUNCATION,
                        help="first truncation level tried (max jobs in the network); raised until the values settle")
    parser.add_argument("--tolerance", type=float, default=MAX_RELATIVE_CHANGE,
                        help="stop when raising the truncation changes every value by less than this (relative)")
    parser.add_argument("--max-states", type=int, default=MAX_STATES, help="refuse truncations with more states than this")
    args = parser.parse_args(argv)
    if args.policy and args.checkpoint:
        parser.error("give --policy or --checkpoint, not both")
    if args.truncation < 1:
        parser.error(f"--truncation must be a positive integer, got {args.truncation}")
    if not 0 < args.tolerance < 1:
        parser.error(f"--tolerance must be in (0, 1), got {args.tolerance}")
    try:
        policy, what = None, "optimum"
        instance, allocation = args.instance or "single-server-2class", None
        if args.checkpoint:
            policy, checkpoint_instance, allocation = checkpoint_policy(args.checkpoint)
            if args.instance and load_instance(args.instance) != load_instance(checkpoint_instance):
                raise ValueError(f"checkpoint '{args.checkpoint}' was trained on another instance than {args.instance!r}")
            instance, what = checkpoint_instance, f"checkpoint {args.checkpoint}"
        network = Network.from_instance(instance, allocation)
        if args.policy:
            policy, what = make_policy(args.policy, network, exact=True), f"policy {args.policy}"
        if policy is None:
            result = solve_until_converged(network, args.truncation, tolerance=args.tolerance, max_states=args.max_states)
        else:
            gap = gap_until_converged(network, args.truncation, policy, args.tolerance, args.max_states)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    settled = f"exact on the truncated chain, converged to {args.tolerance:.2%} (the change from the level before)"
    if policy is None:
        fine, coarse = result.fine, result.coarse
        print(f"instance {network.name}, optimum: exact LTA return {fine.lta_return:.4f} at truncation {fine.level} "
              f"({fine.states:,} states); at truncation {coarse.level}: {coarse.lta_return:.4f}, relative change "
              f"{result.relative_change:.2e}; {settled}")
        return
    print(f"instance {network.name}, {what}: exact LTA return {gap.policy.lta_return:.4f}, optimum "
          f"{gap.optimum.lta_return:.4f}, gap {gap.gap:+.3%} +- {gap.truncation_uncertainty:.3%} (truncation) at "
          f"truncation {gap.policy.level}; both on the same truncated chain, {settled}")
    print(format_levels(gap))


if __name__ == "__main__":
    sys.exit(main())
