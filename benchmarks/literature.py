"""The field's benchmark tables: Dai & Gluzman's criss-cross regimes and extended re-entrant lines, ours beside theirs.

    python benchmarks/literature.py                                   # what is missing, then the table and the plot
    python benchmarks/literature.py --report                          # the table and the plot from stored results
    python benchmarks/literature.py --parts optima classical          # no training
    python benchmarks/literature.py --instance reentrant-2 --seeds 11 12   # just these PPO runs, printed

Instances (queueing/families.py): criss-cross-{il,bl,im,bm,ih,bh} and reentrant-{2..7} (6..21 classes).
What it computes, and how:
- criss-cross optima: `queueing.exact` (relative value iteration), the truncation raised until the value changes by
  less than 0.05% from one level to the next; every level is recorded.
- greedy check (IH, BH): the optimal policy of the truncation before the converged one, simulated on the untruncated
  network (`queueing.longrun`, 95% CI within 0.5%): what an optimal policy costs with nothing blocked.
- the classical rules (c-mu, MaxWeight, LBFS = highest class index first as in D&G, FBFS) and the best static priority
  a coordinate search finds (`queueing.baselines.best_static_priority`): on criss-cross exactly, on the same truncated
  chains as the optimum; on the re-entrant lines by `queueing.eventsim` (1,000 independent replications from empty, first
  half of each discarded, horizon doubled until the 95% CI is within 1% of the value).
- PPO: trains each (instance, seed) through the trainer's CLI with the `recommended` settings of its instance (on the
  re-entrant lines starting from the best static priority, `warm_start`), then scores the run's best.pt like the
  classical rules (exact gap on criss-cross; long-run cost on the re-entrant lines).
An interrupted call resumes: a training that ran to its end is scored, not run again (`--no-training` scores just
those). Results are kept in benchmarks/results/literature.json (run folders under --workdir, default runs/literature/), so
a second call only computes what is missing; the report is benchmarks/results/literature.md and literature.png.
"""

