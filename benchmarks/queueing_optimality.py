"""How close PPO gets to the exact optimum of a queueing instance (issue 11).

    python benchmarks/queueing_optimality.py --instance criss-cross --seeds 1 2 3
    python benchmarks/queueing_optimality.py --instance single-server-2class --seeds 1 2 3 --total-timesteps 4000000
    python benchmarks/queueing_optimality.py --instance criss-cross --allocation proportional --total-timesteps 4000000
    nice -n 5 python benchmarks/queueing_optimality.py --instance criss-cross --seeds 1 --optimum -9.9604 --curves cc.png

For each seed it trains PPO through the CLI with the settings the README recommends for the queueing instances
(`RECOMMENDED` below, on the env with `allocation="priority"`, 20M steps, the discounted mode with the trainer's
default gamma 0.99; `--mode average` adds `--average-reward`; `--extra` appends or overrides options), then
computes the exact LTA return of the run's `best.pt` (the agent with the best evaluated score) with
`python -m queueing.exact --checkpoint`, and the instance's optimum with `python -m queueing.exact --instance`
(unless `--optimum` gives it). It prints one Markdown table row per seed (exact cost, optimum, gap, the steps of the
best checkpoint and of the run, wall time) and the path of every checkpoint it evaluated. `--curves FILE.png` draws
each run's evaluated score (the trainer's `eval/LTA_return`, simulated under the fixed evaluation protocol) as a gap
to the optimum against environment steps.

Trainings run `--parallel` at a time (default 2), each with one torch thread. Run directories are kept under
`--workdir` (default: a new temporary folder).
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The README's recommended settings for the queueing instances ("PPO on the queueing instances").
RECOMMENDED = ["--num-envs", "64", "--num-steps", "256", "--num-minibatches", "16", "--reset-steps", "5000"]
EXACT_RETURN = re.compile(r"exact LTA return (\S+)")


def exact_lta(*args):
    """The LTA return `python -m queueing.exact ARGS` prints (a reward: minus the cost per step)."""
    result = subprocess.run([sys.executable, "-m", "queueing.exact", *args], cwd=REPO, capture_output=True, text=True)
    match = EXACT_RETURN.search(result.stdout)
    if result.returncode != 0 or not match:
        raise RuntimeError(f"queueing.exact {' '.join(args)} failed:\n{result.stdout[-1000:]}{result.stderr[-2000:]}")
    return float(match.group(1))


def settings(options):
    base = list(RECOMMENDED)
    if options.mode == "average":
        base.append("--average-reward")
    return base + options.extra


def env_kwargs(options):
    # A file given by a relative path must still be found from the run's own folder.
    instance = str(Path(options.instance).resolve()) if Path(options.instance).is_file() else options.instance
    kwargs = {"instance": instance}
    if options.allocation != "proportional":
        kwargs["allocation"] = options.allocation
    return kwargs


def train(options, seed, workdir):
    """Train one seed; returns (best.pt path, wall seconds, total steps)."""
    run_root = Path(workdir) / f"{Path(options.instance).stem}-{options.mode}-seed{seed}"
    run_root.mkdir(parents=True, exist_ok=False)
    command = [sys.executable, str(REPO / "ppo_continuous.py"), "--env-id", "queueing:QueueNetwork-v0",
               "--env-kwargs", json.dumps(env_kwargs(options)), "--num-threads", "1",
               "--seed", str(seed), "--total-timesteps", str(options.total_timesteps), *settings(options)]
    if options.compile:
        command.append("--compile")
    if options.eval_every:
        command += ["--eval-every", str(options.eval_every)]
    start = time.monotonic()
    with open(run_root / "train.log", "w") as log:
        result = subprocess.run(command, cwd=run_root, stdout=log, stderr=subprocess.STDOUT)
    wall = time.monotonic() - start
    if result.returncode != 0:
        raise RuntimeError(f"training seed {seed} failed (log: {run_root / 'train.log'})")
    (best,) = run_root.glob("runs/*/best.pt")
    return best, wall


def evaluated_curve(run_dir):
    """(steps, evaluated LTA returns) from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    if "eval/LTA_return" not in accumulator.Tags()["scalars"]:
        return [], []
    events = accumulator.Scalars("eval/LTA_return")
    return [event.step for event in events], [event.value for event in events]


