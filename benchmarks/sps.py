"""How close training runs to the environment's own speed: env-only, rollout, update and end-to-end SPS.

    python benchmarks/sps.py                       # the README's table: HalfCheetah-v4 and Pendulum-v1 presets
    python benchmarks/sps.py --env-id Hopper-v4 --num-envs 8 --num-steps 256 --iterations 4
    python benchmarks/sps.py --memory-steps 200000 # resident memory at 10% and 100% of a 200k-step run
    python benchmarks/sps.py --env-id queueing:QueueNetwork-v0 --num-envs 64 --num-steps 256 --num-minibatches 16 \
        --modes compile --env-kwargs '{"instance": "criss-cross-bh", "allocation": "priority"}' \
        '{"instance": "reentrant-7", "allocation": "priority"}'   # queueing: 3 classes against 21
    python benchmarks/sps.py --baseline-script /tmp/old/ppo_continuous.py  # also time another version

Each configuration is timed with the eager update and with --compile. Training SPS is the steps over the time
of the rollouts and learning phases: after compilation, without the evaluations (their cost is measured in the
README's Evaluation protocol section). The compilation time is shown separately and charged in the last
column, the fraction of env-only speed of a 10^6-step run. --baseline-script takes another version with the
same library API (`Args`, `train(args)` returning its timing).

Everything is measured in one process, one configuration after the other, so the ratios are comparable on a
noisy machine even when the absolute figures are not. Env-only SPS steps the same vector env with the same
wrappers as training, with uniformly random actions (standard normal ones where the action space is unbounded,
as the queueing priority scores are). --env-kwargs takes one or more JSON kwargs, each a configuration of its own.

--peer COMMAND times another trainer's command line against ours (`python ppo_continuous.py`, its defaults,
evaluations and registry included), both as subprocesses with wall time taken from outside, the same options
appended to both (--env-id --total-timesteps --num-envs --num-steps --num-minibatches --update-epochs --seed:
CleanRL's names). Each trainer runs T1 and T2 steps (--peer-timesteps, default 1 and 20 rollouts), alternated,
--repeats times; marginal SPS = (T2 - T1) / (wall2 - wall1) is the steady-state speed and wall1 - T1 / marginal
the fixed cost of a run (start-up and end). CleanRL's `ppo_continuous_action.py` targets gymnasium 0.29, this
project 1.x, so it gets its own virtual environment (the PyPI package, 1.2.0, declares Python < 3.11: installed
without its pinned dependencies, plus the ones the script imports; torch from the local CPU wheel):

    python -m venv /work/cleanrl-venv
    V=/work/cleanrl-venv/bin; S=/work/cleanrl-venv/lib/python3.11/site-packages/cleanrl/ppo_continuous_action.py
    $V/pip install --find-links /opt/wheels torch==2.13.0 "gymnasium[mujoco]==0.29.1" "mujoco<3.2" "numpy<2" tyro \\
        tensorboard
    $V/pip install --no-deps --ignore-requires-python cleanrl==1.2.0
    python benchmarks/sps.py --env-id HalfCheetah-v4 --peer "env OMP_NUM_THREADS=1 $V/python $S"

CleanRL gives torch every core by default; on a loaded machine its 2 threads made it 20x slower (38 against
756 steps/s by its own count), hence OMP_NUM_THREADS=1 (our trainer's default is 1 thread too); drop it on a
quiet machine to time CleanRL as shipped.
"""

import argparse
import contextlib
import importlib.util
import io
import itertools
import math
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from statistics import median

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import ppo_continuous  # noqa: E402
from ppo_support import check_env  # noqa: E402

COMPANIONS = ("ppo_support", "checkpoint_saver")
PRESETS = [  # (env id, num_envs, num_steps): CleanRL's defaults, then the vectorised configuration
    ("HalfCheetah-v4", 1, 2048),
    ("HalfCheetah-v4", 8, 256),
    ("Pendulum-v1", 1, 2048),
    ("Pendulum-v1", 8, 256),
]


