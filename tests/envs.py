"""Small envs for the tests, registered on import so the CLI can use `tests.envs:NAME`."""

import gymnasium as gym
import numpy as np


class ConstantRewardEnv(gym.Env):
    """Reward `reward` every step and a step-counter observation: returns are known exactly."""

    def __init__(self, reward=2.0, terminate_after=None):
        self.reward, self.terminate_after = reward, terminate_after
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0, 1.0], np.float32), {}

    def step(self, action):
        self.t += 1
        terminated = self.terminate_after is not None and self.t >= self.terminate_after
        return np.array([self.t, 1.0], np.float32), self.reward, terminated, False, {}


class DiscreteActionEnv(ConstantRewardEnv):
    def __init__(self):
        super().__init__()
        self.action_space = gym.spaces.Discrete(3)


gym.register("ConstantReward-v0", entry_point=ConstantRewardEnv, max_episode_steps=10)
gym.register("Continuing-v0", entry_point=ConstantRewardEnv)
gym.register("DiscreteAction-v0", entry_point=DiscreteActionEnv, max_episode_steps=10)