import argparse
import dataclasses
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import time
from statistics import median
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from filelock import FileLock, Timeout  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from queueing import exact  # noqa: E402
from queueing.baselines import best_static_priority, make_policy, priority_policy, server_orders  # noqa: E402
from queueing.env import Network  # noqa: E402
from queueing.families import CRISS_CROSS_REGIMES, REENTRANT_STATIONS  # noqa: E402
from queueing.eventsim import event_long_run, index_rule  # noqa: E402
from queueing.longrun import long_run  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
STORE = RESULTS / "literature.json"
CRISS_CROSS = [f"criss-cross-{regime}" for regime in CRISS_CROSS_REGIMES]
REENTRANT = [f"reentrant-{stations}" for stations in REENTRANT_STATIONS]
EXACT_TOLERANCE = 0.0005
GREEDY_CHECKED = ["criss-cross-ih", "criss-cross-bh"]  # where truncation matters (light and moderate: levels 40/50)
LONG_RUN_PRECISION = 0.01
# Independent copies of a long-run evaluation (queueing.eventsim): the compiled static-priority path and the
# per-event policy call both cost less per copy with more copies in one call; each copy still discards half its
# horizon (at least 10,000 slots), and the stationarity check flags a warm-up that was too short.
LONG_RUN_COPIES = 1000
STATIC_SEARCH_HORIZON = 200_000  # slots per copy for each candidate of the static priority search
CLASSICAL = ["cmu", "maxweight", "lbfs", "fbfs"]
DG = "Dai & Gluzman (Stochastic Systems 2022, arXiv 2008.01644)"
# Published values (cost per unit time). D&G criss-cross "DP" and PPO; D&G extended re-entrant PPO (95% CI), best
# robust fluid policy (RFP) and LBFS; QGym's work-conserving PPO (100 runs from empty, no warm-up: reads low).
PUBLISHED = {
    "criss-cross-il": {"dp": 0.671, "ppo": 0.671, "ppo_hw": 0.001},
    "criss-cross-bl": {"dp": 0.843, "ppo": 0.844, "ppo_hw": 0.004},
    "criss-cross-im": {"dp": 2.084, "ppo": 2.084, "ppo_hw": 0.011},
    "criss-cross-bm": {"dp": 2.829, "ppo": 2.833, "ppo_hw": 0.010},
    "criss-cross-ih": {"dp": 9.970, "ppo": 10.014, "ppo_hw": 0.055},
    "criss-cross-bh": {"dp": 15.228, "ppo": 15.353, "ppo_hw": 0.138, "qgym_ppo": 15.4},
    "reentrant-2": {"ppo": 14.130, "ppo_hw": 0.208, "rfp": 15.286, "lbfs": 15.749, "qgym_ppo": 13.6},
    "reentrant-3": {"ppo": 23.269, "ppo_hw": 0.251, "rfp": 24.917, "lbfs": 25.257, "qgym_ppo": 22.6},
    "reentrant-4": {"ppo": 32.171, "ppo_hw": 0.556, "rfp": 36.857, "lbfs": 34.660, "qgym_ppo": 29.7},
    "reentrant-5": {"ppo": 39.300, "ppo_hw": 0.612, "rfp": 43.628, "lbfs": 45.110, "qgym_ppo": 38.7},
    "reentrant-6": {"ppo": 51.472, "ppo_hw": 0.973, "rfp": 52.980, "lbfs": 55.724},
    "reentrant-7": {"ppo": 55.124, "ppo_hw": 1.807, "rfp": 59.051, "lbfs": 65.980},
}
# The trainer's settings per family (README, "The literature's networks"); the env uses the priority rule.
RECOMMENDED = {
    "criss-cross": ["--num-envs", "64", "--num-steps", "256", "--num-minibatches", "16", "--reset-steps", "5000",
                    "--average-reward", "--total-timesteps", "20000000"],
    "reentrant": ["--num-envs", "64", "--num-steps", "256", "--num-minibatches", "16", "--reset-steps", "100000",
                  "--average-reward", "--total-timesteps", "20000000",
                  "--eval-episodes", "64", "--eval-warmup", "20000", "--eval-horizon", "40000",
                  "--ent-coef", "0.01", "--expected-td"],
}
# The re-entrant lines (every station at load 0.9) take heavy traffic's two options too. Without them PPO stayed
# within about one CI of the static priority it starts from on every L; with them the median over seeds of best.pt's
# long-run cost went from 22.968 to 21.791 on 9 classes (cheapest static priority 22.995), 32.007 to 31.267 on 12
# (31.845), 40.342 to 39.868 on 15 (40.000) and 50.442 to 47.746 on 18 (49.981); 6 classes stayed (14.031, 14.009:
# one seed of three learned a state-dependent rule) and 21 got worse (56.652, 58.199: seed 2's training left the
# static priority for worse policies within 4M steps). With LARGE_LINE_OPTIONS below, 15 classes 39.325, 18 48.877
# and 21 56.314 (the static priority's equal). Details: literature_findings.md.
# Training episodes must be long against the time a network takes to forget its empty start, or PPO learns the
# transient: at load 0.9 (criss-cross IH and BH, every station of the re-entrant lines) 5,000 slots are mostly
# transient. Measured on criss-cross IH, seed 1, exact cost of final.pt: +5.08% over the optimum with
# --reset-steps 5000, +0.61% with 100,000 (best.pt +2.79% and +1.52%). Half the envs, so twice the updates per
# step, learned faster there: exact gap of best.pt at 20M steps, 64 envs against 32: IH +1.52% and +0.96% (seeds 1,
# 2) against +0.56% (seed 1); BH +10.98% (seed 1) against +1.71% and +0.83% (seeds 1, 2). On three seeds the
# 32-env runs still stalled at times near the best static priority's value (IH +0.56, +3.13, +1.43%; BH +1.25, +0.83,
# +6.91%) as the action noise collapsed; an entropy bonus of 0.01 keeps it exploring: IH +0.21, +0.40, +0.27%, BH
# +1.31, +0.87, +0.57% on seeds 1-3. Not better on BH: 16 envs, 40M steps, a bonus of 0.001 (literature_findings.md).
# What did help: --expected-td (TD errors from the expected next value over the env's known transitions), exact gap
# of best.pt on seeds 1-3: BH +0.18, +0.14, +0.18% (median +0.18%, was +0.87%), IH +0.23, +0.08, +0.19%.
HEAVY_TRAFFIC = {"criss-cross-ih", "criss-cross-bh"}
HEAVY_TRAFFIC_OPTIONS = {"--reset-steps": "100000", "--num-envs": "32", "--ent-coef": "0.01"}
HEAVY_TRAFFIC_FLAGS = ["--expected-td"]


# The large lines take longer to forget their empty start. Under c-mu (256 copies from empty, mean cost per window
# of slots) 6 classes settle within about 20,000 slots, 15 classes within 60,000 and 21 within 60,000-100,000: with
# 100,000-slot episodes half of the training data of 15-21 classes is transient, and the evaluation's 20,000 slots of
# warm-up score the transient (21 classes: 25.5 in the first 10,000 slots, 56.4 stationary). So on 15-21 classes no
# episode ends within the run and the evaluation discards 100,000 slots. Measured on 21 classes, seeds 1 and 2: median
# long-run cost of best.pt 58.20 with the family's settings, 56.31 with these (literature_findings.md). A smaller actor
# step on top (--actor-lr 1e-4, seeds 1 and 2) moved the medians by -0.52 (15), +0.77 (18) and +0.02 (21): not taken.
LARGE_LINES = {"reentrant-5", "reentrant-6", "reentrant-7"}
LARGE_LINE_OPTIONS = {"--reset-steps": "2000000", "--eval-warmup": "100000"}

