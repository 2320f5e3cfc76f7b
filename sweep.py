"""Experiments at scale on Optuna: every trial trains one run per seed x problem instance, then a report.

    python sweep.py run --study-name pendulum --instance Pendulum-v1 --seeds 1 2 3 \\
        --param learning_rate='loguniform(1e-4, 3e-3)' --param total_timesteps=100000 --n-trials 20 --workers 2
    python sweep.py report --study-name pendulum

A trial is one configuration of `ppo_continuous.Args`. Its objective is the evaluated LTA return of its runs (the
score of each run's best.pt, from the trainer's evaluation), aggregated over all seeds and instances by the mean or
the interquartile mean. Trials live in an Optuna study: by default a journal file under runs/sweeps/NAME/ (no
server; safe for several processes on one machine), or a database URL (--storage postgresql://...) that workers on
many machines share. Every run also feeds the trainer's checkpoint registry (in that database, for a URL).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import logging
import math
import multiprocessing
import os
import re
import signal
import socket
import sys
import time
import typing
import warnings
from collections import Counter
from dataclasses import fields
from pathlib import Path

import numpy as np
import optuna
import yaml
from optuna.trial import TrialState
from scipy import stats

from checkpoint_saver import DEFAULT_ROOT, RegistryError, instance_key, read_instance
from ppo_continuous import Args, TrainError, train

SWEEPS_DIR = Path("runs") / "sweeps"
CONFIG_ATTR = "sweep"
# Options the sweep sets itself for every run: they cannot be searched over.
RESERVED = {"env_id", "env_kwargs", "seed", "exp_name", "num_threads", "problem_instance", "eval_only", "eval_json",
            "resume", "lower_is_better", "track", "wandb_project_name", "wandb_entity", "registry"}
DISTRIBUTIONS = {"uniform", "loguniform", "int", "logint"}
ARG_TYPES = typing.get_type_hints(Args)
ARG_NAMES = {field.name for field in fields(Args)}
# The level of the CIs of the table and of the bands around learning curves (t intervals over seeds).
CONFIDENCE = 0.95
# The median pruner compares a trial only once this many trials have finished.
PRUNER_STARTUP_TRIALS = 5
# Each run is cut into this many spans of steps; the median and hyperband pruners see one value per span.
PRUNING_POINTS = 20
# The Wilcoxon pruner's one-sided p-value after n paired runs is at least 2^-n: it can prune from 4 runs on.
WILCOXON_P_THRESHOLD, WILCOXON_MIN_RUNS = 0.1, 4
# Database storages: a worker that stops sending heartbeats for this long has its trial marked failed.
HEARTBEAT_SECONDS, GRACE_SECONDS = 60, 180
# A trial whose worker died (heartbeat, or a dead pid on resume) is run again at most this many times.
MAX_RETRIES = 2
# Words of a worker's printed lines longer than this (run folders, instance keys) are shortened in the middle.
LONGEST_WORD = 48
STORAGE_ATTEMPTS = 3


class SweepError(Exception):
    """Bad sweep input or state; the message is one line saying what to do (the CLI prints it, exit 2)."""


# ---------------------------------------------------------------------------------------------------------------
# Aggregation and interval estimates
# ---------------------------------------------------------------------------------------------------------------

def mean(scores, axis=-1):
    return np.mean(scores, axis=axis)


def interquartile_mean(scores, axis=-1):
    """The mean of the middle 50% of scores: rliable's `aggregate_iqm` is this very scipy call."""
    return stats.trim_mean(scores, 0.25, axis=axis)


AGGREGATES = {"mean": mean, "iqm": interquartile_mean}
# The interquartile mean cuts floor(n / 4) runs at each end: below 4 runs it cuts none and is the mean.
IQM_MIN_RUNS = 4


def trimmed_t_interval(scores, trim):
    """Along the last axis: the mean with floor(trim * n) scores cut at each end, and the half-width of its
    Tukey-McLaughlin t interval (Student's t interval when nothing is cut).

    Half-width t(n - 2g - 1) * s_w / ((1 - 2g/n) sqrt(n)), s_w the standard deviation of the scores winsorized at
    g = floor(trim * n) on each side (Tukey and McLaughlin 1963; Wilcox, Introduction to Robust Estimation, 4.4).
    NaN when fewer than 2 scores are kept.
    """
    scores = np.sort(np.asarray(scores, dtype=float), axis=-1)
    n = scores.shape[-1]
    cut = int(trim * n)
    kept = n - 2 * cut
    point = scores[..., cut:n - cut].mean(axis=-1)
    if kept < 2:
        return point, np.full_like(point, np.nan)
    winsorized = np.clip(scores, scores[..., cut:cut + 1], scores[..., n - cut - 1:n - cut])
    standard_error = winsorized.std(axis=-1, ddof=1) / ((1 - 2 * cut / n) * math.sqrt(n))
    return point, stats.t.ppf(0.5 + CONFIDENCE / 2, kept - 1) * standard_error


def stratified_t_interval(samples):
    """The mean over strata (instances) of each stratum's mean over the last axis (seeds), and the half-width of
    its t interval: variance sum_k s_k^2 / n_k / K^2, degrees of freedom by Welch-Satterthwaite (Student's t
    interval for one stratum). NaN when a stratum has fewer than 2 scores.
    """
    samples = [np.asarray(sample, dtype=float) for sample in samples]
    point = np.mean([sample.mean(axis=-1) for sample in samples], axis=0)
    if min(sample.shape[-1] for sample in samples) < 2:
        return point, np.full_like(point, np.nan)
    variances = np.array([sample.var(axis=-1, ddof=1) / sample.shape[-1] for sample in samples])
    total = variances.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):  # every stratum flat: a zero-width interval
        dof = total ** 2 / sum(variance ** 2 / (sample.shape[-1] - 1) for variance, sample in zip(variances, samples))
        half_width = stats.t.ppf(0.5 + CONFIDENCE / 2, dof) * np.sqrt(total) / len(samples)
    return point, np.where(total > 0, half_width, 0.0)


def interval(samples, aggregate):
    """The aggregate of scores given per instance (arrays, seeds on the last axis) and its 95% CI as (point,
    low, high); NaN bounds when the scores cannot give one (a single seed).

    mean: the stratified Student-t interval (`stratified_t_interval`), which holds its level at 2-5 seeds where a
    percentile bootstrap covers 50-82%. iqm: the Tukey-McLaughlin interval of the interquartile mean of all runs
    pooled, as the objective pools them (`trimmed_t_interval`).
    """
    if aggregate == "iqm":
        point, half_width = trimmed_t_interval(np.concatenate(samples, axis=-1), 0.25)
    else:
        point, half_width = stratified_t_interval(samples)
    return point, point - half_width, point + half_width


