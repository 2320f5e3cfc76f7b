"""Discrete-time queueing networks as a gymnasium environment for long-term-average control.

A network has K buffers (job classes) and S servers; every buffer is served by exactly one
server. One environment step is one time slot, processed in this order:

1. Action: a weight in [0, 1] per buffer (values outside are clipped, NaN counts as 0).
2. Service: each server picks ONE of its buffers that are non-empty and connected at the
   start of the slot, with probability proportional to the weights (uniformly among them if
   all those weights are zero; the server idles if there is none). With the env option
   `allocation="priority"` the action is instead a real-valued score per buffer (unbounded, not
   clipped; NaN is the lowest) and each server picks the eligible buffer with the HIGHEST score
   (ties uniformly): a fixed action is then a deterministic priority rule rather than a
   randomised one, and a policy's scores never leave the action bounds. The picked buffer
   completes one job with probability mu_k (Bernoulli service). Service only ever uses the
   queues as they were at the start of the slot, so a job arriving in a slot cannot leave in
   the same slot.
3. Routing: a job completed at buffer k joins buffer j with probability routing[k][j] and
   leaves the network with the remaining probability.
4. Arrivals: buffer k receives one external job with probability lambda_k (Bernoulli).
5. Reward: minus the holding cost sum_k c_k q_k of the queues at the END of the slot.
6. Connectivity: each buffer is connected to its server in the next slot with probability
   connectivity[k], independently; these bits are part of the returned observation.

Continuous-time instances (`"time": "continuous"`) give rates per unit time instead. The
environment then simulates the uniformized chain: Lambda = sum_k lambda_k + sum over servers of
the largest service rate among its buffers, and each slot holds exactly one potential event: an
arrival at k with probability lambda_k / Lambda, a completion at the buffer k its server picks
with probability mu_k / Lambda, otherwise nothing (a self-loop). The stationary law of this chain
is that of the continuous-time chain, so the average cost per slot equals the average cost per
unit time.

The task is continuing (never terminated); the registered id adds a 1000-step time limit.
The batched pure functions below (`step_dynamics`, `server_allocation`, ...) are the single
implementation of these rules: the environment calls them with one network copy, the vector
environment (`queueing.vector_env`) and the baselines with many copies at once, and the exact
solver (`queueing.exact`) reads its transition probabilities from the same `Network` fields.

Random numbers come from a counter-based generator (SplitMix64): number j of slot t of a copy
is a hash of (the copy's key, t, j). A copy's key is drawn from its seeded `np_random` at every
reset, so one copy gives the same trajectory whether it is stepped alone or among many, and a
whole batch of copies draws its numbers in one vectorised call.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np

INSTANCES_DIR = Path(__file__).resolve().parent / "instances"

REQUIRED_FIELDS = ("name", "arrival_rates", "service_rates", "holding_costs", "servers")
OPTIONAL_FIELDS = ("description", "routing", "connectivity", "time")
TIME_MODES = ("discrete", "continuous")
ALLOCATIONS = ("proportional", "priority")
# Tolerance for routing rows that sum to 1 up to rounding in the JSON file.
ROW_SUM_TOLERANCE = 1e-9


def available_instances() -> list[str]:
    """Names of the instances shipped in queueing/instances/."""
    return sorted(path.stem for path in INSTANCES_DIR.glob("*.json"))


def _read_instance_source(instance: str | dict) -> tuple[dict, str]:
    """Returns the raw instance dict and a label naming it in error messages."""
    if isinstance(instance, dict):
        return instance, f"instance {instance.get('name', '<dict>')!r}"
    if not isinstance(instance, (str, Path)):
        raise ValueError(
            f"instance must be a name, a path to a JSON file or a dict, got {type(instance).__name__}"
        )
    text = str(instance)
    label = f"instance {text!r}"
    path = Path(text)
    if not path.is_file():
        shipped = INSTANCES_DIR / f"{text}.json"
        if shipped.is_file():
            path = shipped
        elif text.endswith(".json") or "/" in text:
            raise ValueError(f"{label}: no such file")
        else:
            raise ValueError(
                f"unknown {label}; available instances: {', '.join(available_instances())} "
                "(or give a path to a JSON file)"
            )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{label}: not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{label}: the file must hold a JSON object")
    return raw, label


def _is_number(value) -> bool:
    # bool is a subclass of int in Python but `true` is no rate.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_vector(raw: dict, field: str, label: str, length: int, upper: float | None) -> list[float]:
    """A per-buffer vector of finite numbers in [0, upper] (no upper bound when upper is None)."""
    values = raw[field]
    if not isinstance(values, list):
        raise ValueError(f'{label}: field "{field}" must be a list of numbers')
    if len(values) != length:
        raise ValueError(
            f'{label}: field "{field}" must have {length} entries (one per buffer), got {len(values)}'
        )
    bound_text = f"[0, {upper:g}]" if upper is not None else ">= 0"
    for index, value in enumerate(values):
        if not _is_number(value) or value < 0 or (upper is not None and value > upper):
            raise ValueError(
                f'{label}: field "{field}" entry {index} must be a number in {bound_text}, got {value!r}'
            )
    return [float(value) for value in values]


def load_instance(instance: str | dict) -> dict:
    """Reads and validates an instance; returns a normalised dict with every field filled in.

    `instance` is the name of a shipped instance (see `available_instances()`), a path to a
    JSON file, or an already-parsed dict. Any problem raises ValueError naming the field.
    Omitted optional fields come back as: description "", routing None (all jobs leave after
    service), connectivity None (always connected), time "discrete".
    """
    raw, label = _read_instance_source(instance)
    missing = [field for field in REQUIRED_FIELDS if field not in raw]
    if missing:
        raise ValueError(f'{label}: missing field "{missing[0]}"')
    unknown = sorted(set(raw) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise ValueError(
            f'{label}: unknown field "{unknown[0]}" (allowed: {", ".join(REQUIRED_FIELDS + OPTIONAL_FIELDS)})'
        )
    if not isinstance(raw["name"], str) or not raw["name"]:
        raise ValueError(f'{label}: field "name" must be a non-empty string')
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise ValueError(f'{label}: field "description" must be a string')

    time_mode = raw.get("time", "discrete")
    if time_mode not in TIME_MODES:
        raise ValueError(f'{label}: field "time" must be "discrete" or "continuous", got {time_mode!r}')
    # Discrete time: per-slot probabilities in [0, 1]; continuous time: rates per unit time.
    rate_bound = 1.0 if time_mode == "discrete" else None

    arrival_values = raw["arrival_rates"]
    if not isinstance(arrival_values, list) or not arrival_values:
        raise ValueError(f'{label}: field "arrival_rates" must be a non-empty list (one rate per buffer)')
    num_buffers = len(arrival_values)
    arrival_rates = _check_vector(raw, "arrival_rates", label, num_buffers, upper=rate_bound)
    service_rates = _check_vector(raw, "service_rates", label, num_buffers, upper=rate_bound)
    holding_costs = _check_vector(raw, "holding_costs", label, num_buffers, upper=None)

    servers = raw["servers"]
    if not isinstance(servers, list) or not servers:
        raise ValueError(f'{label}: field "servers" must be a non-empty list of lists of buffer indices')
    server_of_buffer: dict[int, int] = {}
    for server, buffers in enumerate(servers):
        if not isinstance(buffers, list) or not buffers:
            raise ValueError(f'{label}: field "servers" entry {server} must be a non-empty list of buffer indices')
        for buffer in buffers:
            if not isinstance(buffer, int) or isinstance(buffer, bool) or not 0 <= buffer < num_buffers:
                raise ValueError(
                    f'{label}: field "servers" entry {server} names buffer {buffer!r}, '
                    f"but buffers are 0..{num_buffers - 1}"
                )
            if buffer in server_of_buffer:
                raise ValueError(
                    f'{label}: field "servers": buffer {buffer} is served by servers '
                    f"{server_of_buffer[buffer]} and {server}; each buffer needs exactly one server"
                )
            server_of_buffer[buffer] = server
    unserved = [buffer for buffer in range(num_buffers) if buffer not in server_of_buffer]
    if unserved:
        raise ValueError(f'{label}: field "servers": buffer {unserved[0]} is served by no server')

    routing = raw.get("routing")
    if routing is not None:
        if not isinstance(routing, list) or len(routing) != num_buffers:
            got = len(routing) if isinstance(routing, list) else type(routing).__name__
            raise ValueError(
                f'{label}: field "routing" must be a {num_buffers} x {num_buffers} matrix '
                f"(one row per buffer), got {got} rows"
            )
        for source, row in enumerate(routing):
            if not isinstance(row, list) or len(row) != num_buffers:
                got = len(row) if isinstance(row, list) else type(row).__name__
                raise ValueError(
                    f'{label}: field "routing" row {source} must have {num_buffers} entries '
                    f"(one per destination buffer), got {got}"
                )
            for destination, probability in enumerate(row):
                if not _is_number(probability) or not 0 <= probability <= 1:
                    raise ValueError(
                        f'{label}: field "routing" entry [{source}][{destination}] must be a '
                        f"probability in [0, 1], got {probability!r}"
                    )
            if sum(row) > 1 + ROW_SUM_TOLERANCE:
                raise ValueError(
                    f'{label}: field "routing" row {source} sums to {sum(row):g} > 1 '
                    "(the rest of a row is the probability of leaving the network)"
                )
        routing = [[float(probability) for probability in row] for row in routing]

    connectivity = raw.get("connectivity")
    if connectivity is not None:
        if time_mode == "continuous":
            raise ValueError(f'{label}: field "connectivity" is only defined for discrete-time instances')
        connectivity = _check_vector(raw, "connectivity", label, num_buffers, upper=1.0)
    if time_mode == "continuous" and sum(arrival_rates) + sum(service_rates) == 0:
        raise ValueError(f'{label}: field "time": a continuous-time instance needs a positive rate')

    return {
        "name": raw["name"],
        "description": description,
        "arrival_rates": arrival_rates,
        "service_rates": service_rates,
        "holding_costs": holding_costs,
        "servers": [list(buffers) for buffers in servers],
        "routing": routing,
        "connectivity": connectivity,
        "time": time_mode,
    }


@dataclass(frozen=True)
class Network:
    """A validated instance as numpy arrays, ready for the batched dynamics."""

    name: str
    continuous_time: bool
    arrival_rates: np.ndarray  # (K,) as in the instance: probabilities per slot, or rates
    service_rates: np.ndarray  # (K,) as in the instance
    holding_costs: np.ndarray  # (K,)
    # Per-slot probabilities, the only ones the dynamics and the exact solver use: an arrival at
    # buffer k, and a completion at buffer k when its server picks it. In discrete time these are
    # the instance's numbers and all events of a slot are independent; in continuous time they
    # are the rates divided by `uniformization_rate` and a slot holds at most one event.
    arrival_probabilities: np.ndarray  # (K,)
    service_probabilities: np.ndarray  # (K,)
    uniformization_rate: float  # Lambda; 1.0 in discrete time
    server_membership: np.ndarray  # (S, K) float 0/1: 1 where server s serves buffer k
    server_of_buffer: np.ndarray  # (K,) int
    # (S, K) 0 where server s serves buffer k, +inf elsewhere: adding it to per-buffer values
    # broadcast to (..., S, K) leaves only each server's own buffers finite for a min.
    outside_server_penalty: np.ndarray
    routing: np.ndarray | None  # (K, K) routing probabilities
    # Routing from buffer k to buffer j happens when a uniform draw falls in
    # [routing_low[k][j], routing_high[k][j]): the row-wise cumulative sums of the routing matrix.
    routing_low: np.ndarray | None  # (K, K)
    routing_high: np.ndarray | None  # (K, K)
    connectivity: np.ndarray | None  # (K,) probability of being connected in a slot
    allocation: str = "proportional"  # how a server turns weights into its pick: ALLOCATIONS
    # The validated instance itself (JSON-able), so a saved model can rebuild the network anywhere.
    definition: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def problem_definition(self) -> dict:
        """Env keyword arguments that rebuild this network from any directory: the instance itself and the rule."""
        return {"instance": self.definition, "allocation": self.allocation}

    @classmethod
    def from_instance(cls, instance: str | dict | Network, allocation: str | None = None) -> Network:
        """The network of an instance (name, JSON file or dict); `allocation` overrides its rule."""
        if allocation is not None and allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
        if isinstance(instance, Network):
            return instance if allocation is None else dataclasses.replace(instance, allocation=allocation)
        spec = load_instance(instance)
        num_buffers = len(spec["arrival_rates"])
        membership = np.zeros((len(spec["servers"]), num_buffers))
        for server, buffers in enumerate(spec["servers"]):
            membership[server, buffers] = 1.0
        arrival_rates, service_rates = np.array(spec["arrival_rates"]), np.array(spec["service_rates"])
        continuous_time = spec["time"] == "continuous"
        uniformization_rate = 1.0
        if continuous_time:
            fastest_per_server = (membership * service_rates).max(axis=1)
            uniformization_rate = float(arrival_rates.sum() + fastest_per_server.sum())
        routing = None if spec["routing"] is None else np.array(spec["routing"])
        routing_high = None if routing is None else np.cumsum(routing, axis=1)
        return cls(
            name=spec["name"],
            continuous_time=continuous_time,
            arrival_rates=arrival_rates,
            service_rates=service_rates,
            holding_costs=np.array(spec["holding_costs"]),
            arrival_probabilities=arrival_rates / uniformization_rate,
            service_probabilities=service_rates / uniformization_rate,
            uniformization_rate=uniformization_rate,
            server_membership=membership,
            server_of_buffer=membership.argmax(axis=0),
            outside_server_penalty=np.where(membership > 0, 0.0, np.inf),
            routing=routing,
            routing_low=None if routing_high is None else np.pad(routing_high[:, :-1], ((0, 0), (1, 0))),
            routing_high=routing_high,
            connectivity=None if spec["connectivity"] is None else np.array(spec["connectivity"]),
            allocation=allocation or "proportional",
            definition=spec,
        )

    @property
    def num_buffers(self) -> int:
        return self.server_membership.shape[1]

    @property
    def observation_size(self) -> int:
        return self.num_buffers * (2 if self.connectivity is not None else 1)

    @property
    def draws_per_slot(self) -> int:
        """Uniform numbers one slot consumes per copy (see `step_dynamics` for their layout)."""
        num_buffers = self.num_buffers
        # race | service and arrival draws (discrete) or the event draw (continuous) | routing | connectivity
        count = num_buffers + (1 if self.continuous_time else 2 * num_buffers)
        count += num_buffers if self.routing is not None else 0
        return count + (num_buffers if self.connectivity is not None else 0)


# --- random numbers -----------------------------------------------------------------------------

SPLITMIX_INCREMENT = np.uint64(0x9E3779B97F4A7C15)
SPLITMIX_MULTIPLIER_1 = np.uint64(0xBF58476D1CE4E5B9)
SPLITMIX_MULTIPLIER_2 = np.uint64(0x94D049BB133111EB)


def draw_key(generator: np.random.Generator) -> np.uint64:
    """A copy's 64-bit stream key, drawn from its seeded generator at every reset."""
    return generator.integers(0, 2**64, dtype=np.uint64)