# On 6 classes the actor waits while the critic learns the warm start's values (--actor-starts): 2M steps, 31,000
# slots per env, past the ~20,000 the line takes to settle from empty. Long-run cost of best.pt, seeds 1-5, against
# the same seeds without it: see literature_findings.md ("Holding the actor"). Tried on 15 classes (6.4M steps):
# 38.73 and 39.22 against 38.54 and 40.11 (median 38.97, bar 38.688); on 21 classes, seed 1, it drifted as before
# once the actor moved (training evaluations 53.06 to 6M steps, 67.7 at 12M). Not measured on 9, 12 and 18.
ACTOR_STARTS = {"reentrant-2": "2000000"}


# On the re-entrant lines PPO starts from the best static priority (`warm_start`): measured on 6 classes, seed 1,
# 20M steps, long-run cost of best.pt 14.34 from scratch, 13.95 +- 0.12 warm-started (best static 14.02 +- 0.12).
WARM_STARTED = set(REENTRANT)
WARM_START_LOG_STD = -1.0


def recommended(instance):
    """The trainer's options for `instance`: its family's (the re-entrant lines with an entropy bonus and expected
    TD errors), with long training episodes, more updates per step, the bonus and expected TD errors in
    criss-cross's heavy traffic, episodes that outlast the transient on the large re-entrant lines, and on 6
    classes an actor that waits for the critic."""
    options = list(RECOMMENDED[family(instance)])
    overrides, flags = {}, []
    if instance in HEAVY_TRAFFIC:
        overrides, flags = HEAVY_TRAFFIC_OPTIONS, HEAVY_TRAFFIC_FLAGS
    if instance in LARGE_LINES:
        overrides = LARGE_LINE_OPTIONS
    for option, value in overrides.items():
        if option in options:
            options[options.index(option) + 1] = value
        else:
            options += [option, value]
    if instance in ACTOR_STARTS:
        flags = flags + ["--actor-starts", ACTOR_STARTS[instance]]
    return options + flags


def default_seeds(instance):
    return [1, 2] if instance in REENTRANT[3:] else [1, 2, 3]


def missing_runs(instances, store, workdir, no_training=False):
    """The (instance, seed) PPO runs not yet stored, first seeds of every instance before further ones, so a call
    cut short still fills every row; with `no_training`, only those whose run already ran to its end."""
    missing = [(instance, seed) for instance in instances for seed in default_seeds(instance)
               if str(seed) not in store.get("ppo", {}).get(instance, {})
               and not (no_training and finished_run(Path(workdir) / instance / f"seed{seed}") is None)]
    return sorted(missing, key=lambda run: (default_seeds(run[0]).index(run[1]), instances.index(run[0])))


def family(instance):
    return "criss-cross" if instance.startswith("criss-cross") else "reentrant"


def load_store():
    return json.loads(STORE.read_text()) if STORE.is_file() else {}


def record(section, instance, value, seed=None):
    """Stores one result, merged under a lock into what other processes stored meanwhile; returns the whole store."""
    with FileLock(str(STORE) + ".lock"):
        store = load_store()
        entry = store.setdefault(section, {})
        if seed is None:
            entry[instance] = value
        else:
            entry.setdefault(instance, {})[str(seed)] = value
        temporary = STORE.with_suffix(".tmp")
        temporary.write_text(json.dumps(store, indent=1, sort_keys=True) + "\n")
        os.replace(temporary, STORE)
    return store


def optimum_levels(instance):
    """The criss-cross optimum at each truncation level until it changes by < EXACT_TOLERANCE: [[level, states, cost]]."""
    network, levels, level, warm_start = Network.from_instance(instance), [], exact.DEFAULT_START_TRUNCATION, None
    while True:
        solution, warm_start = exact.cached_optimum(network, level, warm_start)
        levels.append([level, solution.states, -solution.lta_return])
        if len(levels) >= 2 and abs(levels[-1][2] - levels[-2][2]) < EXACT_TOLERANCE * levels[-1][2]:
            return levels
        level = exact.next_level(level)


GREEDY_CHECK_PRECISION = 0.005