def band(values, aggregate):
    """Per column of `values` (seeds x steps): the aggregate over seeds and its 95% CI, as `interval`."""
    return interval([np.asarray(values, dtype=float).T], aggregate)


def paired_differences(runs, best_runs):
    """Per instance, this trial's score minus the best trial's on each (seed, instance) both ran: the common
    random numbers (same training and evaluation seeds) cancel in each difference."""
    best_scores = {(run["seed"], run["instance"]): run["score"] for run in best_runs}
    differences = {}
    for run in runs:
        if (run["seed"], run["instance"]) in best_scores:
            differences.setdefault(run["instance"], []).append(run["score"] - best_scores[run["seed"], run["instance"]])
    return [differences[index] for index in sorted(differences)]


# ---------------------------------------------------------------------------------------------------------------
# The search space and the sweep's configuration
# ---------------------------------------------------------------------------------------------------------------

def parse_dimension(name, value):
    """One search-space entry as [kind, payload]: a fixed value, a list of choices, or a distribution.

    Text is read as `loguniform(lo, hi)`, `uniform(lo, hi)`, `int(lo, hi)`, `logint(lo, hi)`, a JSON list of
    choices, a JSON value, or else a plain string; values from a YAML file may already be numbers or lists.
    """
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\w+)\s*\((.*)\)\s*", value)
        if match and match[1] in DISTRIBUTIONS:
            kind = match[1]
            try:
                low, high = json.loads(f"[{match[2]}]")
            except (json.JSONDecodeError, ValueError):
                raise SweepError(f"parameter {name}: {value!r} needs two numbers, as in {kind}(1, 10)") from None
            integral = kind in ("int", "logint")
            if not all(isinstance(bound, int if integral else (int, float)) and not isinstance(bound, bool)
                       for bound in (low, high)) or not low < high or (kind.startswith("log") and low <= 0):
                raise SweepError(f"parameter {name}: {value!r} needs {'integers' if integral else 'numbers'} "
                                 f"low < high{' and low > 0' if kind.startswith('log') else ''}")
            return [kind, [low, high]]
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return ["fixed", value]
    if isinstance(value, list):
        if not value or not all(choice is None or isinstance(choice, (bool, int, float, str)) for choice in value):
            raise SweepError(f"parameter {name}: choices must be a non-empty list of numbers, strings, true/false "
                             f"or null (write sizes as a string, e.g. hidden_sizes='[\"64 64\", \"256 256\"]')")
        if len(set(map(json.dumps, value))) < len(value):
            raise SweepError(f"parameter {name}: the choices {value} repeat (a fixed list of sizes is a string: "
                             f"hidden_sizes='256 256')")
        return ["choices", value]
    return ["fixed", value]


def argument_name(name):
    """The Args field a parameter names (dashes or underscores), or SweepError."""
    field = name.strip().lstrip("-").replace("-", "_")
    if field not in ARG_NAMES:
        raise SweepError(f"unknown trainer option '{name}': see `python ppo_continuous.py --help` for the options")
    if field in RESERVED:
        raise SweepError(f"option '{name}' is set by the sweep itself: use --instance, --seeds, --lower-is-better "
                         f"or --track instead")
    return field