def slot_uniforms(keys: np.ndarray, slots: np.ndarray, count: int) -> np.ndarray:
    """(N, count) uniforms in [0, 1) for slot `slots[i]` of the copy with key `keys[i]`.

    Number j of slot t is output t * count + j + 1 of the SplitMix64 generator started at the
    key (Steele, Lea and Flood 2014), so every copy reads its own SplitMix64 stream in order,
    and any batch of copies gets all its numbers in a few vectorised integer operations.
    """
    counters = np.asarray(slots, dtype=np.uint64)[:, None] * np.uint64(count)
    counters = counters + np.arange(1, count + 1, dtype=np.uint64)
    mixed = np.asarray(keys, dtype=np.uint64)[:, None] + counters * SPLITMIX_INCREMENT
    mixed = (mixed ^ (mixed >> np.uint64(30))) * SPLITMIX_MULTIPLIER_1
    mixed = (mixed ^ (mixed >> np.uint64(27))) * SPLITMIX_MULTIPLIER_2
    mixed ^= mixed >> np.uint64(31)
    # The top 53 bits, as a double in [0, 1).
    return (mixed >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


# --- the rules ----------------------------------------------------------------------------------


def sanitize_weights(weights) -> np.ndarray:
    """Clips weights to [0, 1]; NaN counts as 0."""
    # minimum keeps NaN, and fmax then replaces it by 0.
    return np.fmax(np.minimum(np.asarray(weights, dtype=np.float64), 1.0), 0.0)


def _per_server_sum(values: np.ndarray, server_membership: np.ndarray) -> np.ndarray:
    """(..., K) -> (..., S) sums over each server's buffers.

    An explicit product and sum rather than a matrix product: its rounding does not depend on
    how many copies are in the batch, which keeps one copy bit-identical alone or in a batch.
    """
    return (values[..., None, :] * server_membership).sum(axis=-1)


def _effective_weights(weights, queues, connected, server_membership, server_of_buffer,
                       allocation="proportional") -> np.ndarray:
    """Weights restricted to non-empty connected buffers; all-zero servers fall back to uniform.

    With the "priority" allocation, the weights are unbounded scores (NaN lowest) and only each server's
    eligible buffers of the largest score keep a weight (1).
    """
    eligible = (np.asarray(queues) > 0) & np.asarray(connected, dtype=bool)
    if allocation == "priority":
        scores = np.asarray(weights, dtype=np.float64)
        scores = np.where(eligible & ~np.isnan(scores), scores, -np.inf)
        outside = np.where(np.asarray(server_membership) > 0, 0.0, -np.inf)
        top = (scores[..., None, :] + outside).max(axis=-1)[..., server_of_buffer]
        return (eligible & (scores == top)).astype(np.float64)
    masked = sanitize_weights(weights) * eligible
    all_zero = (_per_server_sum(masked, server_membership) == 0.0)[..., server_of_buffer]
    return np.where(all_zero, eligible, masked)


def server_allocation(weights, queues, connected, server_membership, allocation="proportional") -> np.ndarray:
    """Probability that each buffer is the one its server picks this slot (`allocation`: one of ALLOCATIONS).

    Arrays have shape (..., K); `server_membership` is (S, K) 0/1 (or bool), 1 where the server
    serves the buffer. For each server the probabilities over its buffers sum to 1, or to 0 when
    it has no non-empty connected buffer. Servers pick independently of each other.
    """
    server_membership = np.asarray(server_membership, dtype=np.float64)
    server_of_buffer = server_membership.argmax(axis=0)
    effective = _effective_weights(weights, queues, connected, server_membership, server_of_buffer, allocation)
    total = _per_server_sum(effective, server_membership)[..., server_of_buffer]
    return np.divide(effective, total, out=np.zeros_like(effective), where=total > 0)


def draw_connectivity(network: Network, uniforms: np.ndarray) -> np.ndarray:
    """Connectivity bits (N, K) from a slot's uniforms; all True without a connectivity field."""
    if network.connectivity is None:
        return np.ones((uniforms.shape[0], network.num_buffers), dtype=bool)
    return uniforms[:, -network.num_buffers :] < network.connectivity


def step_dynamics(
    network: Network,
    queues: np.ndarray,
    connected: np.ndarray,
    weights: np.ndarray,
    uniforms: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Advances N copies of the network by one slot (steps 1-4 and 6 of the module docstring).

    queues: (N, K) int; connected: (N, K) bool for this slot; weights: (N, K); uniforms:
    (N, network.draws_per_slot) in [0, 1), laid out as: K for the servers' picks, then K service
    and K arrival draws (discrete time) or one event draw (continuous time), then K routing draws
    if the instance routes, then K connectivity draws if it has connectivity.
    Returns (new_queues, connected_next_slot, completed) with completed (N, K) bool.
    """
    num_buffers = network.num_buffers
    effective = _effective_weights(
        weights, queues, connected, network.server_membership, network.server_of_buffer, network.allocation
    )
    # Exponential race: the buffer with the smallest Exp(1)/weight among a server's buffers is
    # picked with probability weight / (sum of the server's weights), exactly, with no
    # rounding gap at the end of a cumulative sum. Zero weight never wins (infinite time, or NaN
    # for a zero draw, which fmin skips).
    with np.errstate(divide="ignore", invalid="ignore"):
        race_times = -np.log1p(-uniforms[:, :num_buffers]) / effective
    first_per_server = np.fmin.reduce(race_times[:, None, :] + network.outside_server_penalty, axis=2)
    picked = (race_times == first_per_server[:, network.server_of_buffer]) & (effective > 0)

    if network.continuous_time:
        # One event per slot: the draw falls in the interval of an arrival (widths
        # arrival_probabilities), then of a completion at a picked buffer (widths
        # service_probabilities), or beyond them all (no event).
        event = uniforms[:, num_buffers, None]
        arrival_high = np.cumsum(network.arrival_probabilities)
        arrival_low = np.concatenate([[0.0], arrival_high[:-1]])
        arrivals = (event >= arrival_low) & (event < arrival_high)
        completion_high = arrival_high[-1] + np.cumsum(picked * network.service_probabilities, axis=1)
        completion_low = np.concatenate([np.full_like(event, arrival_high[-1]), completion_high[:, :-1]], axis=1)
        completed = picked & (event >= completion_low) & (event < completion_high)
        next_draw = num_buffers + 1
    else:
        completed = picked & (uniforms[:, num_buffers : 2 * num_buffers] < network.service_probabilities)
        arrivals = uniforms[:, 2 * num_buffers : 3 * num_buffers] < network.arrival_probabilities
        next_draw = 3 * num_buffers

    new_queues = queues - completed
    if network.routing_high is not None and network.continuous_time:
        # At most one completion per copy: route it alone, in O(N K) rather than O(N K^2). Its destination is the
        # buffer whose interval [routing_low, routing_high) of the source's row holds the draw (none: it leaves).
        rows = np.arange(len(queues))
        source = completed.argmax(axis=1)
        draw = uniforms[rows, next_draw + source]
        destination = (network.routing_high[source] <= draw[:, None]).sum(axis=1)
        routed = completed[rows, source] & (destination < num_buffers)
        new_queues[rows[routed], destination[routed]] += 1
    elif network.routing_high is not None:
        draws = uniforms[:, next_draw : next_draw + num_buffers, None]
        destination = (draws >= network.routing_low) & (draws < network.routing_high)  # (N, source, dest)
        new_queues = new_queues + (completed[:, :, None] & destination).sum(axis=1)
    new_queues = new_queues + arrivals
    return new_queues, draw_connectivity(network, uniforms), completed


def next_state_distribution(network: Network, queues: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every queue vector the next slot can lead to, and its probability, for N copies of a continuous-time network.

    Returns (next_queues (N, M, K) int, probabilities (N, M)), the same M candidates for every copy: an arrival at
    each buffer with an arrival rate, a completion at each buffer k followed by each of its routes (to a buffer j
    with routing[k][j] > 0, or out of the network), and the self-loop, which takes the remaining probability.
    Candidates that cannot happen (a completion at a buffer the server did not pick) have probability 0. This is
    the uniformized chain `step_dynamics` samples from, which a trainer can use to take the expectation of the
    next state's value exactly instead of sampling it. Discrete-time networks (many events per slot) and
    networks with connectivity are not supported.
    """
    if not network.continuous_time or network.connectivity is not None:
        raise ValueError(f"network {network.name!r}: the next-state distribution is available for continuous-time "
                         f"networks without connectivity only")
    num_buffers = network.num_buffers
    identity = np.eye(num_buffers, dtype=np.int64)
    arriving = np.flatnonzero(network.arrival_probabilities > 0)
    routing = np.zeros((num_buffers, num_buffers)) if network.routing is None else network.routing
    exit_probability = np.clip(1.0 - routing.sum(axis=1), 0.0, 1.0)
    sources, changes, route_probabilities = [], [], []
    for source in range(num_buffers):
        for destination in np.flatnonzero(routing[source] > 0):
            sources.append(source)
            changes.append(identity[destination] - identity[source])
            route_probabilities.append(routing[source, destination])
        if exit_probability[source] > 0:
            sources.append(source)
            changes.append(-identity[source])
            route_probabilities.append(exit_probability[source])
    changes = np.concatenate([identity[arriving], np.array(changes).reshape(-1, num_buffers),
                              np.zeros((1, num_buffers), dtype=np.int64)])
    picked = server_allocation(weights, queues, np.ones_like(queues, dtype=bool), network.server_membership,
                               network.allocation)
    completion = picked[:, sources] * (network.service_probabilities[sources] * np.array(route_probabilities))
    moves = np.concatenate([np.broadcast_to(network.arrival_probabilities[arriving], (len(queues), len(arriving))),
                            completion], axis=1)
    # The self-loop takes what is left; max() keeps a rounding error of 1e-17 from making it negative.
    probabilities = np.concatenate([moves, np.maximum(1.0 - moves.sum(axis=1, keepdims=True), 0.0)], axis=1)
    # An impossible completion (probability 0) would empty a queue below zero: keep its state valid.
    next_queues = np.maximum(np.asarray(queues)[:, None, :] + changes, 0)
    return next_queues, probabilities


def holding_cost(network: Network, queues: np.ndarray) -> np.ndarray:
    """sum_k c_k q_k per copy; the reward is its negative."""
    return (queues * network.holding_costs).sum(axis=-1)


def observation(network: Network, queues: np.ndarray, connected: np.ndarray) -> np.ndarray:
    """float32 (N, K) queue lengths, followed by the (N, K) connectivity bits if the instance has them."""
    if network.connectivity is None:
        return queues.astype(np.float32)
    return np.concatenate([queues, connected], axis=-1).astype(np.float32)


def action_space(network: Network) -> gym.spaces.Box:
    """One copy's actions: weights in [0, 1], or unbounded scores with the priority allocation."""
    low, high = (-np.inf, np.inf) if network.allocation == "priority" else (0.0, 1.0)
    return gym.spaces.Box(low, high, (network.num_buffers,), np.float32)


def parse_initial_queues(network: Network, initial_queues) -> np.ndarray:
    """The `initial_queues` reset option as int64 (K,); ValueError unless K non-negative integers."""
    queues = np.asarray(initial_queues)
    if (
        queues.shape != (network.num_buffers,)
        or not np.issubdtype(queues.dtype, np.number)
        or not np.all(np.isfinite(queues))
        or np.any(queues < 0)
        or np.any(queues != np.round(queues))
    ):
        raise ValueError(
            f'option "initial_queues" must be {network.num_buffers} non-negative integers, got {initial_queues!r}'
        )
    return queues.astype(np.int64)


class QueueNetworkEnv(gym.Env):
    """One copy of a queueing network; see the module docstring for the order of events in a step.

    Observation: queue lengths (float32), then, if the instance has `connectivity`, the 0/1
    bits saying which buffers are connected in the coming slot. Action: Box(0, 1, (K,)) weights
    (unbounded scores with `allocation="priority"`).
    `reset(options={"initial_queues": [...]})` starts from given queue lengths instead of empty.
    `allocation`: "proportional" (default) or "priority", how servers read the weights (module docstring).
    """

    # "continuing": the task never ends; time limits only cut it into episodes.
    metadata = {"render_modes": [], "continuing": True}

    def __init__(self, instance: str | dict | Network = "single-server-2class", allocation: str | None = None):
        self.network = Network.from_instance(instance, allocation)
        num_buffers = self.network.num_buffers
        self.action_space = action_space(self.network)
        self.observation_space = gym.spaces.Box(0.0, np.inf, (self.network.observation_size,), np.float32)
        self._queues = np.zeros((1, num_buffers), dtype=np.int64)
        self._connected = np.ones((1, num_buffers), dtype=bool)
        self._key = np.zeros(1, dtype=np.uint64)
        self._slot = np.zeros(1, dtype=np.int64)

    def _uniforms(self) -> np.ndarray:
        return slot_uniforms(self._key, self._slot, self.network.draws_per_slot)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        initial_queues = (options or {}).get("initial_queues")
        if initial_queues is None:
            self._queues = np.zeros((1, self.network.num_buffers), dtype=np.int64)
        else:
            self._queues = parse_initial_queues(self.network, initial_queues)[None, :]
        self._key[0] = draw_key(self.np_random)
        self._slot[0] = 0
        self._connected = draw_connectivity(self.network, self._uniforms())
        return observation(self.network, self._queues, self._connected)[0], {}

    def step(self, action):
        weights = np.asarray(action, dtype=np.float64).reshape(1, self.network.num_buffers)
        self._slot += 1
        self._queues, self._connected, _ = step_dynamics(
            self.network, self._queues, self._connected, weights, self._uniforms()
        )
        reward = -float(holding_cost(self.network, self._queues)[0])
        return observation(self.network, self._queues, self._connected)[0], reward, False, False, {}