def greedy_check(instance, store):
    """The optimal policy of a truncation (the level before the converged one), simulated on the untruncated network
    by `long_run` to a 0.5% CI: what the optimum's policy costs when nothing blocks arrivals. Where a published
    "optimum" is the simulated greedy policy of a smaller truncation, this tells whether a better policy exists."""
    level = store["optima"][instance][-2][0]
    network = Network.from_instance(instance)
    result = long_run(network, exact.greedy_policy(network, level), seed=0, precision=GREEDY_CHECK_PRECISION)
    return {"level": level, "truncated_cost": store["optima"][instance][-2][2], "cost": -result.lta_return,
            "half_width": result.half_width, "copies": result.copies, "horizon": result.horizon,
            "stationary": result.stationary, "how": "long-run"}


def score_policy(instance, policy, network=None, start_level=exact.DEFAULT_START_TRUNCATION):
    """{cost, half_width, how}: exact (same truncated chain as the optimum) on criss-cross, long-run elsewhere
    (`queueing.eventsim`, event by event). `policy`: a function of the observations, a static priority order (a
    list of buffers, highest first) or an index rule (a tuple, `queueing.eventsim.index_rule`): those two run compiled.

    `start_level`: the first truncation tried on criss-cross; the level before the optimum's converged one saves
    the coarse levels (the policy must still settle from there).
    """
    network = network or Network.from_instance(instance)
    if family(instance) == "criss-cross":
        gap = exact.gap_until_converged(network, start_level, policy, EXACT_TOLERANCE)
        return {"cost": -gap.policy.lta_return, "gap": gap.gap, "truncation": gap.policy.level,
                "truncation_uncertainty": gap.truncation_uncertainty, "how": "exact"}
    kind = {list: "order", tuple: "index"}.get(type(policy), "policy")
    result = event_long_run(network, seed=0, copies=LONG_RUN_COPIES, precision=LONG_RUN_PRECISION, **{kind: policy})
    return {"cost": -result.lta_return, "half_width": result.half_width, "copies": result.copies,
            "horizon": result.horizon, "stationary": result.stationary, "how": "long-run"}


def start_level(store, instance):
    levels = store.get("optima", {}).get(instance)
    return levels[-2][0] if levels else exact.DEFAULT_START_TRUNCATION


def classical_rules(instance, store, log):
    network, rows, start = Network.from_instance(instance), {}, start_level(store, instance)
    for name in CLASSICAL:
        exact_chain = family(instance) == "criss-cross"
        policy = make_policy(name, network, exact=exact_chain)
        rows[name] = score_policy(instance, policy if exact_chain else index_rule(name, network) or policy, network, start)
        log(f"{instance} {name}: {rows[name]['cost']:.4f}")
    starts = [list(range(network.num_buffers))[::-1], list(range(network.num_buffers)),
              sorted(range(network.num_buffers), key=lambda k: -network.service_rates[k])]
    order, _ = best_static_priority(network, starts, horizon=STATIC_SEARCH_HORIZON,
                                    log=lambda text: log(f"{instance} static search: {text}"))
    rows["best_static"] = score_policy(instance, priority_policy(network, order) if family(instance) == "criss-cross"
                                       else order, network, start)
    rows["best_static"]["order"] = server_orders(order, network)
    log(f"{instance} best static priority {rows['best_static']['order']}: {rows['best_static']['cost']:.4f}")
    return rows


def finished_run(run_root):
    """best.pt and wall seconds of a training that already ran to its end in `run_root` (its log says so), or None:
    an interrupted `literature.py` resumes by scoring it instead of training it again."""
    log = run_root / "train.log"
    ended = re.search(r"^done: .*evaluations took [\d.]+ s of ([\d.]+) s$", log.read_text(), re.M) if log.is_file() else None
    bests = list(run_root.glob("runs/*/best.pt"))
    if ended is None or len(bests) != 1:
        return None
    return bests[0], float(ended.group(1))


def static_priority_scores(server_order, num_buffers):
    """Action scores that make the priority allocation follow `server_order` (per server, highest first): the
    highest buffer of a server gets the largest score, one apart from the next."""
    scores = [0.0] * num_buffers
    for order in server_order:
        for rank, buffer in enumerate(reversed(order)):
            scores[buffer] = float(rank)
    return scores


def last_value(command, option):
    """The value of `option` in a command line, where a later one overrides an earlier one as the trainer reads
    them (the --extra options come after the recommended ones)."""
    return command[len(command) - command[::-1].index(option)]


