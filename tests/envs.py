"""Small envs for the tests, registered on import so the CLI can use `tests.envs:NAME`."""

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space


class ConstantRewardEnv(gym.Env):
    """Reward `reward` every step and a step-counter observation [t, 1]: returns are known exactly.

    `terminate_after`: terminate at that step; `fail_at_step`: raise at that step (an env whose kwargs build it
    but break its stepping)."""

    def __init__(self, reward=2.0, terminate_after=None, fail_at_step=None):
        self.reward, self.terminate_after, self.fail_at_step = reward, terminate_after, fail_at_step
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0, 1.0], np.float32), {}

    def step(self, action):
        self.t += 1
        if self.fail_at_step is not None and self.t >= self.fail_at_step:
            raise ValueError(f"broken at step {self.t}")
        terminated = self.terminate_after is not None and self.t >= self.terminate_after
        return np.array([self.t, 1.0], np.float32), self.reward_at(self.t), terminated, False, {}

    def reward_at(self, t):
        return self.reward


class StepIndexRewardEnv(ConstantRewardEnv):
    """Reward t at step t of an episode, a continuing task: a warm-up changes the mean reward it scores."""

    metadata = {"continuing": True, "render_modes": []}

    def reward_at(self, t):
        return float(t)


class DiscreteActionEnv(ConstantRewardEnv):
    def __init__(self):
        super().__init__()
        self.action_space = gym.spaces.Discrete(3)


class NextStepVectorEnv(gym.vector.VectorEnv):
    """A native vector env that autoresets in NEXT_STEP mode, which the trainer cannot bootstrap from."""

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs=1, max_episode_steps=None):
        self.num_envs = num_envs
        self.single_observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.single_action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)

    def reset(self, *, seed=None, options=None):
        return np.zeros((self.num_envs, 2), np.float32), {}

    def step(self, actions):
        zeros = np.zeros(self.num_envs, bool)
        return np.zeros((self.num_envs, 2), np.float32), np.ones(self.num_envs), zeros, zeros, {}


gym.register("ConstantReward-v0", entry_point=ConstantRewardEnv, max_episode_steps=10)
gym.register("Continuing-v0", entry_point=ConstantRewardEnv)
gym.register("StepIndexReward-v0", entry_point=StepIndexRewardEnv)
gym.register("DiscreteAction-v0", entry_point=DiscreteActionEnv, max_episode_steps=10)
gym.register("NextStepVector-v0", entry_point=ConstantRewardEnv, vector_entry_point=NextStepVectorEnv,
             max_episode_steps=10)
