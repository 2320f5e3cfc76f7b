"""Training steps per second on a queueing instance: this trainer against an older version of it.

    git worktree add /tmp/old 781460b      # the trainer before the native vector env (SyncVectorEnv of single envs)
    python benchmarks/queueing_training_speed.py --old-script /tmp/old/ppo_continuous.py

Each configuration trains through the command line, in its own temporary folder, for `--total-timesteps`
steps, one process at a time; the configurations take turns `--rounds` times and the median of each is shown,
so a change in machine load hits all of them alike. Configurations:

- old: the old script with the settings its README recommended (`OLD_SETTINGS`);
- new, same settings: this trainer with the same settings (its evaluations are extra work the old one did not do);
- new, recommended: this trainer with the settings README.md recommends for the queueing instances (the discounted
  mode, `allocation: "priority"`).

"train SPS" is steps over the time spent in rollouts and learning phases (the old script does no evaluation
during training; for this trainer, the evaluation seconds it reports are subtracted); "end-to-end SPS" is
steps over the process's whole wall time, start-up, evaluations and the final evaluation included.
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OLD_SETTINGS = ["--num-envs", "8", "--num-steps", "256", "--reset-steps", "5000"]
RECOMMENDED = ["--num-envs", "64", "--num-steps", "256", "--num-minibatches", "16", "--reset-steps", "5000", "--compile"]
RECOMMENDED_ENV = {"allocation": "priority"}  # with the settings above: README, PPO on the queueing instances
PROGRESS_SPS = re.compile(r"SPS (\d+)")
EVAL_SECONDS = re.compile(r"evaluations took ([\d.]+) s of ([\d.]+) s")


def run(script, settings, env_kwargs, total_timesteps):
    """One training run; returns (train SPS, end-to-end SPS)."""
    command = [sys.executable, str(script), "--env-id", "queueing:QueueNetwork-v0", "--num-threads", "1",
               "--env-kwargs", json.dumps(env_kwargs), "--total-timesteps", str(total_timesteps),
               *settings]
    with tempfile.TemporaryDirectory() as folder:
        start = time.monotonic()
        result = subprocess.run(command, cwd=folder, capture_output=True, text=True)
        wall = time.monotonic() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    batch = int(settings[settings.index("--num-envs") + 1]) * int(settings[settings.index("--num-steps") + 1])
    steps = total_timesteps // batch * batch  # whole rollouts, as both versions train
    timing = EVAL_SECONDS.search(result.stdout)
    if timing:  # this trainer: its own clock, minus evaluations
        eval_seconds, run_seconds = map(float, timing.groups())
        return steps / (run_seconds - eval_seconds), steps / wall
    return float(PROGRESS_SPS.findall(result.stdout)[-1]), steps / wall


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old-script", required=True, help="ppo_continuous.py of an older checkout")
    parser.add_argument("--instance", default="criss-cross")
    parser.add_argument("--total-timesteps", type=int, default=204_800)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    instance = {"instance": options.instance}
    configurations = {
        "old, its recommended settings": (Path(options.old_script), OLD_SETTINGS, instance),
        "new, the same settings": (REPO / "ppo_continuous.py", OLD_SETTINGS, instance),
        "new, recommended settings": (REPO / "ppo_continuous.py", RECOMMENDED, {**instance, **RECOMMENDED_ENV}),
    }
    measured = {name: [] for name in configurations}
    for _ in range(options.rounds):
        for name, (script, settings, env_kwargs) in configurations.items():
            measured[name].append(run(script, settings, env_kwargs, options.total_timesteps))
    old_train = statistics.median(train for train, _ in measured["old, its recommended settings"])
    print(f"{options.instance}, {options.total_timesteps} steps per run, median of {options.rounds} rounds")
    print("| configuration | settings | train SPS | vs old | end-to-end SPS |")
    print("|---|---|---:|---:|---:|")
    for name, (_, settings, env_kwargs) in configurations.items():
        train = statistics.median(train for train, _ in measured[name])
        end_to_end = statistics.median(total for _, total in measured[name])
        print(f"| {name} | `{' '.join(settings)}`, env kwargs `{json.dumps(env_kwargs)}` | {train:.0f} | "
              f"{train / old_train:.2f}x | {end_to_end:.0f} |")


if __name__ == "__main__":
    main()