def warm_start(command, instance, seed, run_root, store):
    """A checkpoint to resume from whose policy starts as the best static priority: one rollout of training, then
    the bias of the actor's last layer set to that priority's scores (the layer's weights are small, so the mean
    action is about the bias everywhere) and the action log-std to WARM_START_LOG_STD. Returns its path."""
    folder = run_root / "warm-start"
    folder.mkdir()
    network = Network.from_instance(instance)
    one_rollout = int(last_value(command, "--num-envs")) * int(last_value(command, "--num-steps"))
    with open(folder / "train.log", "w") as log:
        result = subprocess.run([*command, "--total-timesteps", str(one_rollout)], cwd=folder, stdout=log,
                                stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"warm start of {instance} seed {seed} failed (log: {folder / 'train.log'})")
    checkpoint = torch.load(next(folder.glob("runs/*/final.pt")), map_location="cpu", weights_only=True)
    last_bias = max((key for key in checkpoint["agent"] if key.startswith("actor_mean.") and key.endswith(".bias")),
                    key=lambda key: int(key.split(".")[1]))
    scores = static_priority_scores(store["classical"][instance]["best_static"]["order"], network.num_buffers)
    checkpoint["agent"][last_bias] = torch.tensor(scores, dtype=checkpoint["agent"][last_bias].dtype)
    checkpoint["agent"]["actor_logstd"].fill_(WARM_START_LOG_STD)
    torch.save(checkpoint, folder / "warm_start.pt")
    return folder / "warm_start.pt"


def train(instance, seed, workdir, extra, store):
    """One PPO run through the CLI (unless it already ran to its end there); returns its best.pt and wall seconds.
    On the re-entrant lines it starts from the best static priority (`warm_start`)."""
    run_root = Path(workdir) / instance / f"seed{seed}"
    run_root.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(run_root) + ".lock", timeout=0):
            return train_locked(instance, seed, run_root, extra, store)
    except Timeout:
        raise RuntimeError(f"{run_root} is being trained by another process: wait for it, or use another --workdir")


def trainer_options(instance, seed, extra):
    """The trainer's command-line options for one run of the table (or of --seeds, with --extra)."""
    kwargs = json.dumps({"instance": instance, "allocation": "priority"})
    return ["--env-id", "queueing:QueueNetwork-v0", "--env-kwargs", kwargs, "--seed", str(seed), "--compile",
            "--num-threads", "1", *recommended(instance), *extra]


def train_locked(instance, seed, run_root, extra, store):
    options = trainer_options(instance, seed, extra)
    finished = finished_run(run_root)
    if finished is not None:
        differ = settings_mismatch(torch.load(finished[0], map_location="cpu", weights_only=True)["args"], options)
        if differ:
            raise RuntimeError(f"{run_root} holds a run trained with another {', '.join(differ)} than asked: "
                               "delete it to train again, or give another --workdir")
        return finished
    if instance in WARM_STARTED and "best_static" not in store.get("classical", {}).get(instance, {}):
        raise RuntimeError(f"no best static priority of {instance} stored to start from: run `python "
                           f"benchmarks/literature.py --parts classical --instance {instance}` first")
    if run_root.exists():  # an interrupted training: start it again from scratch
        shutil.rmtree(run_root)
    run_root.mkdir(parents=True)
    command = [sys.executable, str(REPO / "ppo_continuous.py"), *options]
    start = time.monotonic()
    if instance in WARM_STARTED:
        command += ["--resume", str(warm_start(command, instance, seed, run_root, store))]
    with open(run_root / "train.log", "w") as log:
        result = subprocess.run(command, cwd=run_root, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"training {instance} seed {seed} failed (log: {run_root / 'train.log'})")
    best = max(run_root.glob("runs/*/best.pt"), key=lambda path: path.stat().st_mtime)
    return best, time.monotonic() - start


def evaluated_curve(run_dir):
    """[[step, evaluated cost]] from the run's TensorBoard events (the trainer's short evaluation protocol)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    if "eval/LTA_return" not in accumulator.Tags()["scalars"]:
        return []
    return [[event.step, -event.value] for event in accumulator.Scalars("eval/LTA_return")]


# Options that say how a run was launched, not what it trained (the instance and the seed do count).
LAUNCH_ONLY = {"exp_name", "resume", "compile", "num_threads", "checkpoint_dir"}


def settings_mismatch(saved_args, options):
    """The trainer options on which a checkpoint's `saved_args` disagree with the command-line `options` (a reused
    run must have been trained as the table says: its instance and seed, the recommendation and --extra). An option
    the checkpoint does not know is newer than it: the run trained with that option's default."""
    from ppo_continuous import Args, cli_args

    def comparable(name, value):
        if name == "env_kwargs" and isinstance(value, str):
            return json.loads(value)
        return list(value) if isinstance(value, tuple) else value

    wanted, default = dataclasses.asdict(cli_args(list(options))), dataclasses.asdict(Args())
    return sorted(name for name, value in wanted.items() if name not in LAUNCH_ONLY
                  and comparable(name, value) != comparable(name, saved_args.get(name, default[name])))