def draw_curves(path, instance, optimum, runs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 4.2))
    for seed, run_dir in runs:
        steps, returns = evaluated_curve(run_dir)
        axes.plot(steps, [100 * (value / optimum - 1) for value in returns], marker=".", label=f"seed {seed}")
    axes.axhline(0, color="black", linewidth=1, label="exact optimum")
    axes.axhline(2, color="grey", linestyle="--", linewidth=1, label="2% above the optimum")
    axes.set_ylim(bottom=min(-1, axes.get_ylim()[0]), top=min(axes.get_ylim()[1], 40))
    axes.set_xlabel("environment steps")
    axes.set_ylabel("evaluated cost above the exact optimum (%)")
    axes.set_title(f"PPO on {instance}: the trainer's evaluations", fontsize=11)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, fontsize=9)
    # Below the optimum no policy can be: such points are the evaluation's sampling error.
    figure.text(0.01, 0.01, "Evaluated by the trainer's protocol (common random numbers, 95% CI about ±0.6%): a "
                "point below 0% is evaluation noise, not a policy better than the optimum.", fontsize=8)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    figure.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instance", required=True, help="a shipped instance name or a JSON file")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--allocation", choices=["proportional", "priority"], default="priority",
                        help="the env's allocation rule (queueing/env.py): how the servers read the actions")
    parser.add_argument("--total-timesteps", type=int, default=20_000_000)
    parser.add_argument("--mode", choices=["average", "discounted"], default="discounted")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="further trainer options, after all others (must come last)")
    parser.add_argument("--eval-every", type=int, default=None, help="the trainer's --eval-every")
    parser.add_argument("--optimum", type=float, default=None,
                        help="the instance's optimal LTA return, if known (skips the exact solve)")
    parser.add_argument("--parallel", type=int, default=2, help="trainings at once (one core each)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="train with --compile (needs a C++ compiler)")
    parser.add_argument("--workdir", default=None, help="where the run folders go (default: a new temporary folder)")
    parser.add_argument("--curves", default=None, help="write the evaluated-gap curves to this PNG file")
    options = parser.parse_args()

    workdir = options.workdir or tempfile.mkdtemp(prefix="queueing-optimality-")
    with ThreadPoolExecutor(options.parallel) as pool:
        futures = {seed: pool.submit(train, options, seed, workdir) for seed in options.seeds}
        optimum = options.optimum
        if optimum is None:
            optimum = exact_lta("--instance", env_kwargs(options)["instance"])
        trained = {seed: future.result() for seed, future in futures.items()}
    # The exact solves are memory-hungry sparse factorisations: one at a time.
    exact = {seed: exact_lta("--checkpoint", str(best)) for seed, (best, _) in trained.items()}

    import torch

    print(f"instance {options.instance}: optimum LTA return {optimum:.4f} (cost {-optimum:.4f}); PPO settings: "
          f"{' '.join(settings(options))} --total-timesteps {options.total_timesteps}")
    print("| seed | exact LTA cost of best.pt | optimum | gap | steps (best / run) | wall time |")
    print("|---|---|---|---|---|---|")
    for seed, (best, wall) in trained.items():
        step = torch.load(best, map_location="cpu", weights_only=True)["global_step"]
        gap = exact[seed] / optimum - 1
        print(f"| {seed} | {-exact[seed]:.4f} | {-optimum:.4f} | {gap:+.2%} | {step:,} / {options.total_timesteps:,} "
              f"| {wall / 60:.1f} min |")
    for seed, (best, _) in trained.items():
        print(f"seed {seed}: {best}")
    if options.curves:
        draw_curves(options.curves, options.instance, optimum,
                    [(seed, best.parent) for seed, (best, _) in trained.items()])
        print(f"curves: {options.curves}")


if __name__ == "__main__":
    main()
