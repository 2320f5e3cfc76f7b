"""Is the score a run records for its best checkpoint what that checkpoint really achieves?

    python benchmarks/score_honesty.py                                  # the README's table (about 20 min on 2 cores)
    python benchmarks/score_honesty.py --old-script OLD/ppo_continuous.py   # the same for another version

For each case it trains through the CLI, reads the score recorded in the run's `best.pt` and its cost
(`perf/eval_seconds` against the run's wall time), then evaluates that same file independently under a much
longer protocol with other seeds: many more episodes (episodic tasks), or more copies and a longer horizon after
a longer warm-up (continuing tasks). The recorded score is honest when the independent one falls inside its CI.
Versions before the evaluation protocol recorded a single training measurement and no CI.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import queueing  # noqa: E402,F401  (registers QueueNetwork-v0)
from ppo_continuous import agent_from_checkpoint  # noqa: E402
from ppo_support import (check_env, deterministic_numpy_policy, evaluate, observation_stats,  # noqa: E402
                         read_checkpoint)

CASES = {
    "Pendulum-v1": {"train": ["--env-id", "Pendulum-v1", "--total-timesteps", "100000"],
                    "independent": {"kind": "episodic", "episodes": 200, "horizon": 200, "warmup": 0, "seed": 777}},
    "criss-cross": {"train": ["--env-id", "queueing:QueueNetwork-v0", "--env-kwargs", '{"instance": "criss-cross"}',
                              "--num-envs", "8", "--num-steps", "256", "--reset-steps", "5000",
                              "--total-timesteps", "500000"],
                    "independent": {"kind": "continuing", "episodes": 128, "horizon": 100000, "warmup": 10000,
                                    "seed": 777}},
}


def tensorboard_scalar(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [event.value for event in accumulator.Scalars(tag)] if tag in accumulator.Tags()["scalars"] else []


def run_case(name, script, seed, workdir):
    case = CASES[name]
    start = time.time()
    result = subprocess.run([sys.executable, script, *case["train"], "--seed", str(seed)], cwd=workdir,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.time() - start
    if result.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed:\n{result.stderr[-2000:]}")
    (best,) = Path(workdir).glob("runs/*/best.pt")
    checkpoint = read_checkpoint(best)
    env_kwargs = json.loads(checkpoint["args"]["env_kwargs"])
    env_id = checkpoint["args"]["env_id"]
    policy = deterministic_numpy_policy(agent_from_checkpoint(checkpoint, best), observation_stats(checkpoint),
                                        checkpoint["args"]["clip_obs"])
    with torch.inference_mode():
        independent = evaluate(policy, env_id, env_kwargs, case["independent"],
                               check_env(env_id, env_kwargs)["native_vector"])
    eval_seconds = tensorboard_scalar(best.parent, "perf/eval_seconds")
    return {"case": name, "seed": seed, "recorded": checkpoint["score"], "recorded_ci": checkpoint.get("half_width"),
            "independent": independent["mean"], "independent_ci": independent["half_width"], "wall": wall,
            "eval_seconds": eval_seconds[-1] if eval_seconds else 0.0, "file": str(best)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--old-script", default=None, help="also run this version of ppo_continuous.py")
    args = parser.parse_args()
    scripts = {"new": str(REPO / "ppo_continuous.py")}
    if args.old_script:
        scripts["old"] = str(Path(args.old_script).resolve())
    print("| version | case | seed | recorded score of best.pt | independent evaluation (95% CI) | "
          "inside recorded CI | eval time / wall time |")
    print("|---|---|---|---|---|---|---|")
    for version, script in scripts.items():
        for name in args.cases:
            for seed in args.seeds:
                with tempfile.TemporaryDirectory() as workdir:
                    row = run_case(name, script, seed, workdir)
                ci = row["recorded_ci"]
                inside = "n/a (no CI)" if ci is None else (
                    "yes" if abs(row["independent"] - row["recorded"]) <= ci else "no")
                recorded = f"{row['recorded']:.4g}" + ("" if ci is None else f" +- {ci:.3g}")
                print(f"| {version} | {name} | {seed} | {recorded} | {row['independent']:.4g} +- "
                      f"{row['independent_ci']:.3g} | {inside} | {row['eval_seconds']:.0f} s / {row['wall']:.0f} s "
                      f"({100 * row['eval_seconds'] / row['wall']:.0f}%) |", flush=True)


if __name__ == "__main__":
    main()