def ppo_run(instance, seed, workdir, extra, store, log):
    from queueing.longrun import checkpoint_policy

    best, wall = train(instance, seed, workdir, extra, store)
    policy, network = checkpoint_policy(str(best))
    row = score_policy(instance, policy, network, start_level(store, instance))
    saved = torch.load(best, map_location="cpu", weights_only=True)
    warm = " (warm start: best static priority)" if instance in WARM_STARTED else ""
    row.update(checkpoint=str(best), best_step=int(saved["global_step"]), wall_seconds=round(wall),
               settings=" ".join(recommended(instance) + extra) + warm, curve=evaluated_curve(best.parent))
    log(f"{instance} seed {seed}: best.pt {best}: cost {row['cost']:.4f}" +
        (f" +- {row['half_width']:.4f}" if "half_width" in row else f" (exact, gap {row['gap']:+.3%})"))
    return row


def cost_text(row):
    if row is None:
        return "–"
    if row["how"] == "exact":
        return f"{row['cost']:.3f}"
    return f"{row['cost']:.3f} ± {row['half_width']:.3f}" + ("" if row.get("stationary", True) else " (drift)")


README = REPO / "README.md"
README_MARKERS = ("<!-- literature tables: written by benchmarks/literature.py -->", "<!-- end of literature tables -->")


def write_report(store):
    tables = result_tables(store)
    lines = [
        "# The literature's queueing benchmarks: published values and ours",
        "",
        "Written by `python benchmarks/literature.py`. Costs per unit time (holding cost 1 per job). Published: "
        f"{DG}; QGym (Chen et al., NeurIPS 2024 D&B) scores 100 runs started empty with no warm-up, which reads low.",
        "Ours: exact = relative value iteration on a truncated chain, truncation raised until the value moves by "
        f"< {EXACT_TOLERANCE:.2%}; a policy's exact cost is on the same truncated chains as the optimum (gap >= 0). "
        "Long-run = 1,000 independent replications started empty, simulated event by event (queueing.eventsim), "
        "first half of each discarded, horizon doubled until the "
        f"95% CI is within {LONG_RUN_PRECISION:.0%} (± is that half-width). PPO = the median over seeds of its "
        "best.pt. The 'best static priority' the median is set against is the cheapest of the static priorities in "
        "the row (the search's order, LBFS, FBFS, c-mu), a point estimate of ± about 1%.",
        "",
        *tables,
    ]
    lines += ["", "## Best static priorities found", ""]
    for instance in CRISS_CROSS + REENTRANT:
        static = store.get("classical", {}).get(instance, {}).get("best_static")
        if static:
            lines.append(f"- {instance}: per server, highest priority first (buffers from 0): {static['order']}")
    lines += ["", "## PPO runs", "", "| instance | seed | best.pt cost | steps of best.pt | wall | settings |", "|---|---|---|---|---|---|"]
    for instance, runs in sorted(store.get("ppo", {}).items()):
        for seed, run in sorted(runs.items()):
            lines.append(f"| {instance} | {seed} | {cost_text(run)} | {run['best_step']:,} | {run['wall_seconds'] / 60:.0f} min "
                         f"| `{run['settings']}` |")
    (RESULTS / "literature.md").write_text("\n".join(lines) + "\n")
    readme = README.read_text()
    begin, end = readme.find(README_MARKERS[0]), readme.find(README_MARKERS[1])
    if begin >= 0 and end > begin:
        README.write_text(readme[:begin + len(README_MARKERS[0])] + "\n\n" + "\n".join(
            line.replace("## ", "**", 1) + "**" if line.startswith("## ") else line for line in tables) + "\n\n"
            + readme[end:])
    draw(store)


