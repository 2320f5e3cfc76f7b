"""Built-in long-term-average control problems: discrete-time queueing networks.

Importing the package registers `QueueNetwork-v0`, so the trainer can use
`--env-id queueing:QueueNetwork-v0 --env-kwargs '{"instance": "NAME"}'`.
"""

import gymnasium

from queueing.env import QueueNetworkEnv, available_instances, load_instance

gymnasium.register(id="QueueNetwork-v0", entry_point="queueing.env:QueueNetworkEnv", max_episode_steps=1000)

__all__ = ["QueueNetworkEnv", "available_instances", "load_instance"]
