"""PPO against the classical policies on the built-in queueing instances, discounted vs average-reward mode.

    python benchmarks/queueing_ppo.py                                   # the README's table (about an hour on 2 cores)
    python benchmarks/queueing_ppo.py --instances single-server-2class --seeds 1 --total-timesteps 200000

For each instance, mode and seed it trains PPO through the CLI with the README's recommended settings, then
evaluates the run's best checkpoint (`best.pt`) with the deterministic action over `--eval-steps` steps
(10 episodes of eval_steps / 10 steps, from empty queues) and compares its LTA return with the best
classical policy's, evaluated over as many steps (95% confidence interval by batch means).
"""

import argparse
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from queueing.baselines import POLICIES, evaluate_policy  # noqa: E402

# The README's recommended settings for the queueing instances (see README, "Queueing instances").
RECOMMENDED = ["--num-envs", "8", "--num-steps", "256", "--reset-steps", "5000", "--eval-episodes", "0"]
MODES = {"discounted": [], "average": ["--average-reward"]}


def train_and_evaluate(instance, mode, seed, total_timesteps, eval_steps, workdir):
    """Train one run, then evaluate its best checkpoint; returns the evaluated LTA return."""
    run_root = Path(workdir) / f"{instance}-{mode}-{seed}"
    run_root.mkdir(parents=True)
    common = ["--env-id", "queueing:QueueNetwork-v0", "--env-kwargs", f'{{"instance": "{instance}"}}']
    train = subprocess.run([sys.executable, str(REPO / "ppo_continuous.py"), *common, *RECOMMENDED, *MODES[mode],
                            "--seed", str(seed), "--total-timesteps", str(total_timesteps)],
                           cwd=run_root, capture_output=True, text=True)
    if train.returncode != 0:
        raise RuntimeError(f"training {instance} {mode} {seed} failed:\n{train.stderr[-2000:]}")
    (best,) = run_root.glob("runs/*/best.pt")
    evaluation = subprocess.run([sys.executable, str(REPO / "ppo_continuous.py"), "--eval-only", str(best),
                                 "--eval-episodes", "10", "--reset-steps", str(eval_steps // 10),
                                 "--seed", str(1000 + seed)], cwd=run_root, capture_output=True, text=True)
    match = re.search(r"LTA return (\S+)", evaluation.stdout)
    if evaluation.returncode != 0 or not match:
        raise RuntimeError(f"evaluating {best} failed:\n{evaluation.stderr[-2000:]}")
    return float(match.group(1))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", nargs="+",
                        default=["single-server-2class", "criss-cross", "connectivity-4buffer"])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--total-timesteps", type=int, default=1_000_000)
    parser.add_argument("--eval-steps", type=int, default=1_000_000)
    parser.add_argument("--parallel", type=int, default=2, help="trainings at once (one core each)")
    options = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="queueing-ppo-")
    jobs = [(instance, mode, seed) for instance in options.instances for mode in options.modes
            for seed in options.seeds]
    with ThreadPoolExecutor(options.parallel) as pool:
        futures = {job: pool.submit(train_and_evaluate, *job, options.total_timesteps, options.eval_steps, workdir)
                   for job in jobs}
        baselines = {instance: {name: evaluate_policy(instance, POLICIES[name](instance), options.eval_steps, seed=0)
                                for name in POLICIES} for instance in options.instances}
        results = {job: future.result() for job, future in futures.items()}

    print(f"PPO: {options.total_timesteps} training steps, settings {' '.join(RECOMMENDED)}; "
          f"every LTA return evaluated over {options.eval_steps} steps")
    print("| instance | mode | seed | PPO best.pt LTA return | best baseline | its LTA return (95% CI) | PPO vs baseline cost |")
    print("|---|---|---|---|---|---|---|")
    for instance, mode, seed in jobs:
        name, (mean, half_width) = max(baselines[instance].items(), key=lambda item: item[1][0])
        ppo = results[(instance, mode, seed)]
        print(f"| {instance} | {mode} | {seed} | {ppo:.4f} | {name} | {mean:.4f} +- {half_width:.4f} | "
              f"{ppo / mean - 1:+.1%} |")


if __name__ == "__main__":
    main()
