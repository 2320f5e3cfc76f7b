"""Long-run (steady-state) LTA return of a policy, simulated to a stated precision.

    python -m queueing.longrun --instance reentrant-2 --policy lbfs
    python -m queueing.longrun --checkpoint runs/<run>/best.pt --precision 0.005

The estimator is independent replications with a growing horizon: `copies` independent copies of the network start
empty (copy i seeded with `seed + i`) and run T slots; each copy's mean reward over the second half of its run,
slots [T/2, T), is one replication (the first half is the warm-up, discarded), and the 95% CI is Student's t over
the replications. While the half-width exceeds `precision` times the mean, T doubles (the scored half of the last
stage becomes warm-up). So the warm-up grows with the run and every decision depends on the simulated rewards only:
one seed gives the same answer on any machine.

A stationarity check comes with it: the paired difference, over copies, between the means of the third and the
fourth quarter of the run. A drift whose 99.9% CI excludes 0 says the warm-up was not long enough (or the policy is
unstable): the estimate is then flagged, not silently returned.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from queueing.env import Network
from queueing.vector_env import QueueNetworkVectorEnv

Policy = Callable[[np.ndarray], np.ndarray]
DEFAULT_COPIES = 200
DEFAULT_PRECISION = 0.01
DEFAULT_FIRST_HORIZON = 20_000
DEFAULT_MAX_HORIZON = 2 ** 23  # 8.4M slots per copy
# The stationarity check flags a drift only when its 99.9% interval excludes 0: one false alarm in a thousand runs.
DRIFT_CONFIDENCE = 0.999


@dataclass(frozen=True)
class LongRun:
    lta_return: float  # mean reward per slot (= minus the cost per unit time in continuous time)
    half_width: float  # 95% CI, Student's t over the copies
    copies: int
    horizon: int  # slots per copy; the first half is warm-up
    drift: float  # mean of the 4th quarter minus mean of the 3rd quarter, paired over copies
    drift_half_width: float  # at DRIFT_CONFIDENCE
    seconds: float
    replications: np.ndarray = field(repr=False, compare=False)  # (copies,) each copy's scored mean, for paired comparisons

    @property
    def relative_half_width(self) -> float:
        return self.half_width / max(abs(self.lta_return), 1e-12)

    @property
    def stationary(self) -> bool:
        """False when the last two quarters differ significantly: the warm-up was too short."""
        return abs(self.drift) <= self.drift_half_width

    def describe(self) -> str:
        text = (f"LTA return {self.lta_return:.4f} +- {self.half_width:.4f} (95% CI, {self.relative_half_width:.2%}; "
                f"{self.copies} independent copies x {self.horizon:,} slots, first half of each discarded)")
        if not self.stationary:
            text += (f"; WARNING: not stationary, the last quarter differs from the third by {self.drift:+.4f} "
                     f"+- {self.drift_half_width:.4f}")
        return text


def t_half_width(values: np.ndarray, confidence: float = 0.95) -> float:
    """Half-width of Student's t interval for the mean of independent `values`."""
    return float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))


def long_run(network: Network | str | dict, policy: Policy, seed: int = 0, copies: int = DEFAULT_COPIES,
             precision: float = DEFAULT_PRECISION, first_horizon: int = DEFAULT_FIRST_HORIZON,
             max_horizon: int = DEFAULT_MAX_HORIZON) -> LongRun:
    """The policy's steady-state LTA return with a 95% CI narrower than `precision` of it (or at `max_horizon`).

    `policy` maps (copies, obs_dim) observations to (copies, K) actions, as the env takes them.
    """
    check_sizes(copies, first_horizon)
    start = time.perf_counter()
    network = Network.from_instance(network)
    envs = QueueNetworkVectorEnv(copies, network, max_episode_steps=None)
    state = {"observations": envs.reset(seed=seed)[0], "slot": 0, "cumulative": np.zeros(copies)}

    def reward_until(end: int) -> np.ndarray:
        while state["slot"] < end:
            state["observations"], rewards, *_ = envs.step(policy(state["observations"]))
            state["cumulative"] += rewards
            state["slot"] += 1
        return state["cumulative"].copy()

    return doubling_estimate(reward_until, copies, precision, first_horizon, max_horizon, start)


