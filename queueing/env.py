"""Discrete-time queueing networks as a gymnasium environment for long-term-average control.

A network has K buffers (job classes) and S servers; every buffer is served by exactly one
server. One environment step is one time slot, processed in this order:

1. Action: a weight in [0, 1] per buffer (values outside are clipped, NaN counts as 0).
2. Service: each server picks ONE of its buffers that are non-empty and connected at the
   start of the slot, with probability proportional to the weights (uniformly among them if
   all those weights are zero; the server idles if there is none). The picked buffer
   completes one job with probability mu_k (Bernoulli service). Service only ever uses the
   queues as they were at the start of the slot, so a job arriving in a slot cannot leave in
   the same slot.
3. Routing: a job completed at buffer k joins buffer j with probability routing[k][j] and
   leaves the network with the remaining probability.
4. Arrivals: buffer k receives one external job with probability lambda_k (Bernoulli).
5. Reward: minus the holding cost sum_k c_k q_k of the queues at the END of the slot.
6. Connectivity: each buffer is connected to its server in the next slot with probability
   connectivity[k], independently; these bits are part of the returned observation.

The task is continuing (never terminated); the registered id adds a 1000-step time limit.
The batched pure functions below (`step_dynamics`, `server_allocation`, ...) are the single
implementation of these rules: the environment calls them with one network copy, the
baselines in `queueing.baselines` with many copies at once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np

INSTANCES_DIR = Path(__file__).resolve().parent / "instances"

REQUIRED_FIELDS = ("name", "arrival_rates", "service_rates", "holding_costs", "servers")
OPTIONAL_FIELDS = ("description", "routing", "connectivity")
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
    bound_text = "[0, 1]" if upper is not None else ">= 0"
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
    service), connectivity None (always connected).
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

    arrival_values = raw["arrival_rates"]
    if not isinstance(arrival_values, list) or not arrival_values:
        raise ValueError(f'{label}: field "arrival_rates" must be a non-empty list (one rate per buffer)')
    num_buffers = len(arrival_values)
    arrival_rates = _check_vector(raw, "arrival_rates", label, num_buffers, upper=1.0)
    service_rates = _check_vector(raw, "service_rates", label, num_buffers, upper=1.0)
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
        connectivity = _check_vector(raw, "connectivity", label, num_buffers, upper=1.0)

    return {
        "name": raw["name"],
        "description": description,
        "arrival_rates": arrival_rates,
        "service_rates": service_rates,
        "holding_costs": holding_costs,
        "servers": [list(buffers) for buffers in servers],
        "routing": routing,
        "connectivity": connectivity,
    }


@dataclass(frozen=True)
class Network:
    """A validated instance as numpy arrays, ready for the batched dynamics."""

    name: str
    arrival_rates: np.ndarray  # (K,)
    service_rates: np.ndarray  # (K,)
    holding_costs: np.ndarray  # (K,)
    server_membership: np.ndarray  # (S, K) float 0/1: 1 where server s serves buffer k
    server_of_buffer: np.ndarray  # (K,) int
    # (S, K) 0 where server s serves buffer k, +inf elsewhere: adding it to per-buffer values
    # broadcast to (..., S, K) leaves only each server's own buffers finite for a min.
    outside_server_penalty: np.ndarray
    # Routing from buffer k to buffer j happens when a uniform draw falls in
    # [routing_low[k][j], routing_high[k][j]): the row-wise cumulative sums of the routing matrix.
    routing_low: np.ndarray | None  # (K, K)
    routing_high: np.ndarray | None  # (K, K)
    connectivity: np.ndarray | None  # (K,) probability of being connected in a slot

    @classmethod
    def from_instance(cls, instance: str | dict) -> Network:
        spec = load_instance(instance)
        num_buffers = len(spec["arrival_rates"])
        membership = np.zeros((len(spec["servers"]), num_buffers))
        for server, buffers in enumerate(spec["servers"]):
            membership[server, buffers] = 1.0
        routing_high = None if spec["routing"] is None else np.cumsum(spec["routing"], axis=1)
        return cls(
            name=spec["name"],
            arrival_rates=np.array(spec["arrival_rates"]),
            service_rates=np.array(spec["service_rates"]),
            holding_costs=np.array(spec["holding_costs"]),
            server_membership=membership,
            server_of_buffer=membership.argmax(axis=0),
            outside_server_penalty=np.where(membership > 0, 0.0, np.inf),
            routing_low=None if routing_high is None else np.pad(routing_high[:, :-1], ((0, 0), (1, 0))),
            routing_high=routing_high,
            connectivity=None if spec["connectivity"] is None else np.array(spec["connectivity"]),
        )

    @property
    def num_buffers(self) -> int:
        return self.server_membership.shape[1]

    @property
    def observation_size(self) -> int:
        return self.num_buffers * (2 if self.connectivity is not None else 1)


def sanitize_weights(weights) -> np.ndarray:
    """Clips weights to [0, 1]; NaN counts as 0."""
    # minimum keeps NaN, and fmax then replaces it by 0.
    return np.fmax(np.minimum(np.asarray(weights, dtype=np.float64), 1.0), 0.0)


def _effective_weights(weights, queues, connected, server_membership, server_of_buffer) -> np.ndarray:
    """Weights restricted to non-empty connected buffers; all-zero servers fall back to uniform."""
    eligible = (np.asarray(queues) > 0) & np.asarray(connected, dtype=bool)
    masked = sanitize_weights(weights) * eligible
    all_zero = (masked @ server_membership.T == 0.0)[..., server_of_buffer]
    return np.where(all_zero, eligible, masked)


def server_allocation(weights, queues, connected, server_membership) -> np.ndarray:
    """Probability that each buffer is the one its server picks this slot.

    Arrays have shape (..., K); `server_membership` is (S, K) 0/1 (or bool), 1 where the server
    serves the buffer. For each server the probabilities over its buffers sum to 1, or to 0 when
    it has no non-empty connected buffer.
    """
    server_membership = np.asarray(server_membership, dtype=np.float64)
    server_of_buffer = server_membership.argmax(axis=0)
    effective = _effective_weights(weights, queues, connected, server_membership, server_of_buffer)
    total = (effective @ server_membership.T)[..., server_of_buffer]
    return np.divide(effective, total, out=np.zeros_like(effective), where=total > 0)


def draw_connectivity(network: Network, rng: np.random.Generator, num_copies: int) -> np.ndarray:
    """Connectivity bits (num_copies, K) for one slot; all True without a connectivity field."""
    if network.connectivity is None:
        return np.ones((num_copies, network.num_buffers), dtype=bool)
    return rng.random((num_copies, network.num_buffers)) < network.connectivity


def step_dynamics(
    network: Network,
    queues: np.ndarray,
    connected: np.ndarray,
    weights: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Advances N copies of the network by one slot (steps 1-4 and 6 of the module docstring).

    queues: (N, K) int; connected: (N, K) bool for this slot; weights: (N, K).
    Returns (new_queues, connected_next_slot, completed) with completed (N, K) bool.
    """
    effective = _effective_weights(
        weights, queues, connected, network.server_membership, network.server_of_buffer
    )
    # Exponential race: the buffer with the smallest Exp(1)/weight among a server's buffers is
    # picked with probability weight / (sum of the server's weights), exactly, with no
    # rounding gap at the end of a cumulative sum. Zero weight never wins (infinite time, or NaN
    # for a zero draw, which fmin skips).
    with np.errstate(divide="ignore", invalid="ignore"):
        race_times = rng.standard_exponential(queues.shape) / effective
    first_per_server = np.fmin.reduce(race_times[:, None, :] + network.outside_server_penalty, axis=2)
    picked = (race_times == first_per_server[:, network.server_of_buffer]) & (effective > 0)
    completed = picked & (rng.random(queues.shape) < network.service_rates)

    new_queues = queues - completed
    if network.routing_high is not None:
        draws = rng.random(queues.shape)[:, :, None]
        destination = (draws >= network.routing_low) & (draws < network.routing_high)  # (N, source, dest)
        new_queues = new_queues + (completed[:, :, None] & destination).sum(axis=1)
    new_queues = new_queues + (rng.random(queues.shape) < network.arrival_rates)
    return new_queues, draw_connectivity(network, rng, queues.shape[0]), completed


