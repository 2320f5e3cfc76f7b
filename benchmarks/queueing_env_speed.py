"""Env-only speed of the queueing envs: SyncVectorEnv of N single envs vs the native vector env.

    python benchmarks/queueing_env_speed.py                       # criss-cross, N = 8 64 256 1024
    python benchmarks/queueing_env_speed.py --instance connectivity-4buffer --num-envs 64

Both are built by `gym.make_vec` with the registered 1000-step time limit and SAME_STEP autoreset,
in the same process, and stepped with the same pre-drawn random actions. The two are measured in
alternation, `--rounds` times each, and the medians are compared, so a change in machine load
hits both alike. Prints microseconds per vector step, steps per second (copies x vector steps per
second) and the speed-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import queueing  # noqa: E402,F401  (registers QueueNetwork-v0)


def make(mode: str, num_envs: int, instance: str) -> gym.vector.VectorEnv:
    if mode == "sync":
        return gym.make_vec("queueing:QueueNetwork-v0", num_envs=num_envs, vectorization_mode="sync",
                            vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP}, instance=instance)
    return gym.make_vec("queueing:QueueNetwork-v0", num_envs=num_envs, vectorization_mode="vector_entry_point",
                        instance=instance)


def seconds_per_step(envs: gym.vector.VectorEnv, actions: np.ndarray) -> float:
    start = time.perf_counter()
    for action in actions:
        envs.step(action)
    return (time.perf_counter() - start) / len(actions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instance", default="criss-cross")
    parser.add_argument("--num-envs", type=int, nargs="+", default=[8, 64, 256, 1024])
    parser.add_argument("--copy-steps", type=int, default=200_000,
                        help="copy-steps per measurement of the native env (the sync env does 1/10)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    print(f"instance {args.instance}; medians of {args.rounds} alternating rounds")
    print(f"{'N':>6} {'sync us/step':>13} {'native us/step':>15} {'sync steps/s':>13} "
          f"{'native steps/s':>15} {'speed-up':>9}")
    for num_envs in args.num_envs:
        envs = {mode: make(mode, num_envs, args.instance) for mode in ("sync", "native")}
        size = envs["native"].single_action_space.shape[0]
        rng = np.random.default_rng(0)
        native_steps = max(20, args.copy_steps // num_envs)
        actions = {"native": rng.random((native_steps, num_envs, size), dtype=np.float32)}
        actions["sync"] = actions["native"][: max(5, native_steps // 10)]
        for mode, env in envs.items():
            env.reset(seed=0)
            seconds_per_step(env, actions[mode][:5])  # warm-up
        samples = {"sync": [], "native": []}
        for _ in range(args.rounds):
            for mode in ("sync", "native"):
                samples[mode].append(seconds_per_step(envs[mode], actions[mode]))
        sync, native = (statistics.median(samples[mode]) for mode in ("sync", "native"))
        print(f"{num_envs:>6} {sync * 1e6:>13.1f} {native * 1e6:>15.1f} {num_envs / sync:>13,.0f} "
              f"{num_envs / native:>15,.0f} {sync / native:>8.1f}x")
        for env in envs.values():
            env.close()


if __name__ == "__main__":
    main()
