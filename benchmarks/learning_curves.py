"""Do two versions of the trainer learn the same? Same-seed learning curves of an old and the current trainer.

    git show c5a841b:ppo_continuous.py > /tmp/old_trainer/ppo_continuous.py
    cp checkpoint_saver.py /tmp/old_trainer/          # the old script imports it
    python benchmarks/learning_curves.py --old-script /tmp/old_trainer/ppo_continuous.py \
        --env-id Pendulum-v1 --total-timesteps 200000 --seeds 1 2
    python benchmarks/learning_curves.py --old-script ... --extra-args --num-envs 8   # --extra-args comes last
    python benchmarks/learning_curves.py --old-script ppo_continuous.py --old-args=--no-compile  # eager vs compiled

Each (version, seed) trains through the trainer's own CLI in its own directory under --workdir (a fresh temp
dir by default, kept for inspection), with `--num-threads 1`, at most --parallel runs at a time. The table
gives, per run, the mean `charts/avg_LTA_return` over each tenth of the steps trained, and the final
`eval/LTA_return` (deterministic evaluation of the run's best agent); then the mean over seeds per version.
Changes that only alter float rounding should leave old and new within the seed-to-seed spread.
"""

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

NEW_SCRIPT = Path(__file__).resolve().parent.parent / "ppo_continuous.py"
CURVE_TAG, EVAL_TAG = "charts/avg_LTA_return", "eval/LTA_return"
NUM_BINS = 10


def train(script, workdir, env_id, seed, total_timesteps, extra_args):
    """Run one training in `workdir` (the trainer writes runs/ into its working directory); returns the run dir."""
    workdir.mkdir(parents=True)
    command = [sys.executable, str(script), "--env-id", env_id, "--seed", str(seed),
               "--total-timesteps", str(total_timesteps), "--eval-episodes", "10", "--num-threads", "1",
               "--checkpoint-dir", str(workdir / "checkpoints"), *extra_args]
    print(f"[{workdir.name}] cd {workdir} && {' '.join(command)}", file=sys.stderr, flush=True)
    single_threaded = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    with open(workdir / "train.log", "w") as log:
        result = subprocess.run(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **single_threaded})
    if result.returncode != 0:
        tail = (workdir / "train.log").read_text().splitlines()[-15:]
        raise RuntimeError(f"{workdir.name} exited with status {result.returncode}:\n" + "\n".join(tail))
    run_dirs = sorted((workdir / "runs").iterdir())
    if len(run_dirs) != 1:
        raise RuntimeError(f"{workdir.name}: expected one run directory under runs/, found {run_dirs}")
    print(f"[{workdir.name}] done", file=sys.stderr, flush=True)
    return run_dirs[0]


def summarise(run_dir):
    """(mean avg LTA return over each tenth of the steps trained, final eval LTA return) of one run."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    end = max(event.step for tag in events.Tags()["scalars"] for event in events.Scalars(tag))
    curve = events.Scalars(CURVE_TAG)
    steps, values = np.array([e.step for e in curve]), np.array([e.value for e in curve])
    bins = np.minimum((steps * NUM_BINS - 1) // end, NUM_BINS - 1)  # step in (k end/10, (k+1) end/10] -> bin k
    tenths = [values[bins == k].mean() if (bins == k).any() else np.nan for k in range(NUM_BINS)]
    final_eval = events.Scalars(EVAL_TAG)[-1].value if EVAL_TAG in events.Tags()["scalars"] else np.nan
    return tenths, final_eval


def table(results, seeds):
    header = "| version | seed | " + " | ".join(f"{k + 1}/10" for k in range(NUM_BINS)) + " | final eval |"
    lines = [header, "|" + "---|" * (NUM_BINS + 3)]

    def row(version, seed, tenths, final_eval):
        return f"| {version} | {seed} | " + " | ".join(f"{x:.3f}" for x in [*tenths, final_eval]) + " |"

    for version in ("old", "new"):
        for seed in seeds:
            lines.append(row(version, seed, *results[version, seed]))
    for version in ("old", "new"):
        runs = [results[version, seed] for seed in seeds]
        lines.append(row(f"**{version}**", "mean", np.mean([r[0] for r in runs], axis=0),
                         np.mean([r[1] for r in runs])))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old-script", required=True, help="the old trainer (with the companion modules it imports beside it)")
    parser.add_argument("--new-script", default=str(NEW_SCRIPT), help="default: this repo's ppo_continuous.py")
    parser.add_argument("--env-id", default="Pendulum-v1")
    parser.add_argument("--total-timesteps", type=int, default=200000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--parallel", type=int, default=2, help="trainings at a time")
    parser.add_argument("--workdir", help="where the runs go (default: a new temp dir)")
    parser.add_argument("--old-args", default="",
                        help="arguments for the old trainer only, as one string: --old-args=--no-compile")
    parser.add_argument("--new-args", default="", help="arguments for the new trainer only, as one string")
    parser.add_argument("--extra-args", nargs=argparse.REMAINDER, default=[],
                        help="passed to both trainers; must come last")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="learning_curves_")).resolve()
    print(f"runs in {workdir}", file=sys.stderr)
    scripts = {"old": Path(args.old_script).resolve(), "new": Path(args.new_script).resolve()}
    own_args = {"old": shlex.split(args.old_args), "new": shlex.split(args.new_args)}
    jobs = [(version, seed) for seed in args.seeds for version in ("old", "new")]
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = {(version, seed): pool.submit(
            train, scripts[version], workdir / f"{args.env_id.replace(':', '_')}-{version}-seed{seed}",
            args.env_id, seed, args.total_timesteps, args.extra_args + own_args[version])
            for version, seed in jobs}
        results = {job: summarise(future.result()) for job, future in futures.items()}

    print(f"\n{args.env_id}, {args.total_timesteps} steps, seeds {' '.join(map(str, args.seeds))}: "
          f"mean `{CURVE_TAG}` per tenth of training, final `{EVAL_TAG}`\n")
    print(table(results, args.seeds))


if __name__ == "__main__":
    main()
