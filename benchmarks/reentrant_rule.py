"""The 6-class re-entrant line: a state-dependent rule against the best static priority, paired.

    python benchmarks/reentrant_rule.py                                   # static priority and the rule, k = 0..3
    python benchmarks/reentrant_rule.py --thresholds 1 --copies 256 --checkpoint RUN/best.pt

The best static priority on `reentrant-2` (coordinate search, `benchmarks/literature.py`) serves class 2, then 3,
then 1 at station 1, and classes 6, 5, 4 at station 2. Every class of station 1 goes on to station 2: class 1
becomes class 4 (mean service 6 there), class 3 becomes class 6 (mean service 1). The rule: the same order, except
that station 1 puts class 1 ahead of class 3 (still behind class 2) while station 2 holds at most k jobs, so a
starving station 2 is sent the job that brings it the most work. Every policy runs on the same seed in the
vector env, so copy i sees the same random numbers under each one (common random numbers). Each cost is the
long-run mean over the second half of each copy, and each difference against the static priority is paired over
copies, with 95% t intervals. With `--checkpoint` a trained agent's deterministic policy runs too, and the script
prints how often it serves class 1 first in the states where the rule decides (class 1 and class 3 waiting, class 2
empty), by station 2's content.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from queueing.env import Network  # noqa: E402
from queueing.longrun import checkpoint_policy, long_run, t_half_width  # noqa: E402
from queueing.vector_env import QueueNetworkVectorEnv  # noqa: E402

INSTANCE = "reentrant-2"
# Scores of the best static priority (highest served first): buffers 0-2 are classes 1-3 at station 1, 3-5 are
# classes 4-6 at station 2.
STATIC_SCORES = np.array([0.0, 2.0, 1.0, 0.0, 1.0, 2.0])
STATION_2 = slice(3, 6)
MOST_JOBS_SHOWN = 12  # station-2 contents from here up are counted together


def static_policy(observations):
    return np.broadcast_to(STATIC_SCORES, (observations.shape[0], STATIC_SCORES.size)).copy()


def starvation_rule(k):
    """The static priority, with class 1 moved between classes 2 and 3 while station 2 holds at most `k` jobs."""
    def policy(observations):
        scores = static_policy(observations)
        scores[observations[:, STATION_2].sum(axis=1) <= k, 0] = 1.5
        return scores
    return policy


def class_1_first_by_station_2(policy, network, seed, copies=64, warmup=20_000, slots=20_000, cap=MOST_JOBS_SHOWN):
    """{jobs at station 2 (capped at `cap`): (states, share where `policy` serves class 1 before class 3)} over the
    states where station 1 holds class-1 and class-3 jobs and no class 2, after `warmup` slots."""
    envs = QueueNetworkVectorEnv(copies, network)
    observations = envs.reset(seed=seed)[0]
    counts = np.zeros((cap + 1, 2))
    for slot in range(warmup + slots):
        scores = policy(observations)
        if slot >= warmup:
            queues = observations[:, :network.num_buffers]
            decides = (queues[:, 0] > 0) & (queues[:, 2] > 0) & (queues[:, 1] == 0)
            level = np.minimum(queues[decides, STATION_2].sum(axis=1), cap).astype(int)
            np.add.at(counts, (level, 0), 1)
            np.add.at(counts, (level, 1), scores[decides, 0] > scores[decides, 2])
        observations = envs.step(scores)[0]
    return {level: (int(states), served / states) for level, (states, served) in enumerate(counts) if states}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--thresholds", nargs="+", type=int, default=[0, 1, 2, 3], help="values of k to run")
    parser.add_argument("--checkpoint", help="a ppo_continuous.py checkpoint trained on reentrant-2")
    parser.add_argument("--copies", type=int, default=64, help="independent copies per policy")
    parser.add_argument("--horizon", type=int, default=160_000, help="slots per copy (the first half is discarded)")
    parser.add_argument("--seed", type=int, default=12345)
    options = parser.parse_args()
    network = Network.from_instance(INSTANCE, "priority")
    policies = {"static priority": static_policy}
    policies.update({f"rule, k = {k}": starvation_rule(k) for k in options.thresholds})
    if options.checkpoint:
        trained, trained_network = checkpoint_policy(options.checkpoint)
        if trained_network.definition != network.definition or trained_network.allocation != "priority":
            parser.exit(2, f"{parser.prog}: error: --checkpoint {options.checkpoint} was trained on "
                           f"{trained_network.name} ({trained_network.allocation} allocation); give one trained on "
                           f"{INSTANCE} with the priority allocation\n")
        policies[Path(options.checkpoint).name] = trained
    print(f"{INSTANCE}: {options.copies} copies x {options.horizon:,} slots, first half discarded, seed {options.seed}")
    static = None
    for name, policy in policies.items():
        result = long_run(network, policy, options.seed, options.copies, precision=1e-9,
                          first_horizon=options.horizon, max_horizon=options.horizon)
        static = result.replications if static is None else static
        paired = static - result.replications  # cost minus the static priority's cost, copy by copy
        print(f"{name:20s} cost {-result.lta_return:.3f} ± {result.half_width:.3f}   "
              f"minus static, paired: {paired.mean():+.3f} ± {t_half_width(paired):.3f}", flush=True)
    if options.checkpoint:
        print("class 1 served before class 3 (class 2 empty), by jobs at station 2:")
        for level, (states, share) in class_1_first_by_station_2(trained, network, options.seed).items():
            print(f"  {level:>2}{'+' if level == MOST_JOBS_SHOWN else ' '}: {share:4.0%} of {states:,} states")


if __name__ == "__main__":
    main()