def check_sizes(copies: int, first_horizon: int) -> None:
    if copies < 2:
        raise ValueError(f"copies must be at least 2 for a confidence interval, got {copies}")
    if first_horizon < 4 or first_horizon % 4:
        raise ValueError(f"first_horizon must be a positive multiple of 4, got {first_horizon}")


def doubling_estimate(reward_until: Callable[[int], np.ndarray], copies: int, precision: float, first_horizon: int,
                      max_horizon: int, start: float) -> LongRun:
    """The estimator of the module docstring. `reward_until(slot)`, called with increasing slots, runs every copy
    up to `slot` and returns each copy's reward summed from the start."""
    marks = {0: np.zeros(copies)}  # each copy's cumulative reward at every quarter of the horizons so far
    horizon = first_horizon
    while True:
        for quarter in range(1, 5):
            end = horizon * quarter // 4
            if end not in marks:
                marks[end] = reward_until(end)
        half, three_quarters = horizon // 2, 3 * horizon // 4
        replications = (marks[horizon] - marks[half]) / (horizon - half)
        mean, half_width = float(replications.mean()), t_half_width(replications)
        if half_width <= precision * abs(mean) or horizon * 2 > max_horizon:
            third = (marks[three_quarters] - marks[half]) / (three_quarters - half)
            fourth = (marks[horizon] - marks[three_quarters]) / (horizon - three_quarters)
            drift = fourth - third
            return LongRun(mean, half_width, copies, horizon, float(drift.mean()),
                           t_half_width(drift, DRIFT_CONFIDENCE), time.perf_counter() - start, replications)
        horizon *= 2


def checkpoint_policy(path: str) -> tuple[Policy, Network]:
    """A ppo_continuous.py checkpoint's deterministic policy (as numpy) and the network it was trained on."""
    from queueing.exact import checkpoint_policy as exact_checkpoint_policy

    policy, instance, allocation = exact_checkpoint_policy(path)
    return policy, Network.from_instance(instance, allocation)


class _OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None, prog: str = "python -m queueing.longrun") -> None:
    from queueing.baselines import make_policy, policy_names

    parser = _OneLineErrorParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--instance", help="instance name or JSON file (with --policy)")
    parser.add_argument("--policy", help=f"a classical policy: {', '.join(policy_names())}")
    parser.add_argument("--checkpoint", help="a ppo_continuous.py checkpoint: its deterministic policy")
    parser.add_argument("--seed", type=int, default=0, help="copy i is seeded with seed + i")
    parser.add_argument("--copies", type=int, default=DEFAULT_COPIES, help="independent replications")
    parser.add_argument("--precision", type=float, default=DEFAULT_PRECISION,
                        help="target 95%% CI half-width, relative to the value")
    parser.add_argument("--max-horizon", type=int, default=DEFAULT_MAX_HORIZON, help="most slots per copy")
    args = parser.parse_args(argv)
    if args.copies < 2 or args.max_horizon < DEFAULT_FIRST_HORIZON:
        parser.error(f"--copies must be >= 2 and --max-horizon >= {DEFAULT_FIRST_HORIZON}")
    if bool(args.policy) == bool(args.checkpoint):
        parser.error("give exactly one of --policy (with --instance) or --checkpoint")
    if not 0 < args.precision < 1:
        parser.error(f"--precision must be in (0, 1), got {args.precision}")
    try:
        if args.checkpoint:
            policy, network = checkpoint_policy(args.checkpoint)
            what = f"checkpoint {args.checkpoint}"
        else:
            network = Network.from_instance(args.instance or "single-server-2class")
            policy, what = make_policy(args.policy, network, np.random.default_rng(args.seed)), f"policy {args.policy}"
        result = long_run(network, policy, args.seed, args.copies, args.precision, max_horizon=args.max_horizon)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(f"instance {network.name}, {what}: {result.describe()}; seed {args.seed}; {result.seconds:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
