"""Built-in long-term-average control problems: discrete-time queueing networks.

Importing the package registers `QueueNetwork-v0`, so the trainer can use
`--env-id queueing:QueueNetwork-v0 --env-kwargs '{"instance": "NAME"}'`. `gym.make` gives the
single env (`QueueNetworkEnv`); `gym.make_vec` gives the native vector env
(`QueueNetworkVectorEnv`), which steps all copies in one numpy call.
"""

import gymnasium

from queueing.env import QueueNetworkEnv, available_instances, load_instance
from queueing.vector_env import QueueNetworkVectorEnv

gymnasium.register(
    id="QueueNetwork-v0",
    entry_point="queueing.env:QueueNetworkEnv",
    vector_entry_point="queueing.vector_env:QueueNetworkVectorEnv",
    max_episode_steps=1000,
)

__all__ = ["QueueNetworkEnv", "QueueNetworkVectorEnv", "available_instances", "load_instance"]