def holding_cost(network: Network, queues: np.ndarray) -> np.ndarray:
    """sum_k c_k q_k per copy; the reward is its negative."""
    return queues @ network.holding_costs


def observation(network: Network, queues: np.ndarray, connected: np.ndarray) -> np.ndarray:
    """float32 (N, K) queue lengths, followed by the (N, K) connectivity bits if the instance has them."""
    if network.connectivity is None:
        return queues.astype(np.float32)
    return np.concatenate([queues, connected], axis=-1).astype(np.float32)


class QueueNetworkEnv(gym.Env):
    """One copy of a queueing network; see the module docstring for the order of events in a step.

    Observation: queue lengths (float32), then, if the instance has `connectivity`, the 0/1
    bits saying which buffers are connected in the coming slot. Action: Box(0, 1, (K,)) weights.
    `reset(options={"initial_queues": [...]})` starts from given queue lengths instead of empty.
    """

    metadata = {"render_modes": []}

    def __init__(self, instance: str | dict = "single-server-2class"):
        self.network = Network.from_instance(instance)
        num_buffers = self.network.num_buffers
        self.action_space = gym.spaces.Box(0.0, 1.0, (num_buffers,), np.float32)
        self.observation_space = gym.spaces.Box(0.0, np.inf, (self.network.observation_size,), np.float32)
        self._queues = np.zeros((1, num_buffers), dtype=np.int64)
        self._connected = np.ones((1, num_buffers), dtype=bool)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        initial_queues = (options or {}).get("initial_queues")
        if initial_queues is None:
            self._queues = np.zeros((1, self.network.num_buffers), dtype=np.int64)
        else:
            queues = np.asarray(initial_queues)
            if (
                queues.shape != (self.network.num_buffers,)
                or not np.all(np.isfinite(queues))
                or np.any(queues < 0)
                or np.any(queues != np.round(queues))
            ):
                raise ValueError(
                    f'option "initial_queues" must be {self.network.num_buffers} non-negative integers, '
                    f"got {initial_queues!r}"
                )
            self._queues = queues.astype(np.int64)[None, :]
        self._connected = draw_connectivity(self.network, self.np_random, 1)
        return observation(self.network, self._queues, self._connected)[0], {}

    def step(self, action):
        weights = np.asarray(action, dtype=np.float64).reshape(1, self.network.num_buffers)
        self._queues, self._connected, _ = step_dynamics(
            self.network, self._queues, self._connected, weights, self.np_random
        )
        reward = -float(holding_cost(self.network, self._queues)[0])
        return observation(self.network, self._queues, self._connected)[0], reward, False, False, {}