def result_tables(store):
    """The criss-cross and re-entrant tables (markdown lines), for literature.md and the README."""
    lines = [
        "## Criss-cross",
        "",
        "| regime | D&G DP | ours: optimum (levels) | vs D&G DP | D&G PPO | ours: PPO best.pt, median (seeds) | gap | c-mu | best static |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for instance in CRISS_CROSS:
        published = PUBLISHED[instance]
        levels = store.get("optima", {}).get(instance)
        optimum = f"{levels[-1][2]:.4f} (L={levels[-2][0]}: {levels[-2][2]:.4f}, L={levels[-1][0]})" if levels else "–"
        difference = f"{levels[-1][2] / published['dp'] - 1:+.2%}" if levels else "–"
        runs = store.get("ppo", {}).get(instance, {})
        ppo = median([run["cost"] for run in runs.values()]) if runs else None
        gap = median([run["gap"] for run in runs.values()]) if runs else None
        seeds = ", ".join(f"{run['cost']:.4f}" for _, run in sorted(runs.items()))
        rules = store.get("classical", {}).get(instance, {})
        lines.append(
            f"| {instance[-2:].upper()} | {published['dp']:.3f} | {optimum} | {difference} | "
            f"{published['ppo']:.3f} ± {published['ppo_hw']:.3f} | "
            + (f"{ppo:.4f} ({seeds})" if runs else "–") + " | " + (f"{gap:+.2%}" if runs else "–") + " | "
            + cost_text(rules.get("cmu")) + " | " + cost_text(rules.get("best_static")) + " |")
    for instance, check in sorted(store.get("greedy", {}).items()):
        lines.append(f"\n{instance.upper()}: the optimal policy of the truncation at {check['level']} (exact cost there "
                     f"{check['truncated_cost']:.4f}) simulated on the untruncated network costs {cost_text(check)} "
                     f"({check['copies']} copies x {check['horizon']:,} slots, first half discarded).")
    lines += [
        "",
        "## Extended re-entrant lines",
        "",
        "| classes | D&G PPO | D&G best RFP | D&G LBFS | QGym PPO | ours: PPO best.pt, median (seeds) "
        "| median below D&G PPO - half-width? | median against the best static priority "
        "| ours: best static priority (search) | LBFS | FBFS | c-mu | MaxWeight |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for instance in REENTRANT:
        published = PUBLISHED[instance]
        runs = store.get("ppo", {}).get(instance, {})
        rules = store.get("classical", {}).get(instance, {})
        ppo, bar_met, against_static = "–", "–", "–"
        if runs:
            cost = median([run["cost"] for run in runs.values()])
            missing = len(default_seeds(instance)) - len(runs)
            ppo = f"{cost:.3f} (" + ", ".join(
                f"{run['cost']:.2f} ± {run['half_width']:.2f} @ {run['best_step'] / 1e6:.0f}M" for _, run in sorted(runs.items())
            ) + ")" + (f", {missing} of {len(default_seeds(instance))} seeds missing" if missing > 0 else "")
            bar = published["ppo"] - published["ppo_hw"]
            bar_met = f"{'yes' if cost < bar else 'no'} ({cost - bar:+.2f})"
            statics = {name: rules[name] for name in STATIC_RULES if name in rules}
            if statics:
                name, best = min(statics.items(), key=lambda item: item[1]["cost"])
                against_static = f"{cost / best['cost'] - 1:+.1%} ({STATIC_RULES[name]})"
        lines.append(
            f"| {3 * int(instance.split('-')[1])} | {published['ppo']:.3f} ± {published['ppo_hw']:.3f} | {published['rfp']:.3f} | "
            f"{published['lbfs']:.3f} | {published.get('qgym_ppo', '–')} | {ppo} | {bar_met} | {against_static} | "
            f"{cost_text(rules.get('best_static'))} | {cost_text(rules.get('lbfs'))} | {cost_text(rules.get('fbfs'))} | "
            f"{cost_text(rules.get('cmu'))} | {cost_text(rules.get('maxweight'))} |")
    return lines


# The static priorities among the table's rules on the re-entrant lines: the search's order, LBFS, FBFS, and c-mu
# (each station's three classes have distinct service rates there, so c-mu is a strict order too).
STATIC_RULES = {"best_static": "search", "lbfs": "LBFS", "fbfs": "FBFS", "cmu": "c-mu"}


def draw(store):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, grid = plt.subplots(2, 3, figsize=(13, 7.5))
    for axes, instance in zip(grid.flat, REENTRANT):
        for seed, run in sorted(store.get("ppo", {}).get(instance, {}).items()):
            steps, costs = zip(*run["curve"]) if run["curve"] else ((), ())
            axes.plot([step / 1e6 for step in steps], costs, marker=".", linewidth=1, label=f"PPO seed {seed} (training evaluation)")
        published = PUBLISHED[instance]
        axes.axhline(published["ppo"], color="black", linestyle="--", linewidth=1, label="D&G PPO (5e8 steps)")
        static = store.get("classical", {}).get(instance, {}).get("best_static")
        if static:
            axes.axhline(static["cost"], color="tab:red", linestyle=":", linewidth=1.2, label="best static priority")
        axes.set_title(f"{instance} ({3 * int(instance.split('-')[1])} classes)")
        axes.set_xlabel("environment steps (millions)")
        axes.set_ylabel("cost per unit time")
        axes.grid(alpha=0.3)
        low = published["ppo"] * 0.85
        axes.set_ylim(low, published["ppo"] * 1.3)
    handles, labels = grid.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.045), ncol=4, frameon=False)
    figure.text(0.5, 0.005, "The training evaluation (64 copies x 40,000 slots after 20,000 from empty) reads low "
                "against the long-run lines: on 6 classes the best static priority\ncosts 14.02 long-run and 13.71 "
                "on it. Compare the curves with each other, and the table's long-run costs with the lines.",
                ha="center", va="bottom", fontsize=9)
    figure.suptitle("PPO on the extended re-entrant lines: the trainer's periodic evaluation (short protocol, noisy) "
                    "against steps", fontsize=11)
    figure.tight_layout(rect=(0, 0.1, 1, 0.96))
    figure.savefig(RESULTS / "literature.png", dpi=100)