def coerce(name, value):
    """`value` converted to the type of the Args field `name` (so 1 becomes 1.0 for a float, "64 64" a tuple)."""
    hint = ARG_TYPES[name]
    if typing.get_origin(hint) is typing.Union:  # Optional[X]
        if value is None or value == "None":
            return None
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    wrong = SweepError(f"parameter {name}: {value!r} is not a valid {getattr(hint, '__name__', hint)}")
    if typing.get_origin(hint) is tuple:
        items = value.split() if isinstance(value, str) else value if isinstance(value, list) else None
        try:
            return tuple(int(item) for item in items)
        except (TypeError, ValueError):
            raise wrong from None
    if typing.get_origin(hint) is typing.Literal:
        if value not in typing.get_args(hint):
            raise SweepError(f"parameter {name}: {value!r} is not one of {list(typing.get_args(hint))}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (hint is int and value != int(value)):
            raise wrong
        return hint(value)
    return value if isinstance(value, hint) else str(value)


def parse_space(param_texts, space_file):
    """The search space {field: [kind, payload]} from a YAML/JSON file, then `--param NAME=SPEC` (which win)."""
    entries = {}
    if space_file:
        try:
            loaded = yaml.safe_load(Path(space_file).read_text())
        except (OSError, yaml.YAMLError) as error:
            raise SweepError(f"cannot read the search space file {space_file}: {error}".replace("\n", " ")) from None
        if not isinstance(loaded, dict):
            raise SweepError(f"{space_file} must map option names to values, e.g. 'learning_rate: loguniform(1e-4, "
                             f"1e-2)'")
        entries.update(loaded)
    for text in param_texts:
        name, separator, spec = text.partition("=")
        if not separator:
            raise SweepError(f"--param {text!r} must be NAME=VALUE, e.g. --param learning_rate=3e-4")
        entries[name] = spec
    space = {}
    for name, value in entries.items():
        field = argument_name(str(name))
        kind, payload = parse_dimension(field, value)
        for item in payload if kind == "choices" else [payload] if kind == "fixed" else payload:
            coerce(field, item)  # fails now, not in a trial, if a value cannot be of the option's type
        if kind in ("int", "logint") and ARG_TYPES[field] not in (int, typing.Optional[int]):
            raise SweepError(f"parameter {field} is not an integer option: use uniform or loguniform")
        space[field] = [kind, payload]
    return space


def parse_instance(text):
    """`ENV_ID` or `ENV_ID {json kwargs}` as [env_id, canonical kwargs JSON]."""
    env_id, _, kwargs_text = text.strip().partition(" ")
    try:
        kwargs = json.loads(kwargs_text) if kwargs_text.strip() else {}
    except json.JSONDecodeError as error:
        raise SweepError(f"--instance {text!r}: the kwargs are not valid JSON ({error})") from None
    if not env_id or not isinstance(kwargs, dict):
        raise SweepError(f"--instance {text!r} must be ENV_ID or 'ENV_ID {{\"key\": value}}'")
    return [env_id, json.dumps(kwargs, sort_keys=True)]


def instance_label(instance):
    env_id, kwargs = instance
    return env_id if kwargs == "{}" else f"{env_id} {kwargs}"


def grid_size(space):
    return math.prod(len(payload) for kind, payload in space.values() if kind == "choices")


def build_config(options):
    """The study-defining configuration from the command line (stored in the study; joining workers reuse it)."""
    space = parse_space(options.param, options.space)
    if not options.instance:
        raise SweepError("give at least one problem instance: --instance Pendulum-v1 (repeat for more)")
    has_distributions = any(kind in DISTRIBUTIONS for kind, _ in space.values())
    sampler = options.sampler or ("tpe" if has_distributions else "grid")
    if sampler == "grid" and has_distributions:
        raise SweepError("the grid sampler needs lists of choices only: use --sampler random or tpe for "
                         "distributions")
    if len(set(options.seeds or [1])) < len(options.seeds or [1]):
        raise SweepError(f"--seeds {options.seeds} repeat a seed")
    runs = len(options.seeds or [1]) * len(options.instance)
    if options.aggregate == "iqm" and runs < IQM_MIN_RUNS:
        raise SweepError(f"--aggregate iqm cuts a quarter of the runs at each end, so below {IQM_MIN_RUNS} runs per "
                         f"trial it is the mean; here {runs} (seeds x instances): use --aggregate mean or more seeds")
    if options.pruner == "wilcoxon" and runs < WILCOXON_MIN_RUNS:
        raise SweepError(f"--pruner wilcoxon can prune only after {WILCOXON_MIN_RUNS} runs of a trial (with fewer, "
                         f"no one-sided p-value is below {WILCOXON_P_THRESHOLD}); here {runs} (seeds x instances): "
                         f"use --pruner median or more seeds")
    return {"space": space, "instances": [parse_instance(text) for text in options.instance],
            "seeds": options.seeds or [1], "aggregate": options.aggregate or "mean", "score": options.score or "best",
            "lower_is_better": bool(options.lower_is_better), "sampler": sampler,
            "sampler_seed": options.sampler_seed, "pruner": options.pruner or "median"}


def make_sampler(config, worker_index):
    """The configured sampler; a given --sampler-seed is offset per worker so that workers propose different trials."""
    seed = None if config["sampler_seed"] is None else config["sampler_seed"] + worker_index
    if config["sampler"] == "grid":
        grid = {name: payload for name, (kind, payload) in config["space"].items() if kind == "choices"}
        return optuna.samplers.GridSampler(grid, seed=seed)
    if config["sampler"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(config):
    if config["pruner"] == "wilcoxon":
        return optuna.pruners.WilcoxonPruner(p_threshold=WILCOXON_P_THRESHOLD)
    if config["pruner"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS)
    if config["pruner"] == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


# ---------------------------------------------------------------------------------------------------------------
# Storage and study
# ---------------------------------------------------------------------------------------------------------------

def storage_location(storage, study_name):
    """What --storage means: a database URL, a journal file path, or (default) runs/sweeps/NAME/optuna.journal."""
    return storage or str(SWEEPS_DIR / study_name / "optuna.journal")


def registry_location(registry, storage):
    """The checkpoint registry every run feeds: --registry, else the study's database (a --storage URL), so that a
    study on many machines keeps its best policies in one place; else None, the trainer's default SQLite file."""
    return registry or (storage if storage and "://" in storage else None)


def open_storage(location):
    """A database URL opens an RDBStorage with heartbeats (a dead worker's trial is failed, not left running, and
    queued to run again); anything else is a journal file, which Optuna locks for safe use by several processes on
    one machine (it has no heartbeat: `fail_trials_of_dead_workers` mends on resume)."""
    if "://" in location:
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)
        for attempt in range(STORAGE_ATTEMPTS):
            try:
                return optuna.storages.RDBStorage(
                    location, engine_kwargs={"pool_pre_ping": True}, heartbeat_interval=HEARTBEAT_SECONDS,
                    grace_period=GRACE_SECONDS, heartbeat_stale_trial_callback=retry)
            except Exception as error:  # SQLAlchemy and driver errors have no common base worth naming
                # Workers started together on an empty database race to create Optuna's tables: the losers
                # fail once, then find the tables made.
                if attempt + 1 == STORAGE_ATTEMPTS:
                    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                    raise SweepError(f"cannot open the storage {redact(location)}: {first_line}") from None
                time.sleep(1 + attempt)
    Path(location).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(location))


