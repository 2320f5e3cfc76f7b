"""N copies of a queueing network stepped in one numpy call: a native gymnasium vector env.

    gym.make_vec("queueing:QueueNetwork-v0", num_envs=64, instance="criss-cross")

picks this class (the registered `vector_entry_point`). It behaves exactly like
`SyncVectorEnv` of N `gym.make("queueing:QueueNetwork-v0", ...)` envs with
`autoreset_mode=SAME_STEP`: copy i reset with `seed=s` is seeded with s + i and follows the same
trajectory as the single env seeded with s + i; a copy whose episode reaches the time limit
reports `truncated`, its final observation in `infos["final_obs"]` and is reset in the same step.
"""

from __future__ import annotations

import numpy as np
from gymnasium.spaces import Box
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from queueing.env import (
    Network,
    action_space,
    draw_connectivity,
    draw_key,
    holding_cost,
    next_state_distribution,
    observation,
    parse_initial_queues,
    slot_uniforms,
    step_dynamics,
)


class QueueNetworkVectorEnv(VectorEnv):
    """`num_envs` independent copies of one network; see `queueing.env` for the rules of a slot.

    `max_episode_steps` is the time limit per episode (None: episodes never end); `allocation` as
    for the single env. The task is continuing, so `terminated` is always False.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "continuing": True, "render_modes": []}

    def __init__(
        self,
        num_envs: int = 1,
        instance: str | dict | Network = "single-server-2class",
        max_episode_steps: int | None = None,
        allocation: str | None = None,
    ):
        if not isinstance(num_envs, int) or isinstance(num_envs, bool) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        if max_episode_steps is not None and (
            not isinstance(max_episode_steps, int) or isinstance(max_episode_steps, bool) or max_episode_steps < 1
        ):
            raise ValueError(f"max_episode_steps must be a positive integer or None, got {max_episode_steps!r}")
        # None: a given Network keeps its own rule (anything else starts proportional).
        self.network = Network.from_instance(instance, allocation)
        self.num_envs = num_envs
        self.max_episode_steps = max_episode_steps
        num_buffers = self.network.num_buffers
        self.single_action_space = action_space(self.network)
        self.single_observation_space = Box(0.0, np.inf, (self.network.observation_size,), np.float32)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.observation_space = batch_space(self.single_observation_space, num_envs)

        # One generator per copy, as each single env has its own `np_random`; it only draws keys.
        self._generators: list[np.random.Generator | None] = [None] * num_envs
        self._keys = np.zeros(num_envs, dtype=np.uint64)
        self._slots = np.zeros(num_envs, dtype=np.int64)
        self._elapsed = np.zeros(num_envs, dtype=np.int64)
        self._queues = np.zeros((num_envs, num_buffers), dtype=np.int64)
        self._connected = np.ones((num_envs, num_buffers), dtype=bool)

    def _reset_copies(self, copies: np.ndarray, seeds, initial_queues: np.ndarray | None) -> None:
        """Resets the given copies exactly as `QueueNetworkEnv.reset` resets one."""
        for copy, seed in zip(copies, seeds):
            if seed is not None or self._generators[copy] is None:
                self._generators[copy], _ = seeding.np_random(seed)
            self._keys[copy] = draw_key(self._generators[copy])
        self._queues[copies] = 0 if initial_queues is None else initial_queues
        self._slots[copies] = 0
        self._elapsed[copies] = 0
        uniforms = slot_uniforms(self._keys[copies], self._slots[copies], self.network.draws_per_slot)
        self._connected[copies] = draw_connectivity(self.network, uniforms)

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict | None = None):
        """Seeds copy i with `seed + i` (an int), `seed[i]` (a list) or keeps its generator (None).

        Options: `initial_queues` (K integers, for every reset copy) and gymnasium's `reset_mask`
        (a bool array (num_envs,): reset only those copies).
        """
        options = dict(options or {})
        reset_mask = options.pop("reset_mask", None)
        if reset_mask is None:
            copies = np.arange(self.num_envs)
        else:
            reset_mask = np.asarray(reset_mask)
            if reset_mask.shape != (self.num_envs,) or reset_mask.dtype != np.bool_ or not reset_mask.any():
                raise ValueError(f'option "reset_mask" must be a bool array of shape ({self.num_envs},) with a True')
            copies = np.flatnonzero(reset_mask)
        if seed is None:
            seeds = [None] * self.num_envs
        elif isinstance(seed, (int, np.integer)):
            seeds = [int(seed) + copy for copy in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"seed must be an int, None or a list of {self.num_envs} seeds, got {len(seeds)}")
        initial_queues = options.pop("initial_queues", None)
        if initial_queues is not None:
            initial_queues = parse_initial_queues(self.network, initial_queues)
        self._reset_copies(copies, [seeds[copy] for copy in copies], initial_queues)
        return observation(self.network, self._queues, self._connected), {}

    def next_state_distribution(self, actions):
        """Where `step(actions)` can take each copy from its current state: (observations (N, M, obs), probabilities
        (N, M)), the M candidates of `queueing.env.next_state_distribution` (continuous-time networks only)."""
        weights = np.asarray(actions, dtype=np.float64)
        if weights.shape != (self.num_envs, self.network.num_buffers):
            raise ValueError(
                f"actions must have shape ({self.num_envs}, {self.network.num_buffers}), got {weights.shape}"
            )
        next_queues, probabilities = next_state_distribution(self.network, self._queues, weights)
        connected = np.ones(next_queues.shape, dtype=bool)
        return observation(self.network, next_queues, connected), probabilities

    def step(self, actions):
        weights = np.asarray(actions, dtype=np.float64)
        if weights.shape != (self.num_envs, self.network.num_buffers):
            raise ValueError(
                f"actions must have shape ({self.num_envs}, {self.network.num_buffers}), got {weights.shape}"
            )
        self._slots += 1
        uniforms = slot_uniforms(self._keys, self._slots, self.network.draws_per_slot)
        self._queues, self._connected, _ = step_dynamics(
            self.network, self._queues, self._connected, weights, uniforms
        )
        self._elapsed += 1
        rewards = -holding_cost(self.network, self._queues)
        observations = observation(self.network, self._queues, self._connected)
        terminated = np.zeros(self.num_envs, dtype=np.bool_)
        if self.max_episode_steps is None:
            return observations, rewards, terminated, terminated.copy(), {}

        truncated = self._elapsed >= self.max_episode_steps
        if not truncated.any():
            return observations, rewards, terminated, truncated, {}
        # What SyncVectorEnv(..., autoreset_mode=SAME_STEP) reports: an object array holding the
        # final observation of each ended copy (None elsewhere), the single envs' (empty) final
        # infos, and a mask for each.
        ended = np.flatnonzero(truncated)
        final_obs = np.full(self.num_envs, None, dtype=object)
        for copy in ended:
            final_obs[copy] = observations[copy].copy()
        infos = {"final_obs": final_obs, "_final_obs": truncated.copy(), "final_info": {}, "_final_info": truncated.copy()}
        self._reset_copies(ended, [None] * len(ended), None)
        observations[ended] = observation(self.network, self._queues[ended], self._connected[ended])
        return observations, rewards, terminated, truncated, infos