def log(text):
    print(text, flush=True)


def one_thread():
    """One core per training or scoring (--parallel): torch's and numpy's own threads would oversubscribe them."""
    torch.set_num_threads(1)
    threadpool_limits(1)


def finished_jobs(jobs):
    """(key, result or exception) of each job of {future: key} as it ends: one failure neither hides nor holds up
    the others' results."""
    for future in as_completed(jobs):
        error = future.exception()
        yield jobs[future], error if error is not None else future.result()


def worker_pool(workers):
    """Processes, not threads: scoring a policy event by event is mostly Python, which threads would share."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=one_thread)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instance", nargs="+", default=None, help="only these instances (default: all twelve)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="train just these seeds and print their results (not stored)")
    parser.add_argument("--report", action="store_true", help="only write the table and the plot from stored results")
    parser.add_argument("--parts", nargs="+", choices=["optima", "greedy", "classical", "ppo"],
                        default=["optima", "greedy", "classical", "ppo"],
                        help="what to compute where missing (default: all); greedy: the optimal policy of a "
                             "truncation simulated on the untruncated heavy-traffic criss-cross networks")
    parser.add_argument("--parallel", type=int, default=2, help="runs trained or scored at once (a process and a core each)")
    parser.add_argument("--no-training", action="store_true",
                        help="score the PPO runs that already ran to their end, start none")
    parser.add_argument("--workdir", default=str(REPO / "runs" / "literature"), help="where run folders go")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further trainer options (must come last)")
    options = parser.parse_args()
    one_thread()
    failed = []
    instances = options.instance or CRISS_CROSS + REENTRANT
    unknown = sorted(set(instances) - set(CRISS_CROSS + REENTRANT))
    if unknown:
        parser.error(f"unknown instance {unknown[0]}; instances: {', '.join(CRISS_CROSS + REENTRANT)}")

    if options.seeds:
        with worker_pool(options.parallel) as pool:
            jobs = {pool.submit(ppo_run, instance, seed, options.workdir, options.extra, load_store(), log): (instance, seed)
                    for instance in instances for seed in options.seeds}
            for (instance, seed), result in finished_jobs(jobs):
                if isinstance(result, Exception):
                    failed.append(f"{instance} seed {seed}: {result}")
                else:
                    log(f"{instance} seed {seed}: {result['checkpoint']}  {cost_text(result)}")
        if failed:
            sys.exit("failed: " + "; ".join(failed))
        return
    store = load_store()
    if not options.report:
        for instance in instances:
            if "optima" in options.parts and instance in CRISS_CROSS and instance not in store.get("optima", {}):
                store = record("optima", instance, optimum_levels(instance))
                log(f"{instance} optimum: " + ", ".join(f"L={level}: {cost:.5f}" for level, _, cost in store["optima"][instance]))
            if ("greedy" in options.parts and instance in GREEDY_CHECKED and instance in store.get("optima", {})
                    and instance not in store.get("greedy", {})):
                store = record("greedy", instance, greedy_check(instance, store))
                log(f"{instance} greedy policy of level {store['greedy'][instance]['level']}: "
                    f"{cost_text(store['greedy'][instance])} on the untruncated network")
            if "classical" in options.parts and instance not in store.get("classical", {}):
                store = record("classical", instance, classical_rules(instance, store, log))
        if "ppo" in options.parts:
            with worker_pool(options.parallel) as pool:
                jobs = {pool.submit(ppo_run, instance, seed, options.workdir, options.extra, store, log): (instance, seed)
                        for instance, seed in missing_runs(instances, store, options.workdir, options.no_training)}
                for (instance, seed), result in finished_jobs(jobs):
                    if isinstance(result, Exception):
                        failed.append(f"{instance} seed {seed}: {result}")
                    else:
                        record("ppo", instance, result, seed)
    write_report(load_store())
    log(f"wrote {RESULTS / 'literature.md'} and {RESULTS / 'literature.png'}")
    if failed:
        sys.exit("failed (the other runs are stored): " + "; ".join(failed))


if __name__ == "__main__":
    main()