def redact(url):
    """The URL without its password, for messages."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def load_study(storage, study_name, location):
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        names = optuna.get_all_study_names(storage)
        raise SweepError(f"no study '{study_name}' in {redact(location)}"
                         f"{': it holds ' + ', '.join(names) if names else ''}; give --study-name and --storage "
                         f"as for `sweep.py run`") from None


def open_or_create_study(storage, study_name, location, config):
    """The study, created with `config` if new; a given config must match the stored one (join, or resume)."""
    if config is None:
        study = load_study(storage, study_name, location)
    else:
        direction = "minimize" if config["lower_is_better"] else "maximize"
        study = optuna.create_study(storage=storage, study_name=study_name, direction=direction, load_if_exists=True)
        if CONFIG_ATTR not in study.user_attrs:
            study.set_user_attr(CONFIG_ATTR, config)
    stored = study.user_attrs.get(CONFIG_ATTR)
    if stored is None:
        raise SweepError(f"study '{study_name}' was not made by sweep.py: give another --study-name")
    if config is not None and json.loads(json.dumps(config)) != stored:
        differing = sorted(key for key in stored if json.loads(json.dumps(config.get(key))) != stored[key])
        raise SweepError(f"study '{study_name}' exists with other settings ({', '.join(differing)}): to join or "
                         f"resume it give only --study-name and --storage, or choose a new --study-name")
    return study


# ---------------------------------------------------------------------------------------------------------------
# Running trials
# ---------------------------------------------------------------------------------------------------------------

def suggest(trial, name, kind, payload):
    if kind == "choices":
        return trial.suggest_categorical(name, payload)
    if kind in ("int", "logint"):
        return trial.suggest_int(name, *payload, log=kind == "logint")
    return trial.suggest_float(name, *payload, log=kind == "loguniform")


def run_trial(trial, config, study_name, tracking):
    """Train every seed x instance of this trial's configuration; return the aggregated evaluated LTA return.

    Every run is recorded (user attr `runs`) with its score, a pruned one too (the trainer still evaluates its
    last agent). Pruning by `config["pruner"]`:
    - median, hyperband: runs go in a fixed order (seeds outer, instances inner), each cut into PRUNING_POINTS
      equal spans of its steps; when a span has closed, the trial reports, at step run_index * (PRUNING_POINTS
      + 1) + span, the aggregate of the finished runs' scores and the current run's score had it stopped there
      (its best evaluation so far, or with --score final its latest), the same measure as the objective. The
      trainer evaluates at irregular steps (a promising agent is evaluated early), so reporting per span is what
      makes trials compared at one step have finished the same runs and be equally far into the next.
    - wilcoxon: each finished run's score is reported at its index in the design, which pairs it with the best
      trial's run of the same seed and instance; runs go in an order shuffled per trial, as Optuna advises, so
      that no configuration is judged on the same first runs.
    """
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # resume fails the trials of dead workers
    trial.set_user_attr("runs", [])  # a retried trial starts afresh (Optuna's retry copies the user attrs)
    space = config["space"]
    options = {name: payload for name, (kind, payload) in space.items() if kind == "fixed"}
    options.update({name: suggest(trial, name, kind, payload) for name, (kind, payload) in space.items()
                    if kind != "fixed"})
    options = {name: coerce(name, value) for name, value in options.items()}
    aggregate = AGGREGATES[config["aggregate"]]
    better = min if config["lower_is_better"] else max
    total_timesteps = options.get("total_timesteps", Args.total_timesteps)
    instances = config["instances"]
    design = list(itertools.product(config["seeds"], enumerate(instances)))
    paired_pruning = config["pruner"] == "wilcoxon"
    order = np.random.default_rng(trial.number).permutation(len(design)) if paired_pruning else range(len(design))
    runs = []
    for done, run_index in enumerate(order):
        seed, (instance_index, (env_id, env_kwargs)) = design[run_index]
        suffix = f"-i{instance_index}" if len(instances) > 1 else ""
        args = Args(**options, env_id=env_id, env_kwargs=env_kwargs, seed=seed,
                    exp_name=f"{study_name}-t{trial.number}{suffix}", num_threads=1,
                    lower_is_better=config["lower_is_better"], **tracking)
        scores = [run["score"] for run in runs]
        progress = {"score": None, "closed_spans": 0, "pruned_at": None}

        def on_evaluation(global_step, evaluation):
            span = min(PRUNING_POINTS, global_step * PRUNING_POINTS // total_timesteps)
            if progress["score"] is not None:
                for closed in range(progress["closed_spans"], span):
                    trial.report(float(aggregate(np.array(scores + [progress["score"]]))),
                                 run_index * (PRUNING_POINTS + 1) + closed)
            progress["closed_spans"] = max(progress["closed_spans"], span)
            progress["score"] = (evaluation["mean"] if config["score"] == "final" or progress["score"] is None
                                 else better(progress["score"], evaluation["mean"]))
            if trial.should_prune():
                progress["pruned_at"] = global_step
                return True
            return False

        summary = train(args, on_evaluation=None if paired_pruning else on_evaluation)
        if summary["interrupted"]:
            raise KeyboardInterrupt("interrupted (Ctrl-C or SIGTERM)")
        evaluation = summary[config["score"]]
        if evaluation is None:
            raise SweepError(f"run {summary['run_dir']} has no evaluated score of its {config['score']}.pt: "
                             f"give it at least one full rollout to train")
        runs.append({"instance": instance_index, "seed": seed, "score": evaluation["mean"],
                     "half_width": evaluation["half_width"], "episodes": evaluation["episodes"],
                     "run_dir": str(Path(summary["run_dir"]).resolve()), "host": socket.gethostname(),
                     **({"pruned_at": progress["pruned_at"]} if progress["pruned_at"] is not None else {})})
        trial.set_user_attr("runs", runs)
        where = f"run {done + 1} of {len(design)} ({instance_label(instances[instance_index])}, seed {seed})"
        if progress["pruned_at"] is not None:
            raise optuna.TrialPruned(f"in {where} at step {progress['pruned_at']}")
        if paired_pruning:
            trial.report(evaluation["mean"], run_index)
            if trial.should_prune():
                raise optuna.TrialPruned(f"after {where}: worse than the best trial on the same runs (one-sided "
                                         f"Wilcoxon signed-rank p < {WILCOXON_P_THRESHOLD})")
    return float(aggregate(np.array([run["score"] for run in runs])))


def objective(trial, config, study_name, tracking):
    """`run_trial`, with the reason of a failure kept on the trial (user attr `error`) for the report."""
    try:
        return run_trial(trial, config, study_name, tracking)
    except optuna.TrialPruned:
        raise
    except (Exception, KeyboardInterrupt) as error:
        trial.set_user_attr("error", f"{type(error).__name__}: {error}")
        raise


class LabelledLines:
    """A text stream that writes whole lines, each starting with its worker's label ("[w1 trial 3] "), and
    shortens words longer than LONGEST_WORD (run folders, instance keys) in the middle, so that the lines of
    parallel workers stay whole, attributable and readable. Run folders, registry and report keep full names."""

    def __init__(self, stream, label):
        self.stream, self.label, self.pending = stream, label, ""

    def write(self, text):
        *lines, self.pending = (self.pending + text).split("\n")
        if lines:  # one write per batch of whole lines: a pipe does not interleave them with other workers'
            self.stream.write("".join(f"{self.label}{shorten_words(line)}\n" for line in lines))
            self.stream.flush()
        return len(text)

    def close_line(self):
        if self.pending:
            self.write("\n")

    def isatty(self):  # no live progress bar: its redraws would carry no label
        return False

    def __getattr__(self, name):
        return getattr(self.stream, name)


def shorten_words(line):
    half = (LONGEST_WORD - 3) // 2
    return re.sub(rf"\S{{{LONGEST_WORD + 1},}}", lambda word: f"{word[0][:half]}...{word[0][-half:]}", line)


@contextlib.contextmanager
def labelled_output(worker_index):
    """sys.stdout, sys.stderr and Optuna's log handlers as LabelledLines labelled "[wN]" while this worker runs;
    yields the two streams, whose label a trial extends."""
    streams = [LabelledLines(stream, f"[w{worker_index + 1}] ") for stream in (sys.stdout, sys.stderr)]
    handlers = [handler for handler in logging.getLogger("optuna").handlers
                if isinstance(handler, logging.StreamHandler)]
    saved = sys.stdout, sys.stderr, [handler.setStream(streams[1]) for handler in handlers]
    sys.stdout, sys.stderr = streams
    try:
        yield streams
    finally:
        for stream in streams:
            stream.close_line()
        sys.stdout, sys.stderr = saved[:2]
        for handler, stream in zip(handlers, saved[2]):
            handler.setStream(stream)


class ExpectedFailures(logging.Filter):
    """Optuna logs a failed trial with its traceback; a bad option or an interruption needs only the message."""

    def filter(self, record):
        if record.exc_info and isinstance(record.exc_info[1], (TrainError, SweepError, KeyboardInterrupt)):
            record.exc_info = None
        return True


def trials_spent(study):
    """The trials that count toward --n-trials: every trial started, except failed ones queued to run again
    (their retry counts instead)."""
    trials = study.get_trials(deepcopy=False)
    retried = {number for trial in trials for number in trial.system_attrs.get("retry_history", [])}
    return sum(trial.state != TrialState.WAITING and trial.number not in retried for trial in trials)


def work(study_name, location, n_trials, worker_index, tracking, output):
    """One worker: run trials of the study until `n_trials` are spent (`trials_spent`); `output` are its
    LabelledLines, labelled with the trial that runs."""
    for handler in logging.getLogger("optuna").handlers:  # a logger's own filters miss its children's records
        handler.addFilter(ExpectedFailures())
    storage = open_storage(location)
    study = load_study(storage, study_name, location)
    config = study.user_attrs[CONFIG_ATTR]
    if trials_spent(study) >= n_trials:
        return
    study = optuna.load_study(study_name=study_name, storage=storage, sampler=make_sampler(config, worker_index),
                              pruner=make_pruner(config))

    def labelled_objective(trial):
        for stream in output:
            stream.label = f"[w{worker_index + 1} trial {trial.number}] "
        return objective(trial, config, study_name, tracking)

    def stop_when_spent(study, trial):
        if trials_spent(study) >= n_trials:
            study.stop()

    study.optimize(labelled_objective, n_trials=n_trials, catch=(Exception,), callbacks=[stop_when_spent])


def worker_main(study_name, location, n_trials, worker_index, tracking):
    """Entry point of a worker process: labelled lines, one-line errors, exit 130 when interrupted."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # a spawned worker's own
    try:
        with labelled_output(worker_index) as output:
            work(study_name, location, n_trials, worker_index, tracking, output)
    except SweepError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        raise SystemExit(130)