def load_trainer(script):
    """Another version of the trainer, with the companion modules of its own folder (not this checkout's)."""
    spec = importlib.util.spec_from_file_location(f"trainer_{abs(hash(script))}", script)
    module = importlib.util.module_from_spec(spec)
    ours = {name: sys.modules.pop(name) for name in COMPANIONS if name in sys.modules}
    sys.path.insert(0, str(Path(script).resolve().parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
        for name in COMPANIONS:
            sys.modules.pop(name, None)
        sys.modules.update(ours)
    return module


# Each mode forced, whatever the run's length (the trainer compiles by default only runs of --compile-min-steps).
MODES = {"eager": dict(compile=False), "compile": dict(compile=True, compile_min_steps=0)}


def trainer_args(trainer, env_id, num_envs, num_steps, iterations, workdir, **options):
    """A run of `iterations` rollouts whose evaluations are as cheap as the protocol allows (2 short episodes);
    training SPS leaves them out anyway (their cost: README, Evaluation protocol)."""
    return trainer.Args(env_id=env_id, num_envs=num_envs, num_steps=num_steps,
                        total_timesteps=iterations * num_envs * num_steps, eval_episodes=2, eval_horizon=10,
                        checkpoint_dir=str(Path(workdir) / "checkpoints"), **options)


def env_only_sps(env_id, num_envs, num_steps, iterations, workdir, **options):
    args, env_kwargs = ppo_continuous.resolved_args(trainer_args(ppo_continuous, env_id, num_envs, num_steps,
                                                                 iterations, workdir, **options))
    envs = ppo_continuous.make_training_envs(args, env_kwargs, check_env(env_id, env_kwargs))[0]
    low, high = envs.single_action_space.low, envs.single_action_space.high
    rng = np.random.default_rng(0)
    envs.reset(seed=0)
    steps = iterations * num_envs * num_steps
    start = time.perf_counter()
    bounded = np.isfinite(low) & np.isfinite(high)  # unbounded dimensions (priority scores): standard normal
    for _ in range(steps // num_envs):
        actions = rng.standard_normal((num_envs, len(low)))
        actions[:, bounded] = rng.uniform(low[bounded], high[bounded], size=(num_envs, int(bounded.sum())))
        envs.step(actions.astype(np.float32))
    elapsed = time.perf_counter() - start
    envs.close()
    return steps / elapsed


def training_sps(trainer, env_id, num_envs, num_steps, iterations, workdir, **options):
    """Training SPS: the steps over the time of rollouts and learning phases (evaluations left out)."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        timing = trainer.train(trainer_args(trainer, env_id, num_envs, num_steps, iterations, workdir,
                                            **options))["timing"]
    steps = iterations * num_envs * num_steps
    compiled = re.search(r"compiled the minibatch update in ([0-9.]+) s", output.getvalue())
    return {
        "end_to_end": steps / (timing["rollout_seconds"] + timing["update_seconds"]),
        "rollout": steps / timing["rollout_seconds"],
        "update_seconds": timing["update_seconds"] / iterations,
        "compile_seconds": float(compiled.group(1)) if compiled else 0.0,
    }


def rss_mb():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_check(env_id, steps, workdir, mode):
    """Resident memory sampled through a run: at 10% and at 100% of its wall time."""
    samples, done = [], threading.Event()

    def sample():
        while not done.wait(0.2):
            samples.append((time.perf_counter(), rss_mb()))

    num_steps = 2048
    args = trainer_args(ppo_continuous, env_id, 1, num_steps, steps // num_steps, workdir, **MODES[mode])
    sampler = threading.Thread(target=sample)
    start = time.perf_counter()
    sampler.start()
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        ppo_continuous.train(args)
    done.set()
    sampler.join()
    compiled = re.search(r"compiled the minibatch update in ([0-9.]+) s", output.getvalue())
    train_start = start + (float(compiled.group(1)) if compiled else 0.0)  # 10% of the training, after compiling
    training_seconds = time.perf_counter() - train_start
    at_10 = next(mb for t, mb in samples if t - train_start >= 0.1 * training_seconds)
    print(f"memory, {env_id}, {mode}, {steps} steps: RSS at 10% {at_10:.0f} MiB, at 100% {samples[-1][1]:.0f} MiB, "
          f"growth {samples[-1][1] - at_10:+.1f} MiB; peak {peak_rss_mb():.0f} MiB")


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# The settings both trainers get, under CleanRL's option names (argparse in its PyPI package, tyro on GitHub:
# the same names); ours are the same. W&B tracking and video capture are off by default in both, so no flag.
PEER_OPTIONS = {"env_id": "--env-id", "total_timesteps": "--total-timesteps", "num_envs": "--num-envs",
                "num_steps": "--num-steps", "num_minibatches": "--num-minibatches", "update_epochs": "--update-epochs",
                "seed": "--seed"}
OUR_COMMAND = [sys.executable, str(REPO / "ppo_continuous.py")]
# --ours-options that leave only the final one-episode evaluation, as CleanRL (which does not evaluate) would.
NO_EVALUATION = "--eval-every 1000000000 --eval-nominated 0 --eval-episodes 1"


class PeerError(Exception):
    pass


def command_line(prefix, **settings):
    return [*prefix, *(item for name, value in settings.items() for item in (PEER_OPTIONS[name], str(value)))]


def wall_seconds(command):
    """Wall time of a whole process, in a fresh folder (its runs/ and registry start empty, as on a new machine)."""
    with tempfile.TemporaryDirectory(prefix="sps-peer-") as folder:
        start = time.perf_counter()
        try:
            completed = subprocess.run(command, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       text=True)
        except OSError as error:
            raise PeerError(f"cannot run {shlex.join(command)}: {error.strerror}") from None
        elapsed = time.perf_counter() - start
    if completed.returncode != 0:
        lines = [line.strip(" │╭╮╰╯─") for line in completed.stderr.splitlines()]  # (tyro draws boxes)
        last = [line for line in lines if any(char.isalnum() for char in line)][-1:] or ["no message"]
        raise PeerError(f"{shlex.join(command)} failed with exit status {completed.returncode}: {last[0]}")
    return elapsed


def marginal_and_fixed(short_steps, short_wall, long_steps, long_wall):
    """Steady-state SPS from two run lengths, and the fixed cost of a run (start-up and end) it leaves over."""
    marginal = (long_steps - short_steps) / (long_wall - short_wall)
    return marginal, short_wall - short_steps / marginal


def peer_comparison(peer, configs, lengths, repeats, ours=OUR_COMMAND):
    trainers = {"ours": ours, "peer": peer}
    print(f"ours: {shlex.join(ours)}\npeer: {shlex.join(peer)}\nruns of {lengths[0]} and {lengths[1]} "
          f"steps, the two trainers in turn (which goes first alternates), {repeats} repeats; medians (min-max over "
          f"repeats); fixed s = wall at {lengths[0]} steps minus those steps at the marginal speed")
    print("| env | envs x steps | trainer | wall s, short | wall s, long | marginal SPS | fixed s |")
    print("|---|---|---|---|---|---|---|")
    for env_id, num_envs, num_steps in configs:
        walls = {name: {length: [] for length in lengths} for name in trainers}
        for repeat in range(repeats):
            order = list(trainers) if repeat % 2 == 0 else list(reversed(trainers))
            for length in lengths:
                for name in order:
                    walls[name][length].append(wall_seconds(command_line(
                        trainers[name], env_id=env_id, total_timesteps=length, num_envs=num_envs, num_steps=num_steps,
                        num_minibatches=32, update_epochs=10, seed=1)))
        results = {name: [marginal_and_fixed(lengths[0], short, lengths[1], long)
                          for short, long in zip(walls[name][lengths[0]], walls[name][lengths[1]])]
                   for name in trainers}
        for name in trainers:
            print(f"| {env_id} | {num_envs} x {num_steps} | {name} | {spread(walls[name][lengths[0]], '.1f')} | "
                  f"{spread(walls[name][lengths[1]], '.1f')} | {spread([m for m, _ in results[name]], '.0f')} | "
                  f"{spread([f for _, f in results[name]], '.1f')} |")
        marginal_ratios = [ours[0] / theirs[0] for ours, theirs in zip(results["ours"], results["peer"])]
        whole_ratios = [theirs / ours for ours, theirs in zip(walls["ours"][lengths[1]], walls["peer"][lengths[1]])]
        print(f"{env_id}, {num_envs} x {num_steps}: speed ours / peer, marginal {spread(marginal_ratios, '.2f')}x, "
              f"of a whole {lengths[1]}-step process {spread(whole_ratios, '.2f')}x", flush=True)


def spread(values, spec):
    return f"{median(values):{spec}} ({min(values):{spec}}-{max(values):{spec}})"


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-id")
    parser.add_argument("--num-envs", type=int, default=1)
    parser.add_argument("--num-steps", type=int, default=2048)
    parser.add_argument("--num-minibatches", type=int, default=32, help="minibatches per epoch of the update")
    parser.add_argument("--env-kwargs", nargs="+", default=["{}"],
                        help="JSON env kwargs; each one given is a configuration of its own (with --env-id)")
    parser.add_argument("--iterations", type=int, default=3, help="rollouts per measurement")
    parser.add_argument("--num-threads", type=int, default=1, help="torch threads of our trainer (its --num-threads)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per figure (the median is shown)")
    parser.add_argument("--modes", default="eager,compile", help="update modes to time: eager, compile (--compile)")
    parser.add_argument("--baseline-script", help="another ppo_continuous.py to time in the same run")
    parser.add_argument("--memory-steps", type=int, help="only run the memory check, with this many steps")
    parser.add_argument("--peer", help="only time this trainer's command line against ours (options appended)")
    parser.add_argument("--peer-timesteps", help="T1,T2: the two run lengths of --peer (default: 1 and 20 rollouts)")
    parser.add_argument("--ours-options", default="",
                        help=f"options for our command line only, in --peer; \"{NO_EVALUATION}\" leaves only a "
                             "final one-episode evaluation (CleanRL does not evaluate)")
    options = parser.parse_args()
    if not set(options.modes.split(",")) <= {"eager", "compile"}:
        parser.error(f"--modes takes eager, compile or both (comma-separated), got {options.modes}")
    configs = [(options.env_id, options.num_envs, options.num_steps)] if options.env_id else PRESETS
    if options.peer is not None:
        if options.env_kwargs != ["{}"] or options.num_minibatches != 32:
            fail("--env-kwargs and --num-minibatches are for the speed table; --peer runs both trainers with "
                 "CleanRL's settings (32 minibatches, no env kwargs): leave them out")
        peer = shlex.split(options.peer)
        if not peer or shutil.which(peer[0]) is None:
            fail(f"--peer: no command {peer[0] if peer else options.peer!r}; give a command line such as "
                 f"\"/work/cleanrl-venv/bin/python /path/to/ppo_continuous_action.py\"")
        rollout = math.lcm(*(num_envs * num_steps for _, num_envs, num_steps in configs))
        try:
            lengths = ([int(value) for value in options.peer_timesteps.split(",")] if options.peer_timesteps
                       else [rollout, 20 * rollout])
        except ValueError:
            lengths = []
        if len(lengths) != 2 or not 0 < lengths[0] < lengths[1] or lengths[0] % rollout or lengths[1] % rollout:
            fail(f"--peer-timesteps takes T1,T2 with 0 < T1 < T2, both multiples of the rollout ({rollout} steps), "
                 f"got {options.peer_timesteps}")
        try:
            peer_comparison(peer, configs, lengths, options.repeats, OUR_COMMAND + shlex.split(options.ours_options))
        except PeerError as error:
            fail(str(error))
        return
    workdir = tempfile.mkdtemp(prefix="sps-")
    os.chdir(workdir)  # runs/ of the timed runs go to a temporary folder
    if options.memory_steps:
        modes = options.modes.split(",")
        if len(modes) == 1:
            memory_check(options.env_id or "HalfCheetah-v4", options.memory_steps, workdir, modes[0])
        else:  # one process per mode, so that each peak is its own
            for mode in modes:
                subprocess.run([sys.executable, str(REPO / "benchmarks" / "sps.py"), *sys.argv[1:], "--modes", mode],
                               check=True)
        return
    baseline = load_trainer(options.baseline_script) if options.baseline_script else None
    print(f"{os.cpu_count()} CPUs, torch threads {options.num_threads}, {options.iterations} rollouts per measurement, "
          f"medians of {options.repeats}; update: 10 epochs x {options.num_minibatches} minibatches")
    header = ("| env | envs x steps | update | env-only SPS | rollout SPS | update s/rollout | train SPS "
              "| train / env-only | compile s (max) | 1M-step run / env-only |")
    if baseline:
        header += " baseline train SPS | speed-up |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    modes = options.modes.split(",")
    for (env_id, num_envs, num_steps), env_kwargs in itertools.product(configs, options.env_kwargs):
        settings = {"env_kwargs": env_kwargs, "num_minibatches": options.num_minibatches,
                    "num_threads": options.num_threads}
        # Env-only and training alternate, --repeats times; each ratio pairs measurements taken side by side.
        env_runs, our_runs, their_runs = [], {mode: [] for mode in modes}, []
        for _ in range(options.repeats):
            env_runs.append(env_only_sps(env_id, num_envs, num_steps, options.iterations, workdir, **settings))
            if baseline:
                their_runs.append(training_sps(baseline, env_id, num_envs, num_steps, options.iterations, workdir,
                                               **settings))
            for mode in modes:
                torch.compiler.reset()  # compile anew (inductor's on-disk cache still applies), as a new run does
                our_runs[mode].append(training_sps(ppo_continuous, env_id, num_envs, num_steps, options.iterations,
                                                   workdir, **MODES[mode], **settings))
        name = env_id if env_kwargs == "{}" else f"{env_id} {env_kwargs}"
        for mode in modes:
            runs = our_runs[mode]
            compile_seconds = max(run["compile_seconds"] for run in runs)
            # A 10^6-step run pays the compilation once: its speed with that cost included.
            long_run = [1e6 / (1e6 / run["end_to_end"] + compile_seconds) / env for run, env in zip(runs, env_runs)]
            row = (f"| {name} | {num_envs} x {num_steps} | {mode} | {median(env_runs):.0f} | "
                   f"{median(run['rollout'] for run in runs):.0f} | "
                   f"{median(run['update_seconds'] for run in runs):.3f} | "
                   f"{median(run['end_to_end'] for run in runs):.0f} | "
                   f"{median(run['end_to_end'] / env for run, env in zip(runs, env_runs)):.0%} | "
                   f"{compile_seconds:.1f} | {median(long_run):.0%} |")
            if baseline:
                speed_ups = [ours["end_to_end"] / theirs["end_to_end"] for ours, theirs in zip(runs, their_runs)]
                row += f" {median(run['end_to_end'] for run in their_runs):.0f} | {median(speed_ups):.2f}x |"
            print(row, flush=True)
    print(f"peak RSS {peak_rss_mb():.0f} MiB")


if __name__ == "__main__":
    main()