def run_workers(study_name, location, n_trials, workers, tracking):
    """`workers` processes on this machine (Optuna's n_jobs are threads, which CPU-bound torch serialises)."""
    if workers == 1:
        worker_main(study_name, location, n_trials, 0, tracking)
        return
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[variable] = "1"  # one thread per worker, also for numpy, inherited by the spawned workers
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=worker_main, args=(study_name, location, n_trials, index, tracking))
                 for index in range(workers)]
    stop = {"requested": False}

    def forward(signum, frame):  # Ctrl-C reaches every worker itself; SIGTERM is passed on so they stop cleanly
        stop["requested"] = True
        if signum == signal.SIGTERM:
            for process in processes:
                if process.is_alive():
                    process.terminate()

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        for process in processes:
            process.start()
        for process in processes:
            process.join()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    codes = [process.exitcode for process in processes]
    if stop["requested"] or 130 in codes:
        raise KeyboardInterrupt
    if any(codes):
        raise SweepError(f"worker exit codes {codes} (a negative code is the signal that killed it, -9 also by the "
                         f"out-of-memory killer): see the messages above; run the same command to resume")


def command_run(options):
    config = None
    given = [options.param, options.space, options.instance, options.seeds, options.aggregate, options.score,
             options.lower_is_better, options.sampler, options.sampler_seed, options.pruner]
    if any(value not in (None, [], False) for value in given):
        config = build_config(options)
    study_name = options.study_name
    if study_name is None:
        if config is None:
            raise SweepError("give --study-name to join or resume a study, or --instance and --param for a new one")
        study_name = f"{config['instances'][0][0].split(':')[-1]}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_study_name(study_name)
    location = storage_location(options.storage, study_name)
    storage = open_storage(location)
    study = open_or_create_study(storage, study_name, location, config)
    config = study.user_attrs[CONFIG_ATTR]
    n_trials = options.n_trials
    if n_trials is None:
        if config["sampler"] != "grid":
            raise SweepError(f"give --n-trials: the {config['sampler']} sampler has no natural end (it is the "
                             f"study's total, counting trials already run)")
        n_trials = grid_size(config["space"])
    tracking = {"track": options.track, "wandb_project_name": options.wandb_project_name,
                "wandb_entity": options.wandb_entity, "registry": registry_location(options.registry, options.storage)}
    print(f"study {study_name} in {redact(location)}: up to {n_trials} trials x {len(config['seeds'])} seeds x "
          f"{len(config['instances'])} instances, {min(options.workers, n_trials)} worker(s)", flush=True)
    for message in fail_trials_of_dead_workers(study, storage):
        print(message, flush=True)
    run_workers(study_name, location, n_trials, min(options.workers, n_trials), tracking)
    trials = study.get_trials(deepcopy=False)
    counts = Counter(trial.state.name for trial in trials)
    print(f"study {study_name}: " + ", ".join(f"{count} {state.lower()}" for state, count in sorted(counts.items())))
    if trials and all(trial.state == TrialState.FAIL for trial in trials):
        raise SweepError(f"every trial failed; the first, trial {trials[0].number}: "
                         f"{trials[0].user_attrs.get('error', 'see the messages above')}")
    storage_option = f" --storage {redact(options.storage)}" if options.storage else ""
    print(f"report: python sweep.py report --study-name {study_name}{storage_option}")


def fail_trials_of_dead_workers(study, storage):
    """Mark failed the RUNNING trials whose worker (host:pid, recorded as the trial started) ran on this host and
    is gone (SIGKILL, the out-of-memory killer) and queue each to run again, as Optuna's heartbeat does on a
    database: the journal would keep them running forever, and the budget would count them. Returns what was
    done, one line per trial."""
    host, messages = socket.gethostname(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker_host, _, pid = trial.user_attrs.get("worker", "").rpartition(":")
        if worker_host != host or not pid.isdigit() or process_exists(int(pid)):
            continue
        storage.set_trial_user_attr(trial._trial_id, "error", f"its worker {trial.user_attrs['worker']} died "
                                                              f"(killed, e.g. by the out-of-memory killer)")
        try:
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # another resuming command was first
            continue
        retried = len(trial.system_attrs.get("retry_history", [])) < MAX_RETRIES
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)(study, trial)
        messages.append(f"trial {trial.number}: its worker {trial.user_attrs['worker']} is gone; marked failed"
                        + (", queued to run again" if retried else f" (retried {MAX_RETRIES} times already)"))
    return messages


def process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def check_study_name(name):
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise SweepError(f"--study-name {name!r} may hold only letters, digits, '_', '.' and '-'")


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------

def find_run_dir(run):
    """The run's folder: where it was written, or runs/<name> here (after copying runs/ from another machine)."""
    for path in (Path(run["run_dir"]), Path("runs") / Path(run["run_dir"]).name):
        if path.is_dir():
            return path
    return None


def read_curve(run_dir, tag):
    """{global_step: value} of one TensorBoard tag of a run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    if tag not in accumulator.Tags()["scalars"]:
        return {}
    return {event.step: event.value for event in accumulator.Scalars(tag)}


def learning_curves(config, trials, tag):
    """Per instance and trial, the aggregate over seeds of a TensorBoard tag with its 95% band; and the runs whose
    folders are not on this machine."""
    curves, missing, runs_read = [], [], 0
    for trial in trials:
        for instance_index in range(len(config["instances"])):
            series = []
            for run in trial.user_attrs["runs"]:
                if run["instance"] != instance_index:
                    continue
                run_dir = find_run_dir(run)
                if run_dir is None:
                    missing.append(run)
                    continue
                series.append(read_curve(run_dir, tag))
                runs_read += 1
            if not series or not all(series):
                continue
            # Runs are evaluated at different steps: each is interpolated linearly onto all their steps, over
            # the span that every run covers.
            start, end = max(min(curve) for curve in series), min(max(curve) for curve in series)
            steps = sorted({step for curve in series for step in curve if start <= step <= end})
            values = np.array([np.interp(steps, sorted(curve), [curve[step] for step in sorted(curve)])
                               for curve in series])
            point, low, high = band(values, config["aggregate"])
            curves.append({"instance": instance_index, "trial": trial.number, "seeds": len(series),
                           "steps": np.array(steps), "value": point, "ci_low": low, "ci_high": high})
    if runs_read and not curves:
        raise SweepError(f"no curve has the tag '{tag}' in the runs of the best trials: give --curve-tag a "
                         f"TensorBoard tag they logged, e.g. eval/LTA_return or charts/learning_rate")
    return curves, missing


def reference_lines(instance, precision, exact_values):
    """For a queueing instance: each classical policy's LTA return with its 95% CI, simulated in steady state to
    `precision` (queueing.longrun); with `exact_values`, exact instead (on the same truncated chains as the optimum,
    which is added: seconds for small instances, many minutes for criss-cross; simulation where the state space is
    too large)."""
    env_id, kwargs = instance[0], json.loads(instance[1])
    if not env_id.split(":")[-1].startswith("QueueNetwork") or "instance" not in kwargs:
        return []
    import numpy as np

    from queueing import exact
    from queueing.baselines import POLICIES, make_policy
    from queueing.env import Network
    from queueing.longrun import long_run

    network = Network.from_instance(kwargs["instance"], kwargs.get("allocation"))
    lines, optimum = [], None
    for name in sorted(POLICIES):
        if exact_values:
            try:
                gap = exact.gap_until_converged(network, exact.DEFAULT_START_TRUNCATION, make_policy(name, network, exact=True))
                lines.append({"name": name, "value": gap.policy.lta_return, "half_width": 0.0})
                optimum = gap.optimum.lta_return
                continue
            except ValueError as error:  # too large for the exact solver: simulate
                print(f"no exact values for {instance_label(instance)}: {error}", file=sys.stderr)
                exact_values = False
        result = long_run(network, make_policy(name, network, np.random.default_rng(0)), precision=precision)
        lines.append({"name": name, "value": result.lta_return, "half_width": result.half_width})
    return lines + ([{"name": "optimal", "value": optimum, "half_width": 0.0}] if optimum is not None else [])


def format_interval(value, low, high):
    if math.isnan(low):
        return f"{value:.5g}"
    return f"{value:.5g} [{low:.5g}, {high:.5g}]"


def trial_rows(study, config):
    """One row per complete trial, best first: its parameters, objective with CI, its paired difference to the
    best trial with CI, and per-instance scores."""
    varied = [name for name, (kind, _) in config["space"].items() if kind != "fixed"]
    complete = [trial for trial in study.get_trials(deepcopy=False) if trial.state == TrialState.COMPLETE]
    complete.sort(key=lambda trial: trial.value, reverse=not config["lower_is_better"])
    labels = [instance_label(instance) for instance in config["instances"]]
    rows = []
    for rank, trial in enumerate(complete, start=1):
        runs = trial.user_attrs["runs"]
        per_instance = [[run["score"] for run in runs if run["instance"] == index] for index in range(len(labels))]
        _, low, high = interval(per_instance, config["aggregate"])
        difference = (math.nan, math.nan, math.nan) if rank == 1 else interval(
            paired_differences(runs, complete[0].user_attrs["runs"]), config["aggregate"])
        row = {"rank": rank, "trial": trial.number, **{name: trial.params[name] for name in varied},
               "score": trial.value, "ci_low": low, "ci_high": high,
               **dict(zip(("vs_best", "vs_best_ci_low", "vs_best_ci_high"), map(float, difference))),
               "runs": len(runs)}
        if len(labels) > 1:
            for label, scores in zip(labels, per_instance):
                row[label], row[f"{label} ci_low"], row[f"{label} ci_high"] = map(float, interval([scores],
                                                                                              config["aggregate"]))
        rows.append(row)
    return complete, varied, labels, rows


def write_report(study, out_dir, top=5, tag="eval/LTA_return", baseline_precision=0.02, exact_optimum=False,
                 registry=None):
    """Write table.md, table.csv, curves.csv, references.csv and the PNG plots; return their paths. `registry` is
    the checkpoint registry the runs fed (None: the trainer's default)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    config = study.user_attrs.get(CONFIG_ATTR)
    if config is None:
        raise SweepError(f"study '{study.study_name}' was not made by sweep.py")
    complete, varied, labels, rows = trial_rows(study, config)
    best = complete[:top]
    curves, missing = learning_curves(config, best, tag)  # before writing anything: it checks the tag
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    statistic = {"mean": "mean", "iqm": "interquartile mean"}[config["aggregate"]]
    paths = {"table_csv": out_dir / "table.csv", "table_md": out_dir / "table.md", "curves_csv": out_dir / "curves.csv",
             "references_csv": out_dir / "references.csv", "curves_png": out_dir / "learning_curves.png",
             "history_png": out_dir / "optimization_history.png"}

    header = ["rank", "trial", *varied, "score", "ci_low", "ci_high", "vs_best", "vs_best_ci_low", "vs_best_ci_high",
              "runs"]
    header += [f"{label}{part}" for label in labels for part in ("", " ci_low", " ci_high")] if len(labels) > 1 else []
    with open(paths["table_csv"], "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)

    with open(paths["curves_csv"], "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["instance", "trial", "seeds", "step", "value", "ci_low", "ci_high"])
        for curve in curves:
            for row in zip(curve["steps"], curve["value"], curve["ci_low"], curve["ci_high"]):
                writer.writerow([labels[curve["instance"]], curve["trial"], curve["seeds"], *row])
    references = [reference_lines(instance, baseline_precision, exact_optimum) for instance in config["instances"]]
    with open(paths["references_csv"], "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["instance", "policy", "value", "half_width"])
        for label, lines in zip(labels, references):
            writer.writerows([label, line["name"], line["value"], line["half_width"]] for line in lines)

    params = {trial.number: ", ".join(f"{name}={trial.params[name]:.3g}" if isinstance(trial.params[name], float)
                                      else f"{name}={trial.params[name]}" for name in varied) for trial in best}
    if curves or any(references):
        figure, axes = plt.subplots(len(labels), 1, figsize=(10, 4 * len(labels)), squeeze=False)
        for index, (axis, label, lines) in enumerate(zip(axes[:, 0], labels, references)):
            for curve in (curve for curve in curves if curve["instance"] == index):
                line, = axis.plot(curve["steps"], curve["value"],
                                  label=f"trial {curve['trial']}: {params[curve['trial']]}".rstrip(": "))
                axis.fill_between(curve["steps"], curve["ci_low"], curve["ci_high"], color=line.get_color(), alpha=0.2)
            for color, reference in zip(plt.cm.Dark2.colors, lines):
                style = ({"color": "black", "linestyle": "--"} if reference["name"] == "optimal"
                         else {"color": color, "linestyle": ":"})
                axis.axhline(reference["value"], label=reference["name"], **style)
            axis.set(title=label, xlabel="environment steps",
                     ylabel=f"{tag} ({statistic} over seeds, {CONFIDENCE:.0%} CI)")
            axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
        figure.tight_layout()
        figure.savefig(paths["curves_png"], dpi=100)
        plt.close(figure)
    else:  # no trial completed and no reference line: nothing to draw
        del paths["curves_png"]

    if complete:
        optuna_plots.plot_optimization_history(study).figure.savefig(paths["history_png"], dpi=100, bbox_inches="tight")
        if varied and all(len({trial.params[name] for trial in complete}) > 1 for name in varied):
            paths["importances_png"] = out_dir / "param_importances.png"
            optuna_plots.plot_param_importances(study).figure.savefig(paths["importances_png"], dpi=100,
                                                                       bbox_inches="tight")
        plt.close("all")
    else:
        del paths["history_png"]

    paths["table_md"].write_text(markdown_report(study, config, trials, varied, labels, rows, top, missing, paths,
                                                 registry))
    return paths


def interval_method(config, instances):
    """How the report's intervals are computed, in one sentence."""
    if config["aggregate"] == "iqm":
        method = ("Tukey-McLaughlin t intervals of the interquartile mean over all runs pooled (winsorized standard "
                  "error, n - 2g - 1 degrees of freedom; its coverage measured at 92-93% on normal scores); "
                  "per-instance columns and curves with fewer than 4 seeds are means with Student-t intervals")
    elif instances > 1:
        method = ("Student-t intervals over seeds, stratified by instance (the mean over instances of the per-instance "
                  "means; variances combined across instances, Welch-Satterthwaite degrees of freedom)")
    else:
        method = "Student-t intervals over seeds"
    statistic = {"mean": "mean", "iqm": "interquartile mean"}[config["aggregate"]]
    return (f"Intervals are {CONFIDENCE:.0%} CIs: {method}. 'vs best (paired)' is the {statistic}, over the "
            f"(seed, instance) runs both trials made, of this trial's score minus the best trial's: they share "
            f"training and evaluation seeds, so the noise common to both cancels; its interval is computed in the "
            f"same way over those differences.")


def markdown_report(study, config, trials, varied, labels, rows, top, missing, paths, registry=None):
    counts = Counter(trial.state.name.lower() for trial in trials)
    statistic = {"mean": "mean", "iqm": "interquartile mean"}[config["aggregate"]]
    fixed = {name: payload for name, (kind, payload) in config["space"].items() if kind == "fixed"}
    lines = [f"# Study {study.study_name}", "",
             f"{len(trials)} trials: " + ", ".join(f"{count} {state}" for state, count in sorted(counts.items())) + ".",
             f"Objective: the {statistic} over {len(config['seeds'])} seeds x {len(labels)} instances of each run's "
             f"evaluated LTA return ({config['score']}.pt), {'lower' if config['lower_is_better'] else 'higher'} is "
             f"better.", interval_method(config, len(labels)),
             f"Seeds {config['seeds']}; instances: {', '.join(labels)}.",
             f"Fixed options: {json.dumps(fixed) if fixed else 'none'}.", "",
             f"## Best {min(top, len(rows))} configurations", ""]
    columns = ["rank", "trial", *varied, "score", "vs best (paired)", "runs"] + (labels if len(labels) > 1 else [])
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows[:top]:
        cells = [row["rank"], row["trial"], *(row[name] for name in varied),
                 format_interval(row["score"], row["ci_low"], row["ci_high"]),
                 "best" if row["rank"] == 1 else format_interval(row["vs_best"], row["vs_best_ci_low"],
                                                                 row["vs_best_ci_high"]), row["runs"]]
        cells += [format_interval(row[label], row[f"{label} ci_low"], row[f"{label} ci_high"])
                  for label in labels] if len(labels) > 1 else []
        lines.append("| " + " | ".join(f"{cell:.5g}" if isinstance(cell, float) else str(cell) for cell in cells)
                     + " |")
    failed = [trial for trial in trials if trial.state == TrialState.FAIL]
    if failed:
        lines += ["", "## Failed trials", "", "| trial | parameters | error |", "|---|---|---|"]
        lines += [f"| {trial.number} | {json.dumps(trial.params)} | {trial.user_attrs.get('error', '?')} |"
                  for trial in failed]
    if missing:
        hosts = sorted({run["host"] for run in missing})
        lines += ["", f"{len(missing)} runs of the best trials have no folder here (trained on {', '.join(hosts)}): "
                      f"copy their runs/ folders here to draw their curves."]
    lines += ["", "## Files", ""] + [f"- `{path.name}`" for path in paths.values()]
    trained = sorted({run["instance"] for trial in trials for run in trial.user_attrs.get("runs", [])})
    if trained:  # a study whose trials all failed has no checkpoint (and perhaps an instance that does not exist)
        keys = [instance_key(config["instances"][index][0], json.loads(config["instances"][index][1]))
                for index in trained]
        option = f" --registry {redact(registry)}" if registry else ""
        lines += ["", "## Registry entries of this study", "",
                  "The best checkpoints per instance, over this study and every other run:", ""]
        lines += [f"    python checkpoint_saver.py{option} --instance {key}" for key in keys]
        lines += ["", "Those of this study's trials (export one: `python checkpoint_saver.py export INSTANCE --rank N"
                      f"{option}`):", ""] + registry_table(registry or DEFAULT_ROOT, keys, trials)
    return "\n".join(lines) + "\n"


def registry_table(registry, keys, trials):
    """Markdown rows linking trials to their runs' entries in the registry, by instance and rank."""
    trial_of = {Path(run["run_dir"]).name: trial.number for trial in trials for run in trial.user_attrs.get("runs", [])}
    rows = ["| trial | instance | rank | score | step | host |", "|---|---|---|---|---|---|"]
    for key in keys:
        try:
            stored = read_instance(registry, key)
        except (OSError, RegistryError) as error:
            return [f"The registry cannot be read here: {error}"]
        for rank, entry in enumerate(stored["entries"] if stored else [], start=1):
            if entry["run_name"] in trial_of:
                rows.append(f"| {trial_of[entry['run_name']]} | {key} | {rank} | {entry['score']:.5g} ± "
                            f"{entry['half_width']:.2g} | {entry['global_step']} | {entry['host'] or '?'} |")
    return rows if len(rows) > 2 else ["None of them is among the best checkpoints."]


def command_report(options):
    check_study_name(options.study_name)
    location = storage_location(options.storage, options.study_name)
    if "://" not in location and not Path(location).exists():
        raise SweepError(f"no study storage at {location}: give --storage as for `sweep.py run`")
    study = load_study(open_storage(location), options.study_name, location)
    out_dir = options.out or SWEEPS_DIR / options.study_name / "report"
    paths = write_report(study, out_dir, options.top, options.curve_tag, options.baseline_precision, options.exact_optimum,
                         registry_location(options.registry, options.storage))
    print(Path(paths["table_md"]).read_text())
    print(f"wrote {', '.join(str(path) for path in paths.values())}")


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message}\n")


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def parser():
    root = OneLineErrorParser(prog="python sweep.py", description=__doc__.split("\n\n")[0])
    commands = root.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)
    run = commands.add_parser("run", help="run (or join, or resume) a study")
    run.add_argument("--study-name", help="the study to create, join or resume (default: a new name)")
    run.add_argument("--storage", help="database URL (postgresql://user:password@host/db) shared by many machines, "
                                       "or a journal file path (default: runs/sweeps/NAME/optuna.journal)")
    run.add_argument("--instance", action="append", default=[], metavar="'ENV_ID [JSON]'",
                     help="a problem instance: env id, then optionally its env kwargs as JSON; repeat for several")
    run.add_argument("--seeds", type=int, nargs="+", help="seeds of every configuration (default: 1)")
    run.add_argument("--param", action="append", default=[], metavar="NAME=SPEC",
                     help="a trainer option: a value (3e-4), choices ([1e-3,3e-4]) or a distribution "
                          "(loguniform(1e-5,1e-2), uniform(a,b), int(a,b), logint(a,b)); repeat")
    run.add_argument("--space", help="a YAML or JSON file mapping trainer options to such specs")
    run.add_argument("--sampler", choices=["grid", "random", "tpe"],
                     help="default: grid when the space has only choices, else tpe")
    run.add_argument("--sampler-seed", type=int, help="seed of the sampler (offset by the worker index)")
    run.add_argument("--n-trials", type=positive_int,
                     help="trials in the study in total, counting earlier ones (default for grid: the grid's size)")
    run.add_argument("--pruner", choices=["median", "wilcoxon", "hyperband", "none"],
                     help="stop poor trials early: median/hyperband within runs, at shared spans of steps; "
                          "wilcoxon after each run, paired with the best trial's (default: median)")
    run.add_argument("--aggregate", choices=sorted(AGGREGATES), help="over seeds x instances (default: mean)")
    run.add_argument("--score", choices=["best", "final"],
                     help="each run's score: the evaluation of its best.pt (default) or final.pt")
    run.add_argument("--lower-is-better", action="store_true", default=None, help="the LTA return is a cost")
    run.add_argument("--workers", type=positive_int, default=1, help="trials in parallel processes on this machine")
    run.add_argument("--registry", help="checkpoint registry of every run: a database URL or a folder (default: "
                                        "the --storage database if it is a URL, else runs/checkpoints)")
    run.add_argument("--track", action="store_true", help="log every run to Weights & Biases")
    run.add_argument("--wandb-project-name", default="ppo_continuous")
    run.add_argument("--wandb-entity")
    report = commands.add_parser("report", help="tables and plots of a study")
    report.add_argument("--study-name", required=True)
    report.add_argument("--storage", help="as given to `sweep.py run`")
    report.add_argument("--registry", help="as given to `sweep.py run`")
    report.add_argument("--out", help="output folder (default: runs/sweeps/NAME/report)")
    report.add_argument("--top", type=positive_int, default=5, help="configurations in the table and plots")
    report.add_argument("--curve-tag", default="eval/LTA_return", help="TensorBoard tag of the learning curves")
    report.add_argument("--baseline-precision", type=float, default=0.02,
                        help="relative 95%% CI half-width of the simulated classical policies (queueing reference lines)")
    report.add_argument("--exact-optimum", action="store_true",
                        help="exact values of the classical policies and the optimum of queueing instances, instead of "
                             "simulated ones (minutes for criss-cross)")
    return root


def main(argv=None):
    options = parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        if options.command == "run":
            command_run(options)
        else:
            command_report(options)
    except SweepError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print("interrupted: finished trials are in the study; run the same command to resume", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
