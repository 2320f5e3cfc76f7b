"""What `ppo_continuous.py` hands off, so that file reads as PPO and its training loop.

Nothing here needs reading to follow the algorithm: making and checking environments, the agent's forward pass
in numpy (the CPU fast path of rollouts and evaluation), the evaluation protocol that scores every candidate and
the selection of candidates (when to evaluate, the best, patience), checkpoint files and `--eval-only`/`--compare`,
the run folder and its loggers, the terminal and the process state a run borrows, grouped `--help`, Adam
without torch.optim's slow import, and the compiled update (`--compile`). Two parts mirror the agent and its
update, and must change with them: the numpy forward pass (checked against the agent at the start of every run,
`check_numpy_mirrors`) and the compiled update (given `ppo_loss`; it mirrors the rest of `minibatch_update`). Copy
this file, with `checkpoint_saver.py`, beside `ppo_continuous.py`.
"""

import ast
import collections
import contextlib
import dataclasses
import functools
import hashlib
import inspect
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from gymnasium.vector import AutoresetMode
from gymnasium.wrappers.utils import RunningMeanStd
from scipy.special import stdtrit  # = scipy.stats.t.ppf(q, dof); importing scipy.stats would add ~1 s
from threadpoolctl import threadpool_limits
from torch.optim.adam import adam as functional_adam
from torch.utils.tensorboard import SummaryWriter

from checkpoint_saver import CheckpointSaver, RegistryError, legacy_hint


class TrainError(Exception):
    """Bad options or input files: the command line prints the message as one line and exits with status 2."""


# ---------------------------------------------------------------------------------------------------------------
# Environments
# ---------------------------------------------------------------------------------------------------------------

def check_env(env_id, env_kwargs):
    """Make one env and take one step, so a bad id, bad kwargs or an env failing at its first step is one line.

    Returns what the trainer needs to know of it: observation size, action space, the env's own time limit,
    whether it declares itself continuing, whether it has a native vector implementation, and the problem
    definition it offers (env kwargs that rebuild it from any directory, as `env.unwrapped.network` of the queueing
    envs does; else None).
    """
    try:
        env = gym.make(env_id, **env_kwargs)
    except gym.error.Error as error:
        raise TrainError(f"cannot make env '{env_id}': {error}") from None
    except ModuleNotFoundError as error:
        raise TrainError(f"cannot make env '{env_id}': {error} (the part before ':' must be an importable "
                         f"module)") from None
    except (TypeError, ValueError) as error:
        raise TrainError(f"cannot make env '{env_id}' with --env-kwargs {json.dumps(env_kwargs)}: {error}") from None
    if not isinstance(env.action_space, gym.spaces.Box):
        raise TrainError(f"env '{env_id}' has action space {env.action_space}: only continuous (Box) action "
                         f"spaces are supported")
    if not isinstance(env.observation_space, gym.spaces.Box) or len(env.observation_space.shape) != 1:
        raise TrainError(f"env '{env_id}' has observation space {env.observation_space}: only flat Box "
                         f"observations are supported")
    try:
        env.reset(seed=0)
        env.step(env.action_space.sample())
    except Exception as error:
        raise TrainError(f"env '{env_id}' with --env-kwargs {json.dumps(env_kwargs)} fails at its first step "
                         f"({type(error).__name__}: {error})") from None
    finally:
        env.close()
    definition = getattr(getattr(env.unwrapped, "network", None), "problem_definition", None)
    return {"obs_size": env.observation_space.shape[0], "action_space": env.action_space,
            "time_limit": env.spec.max_episode_steps, "continuing": bool(env.metadata.get("continuing", False)),
            "native_vector": env.spec.vector_entry_point is not None,
            # Plain JSON types, as a checkpoint that loads with weights_only=True must hold.
            "problem_definition": None if definition is None else json.loads(json.dumps(definition))}


def make_vector_env(env_id, env_kwargs, num_envs, max_episode_steps, native_vector, async_envs=False):
    """`num_envs` copies with SAME_STEP autoreset (so `final_obs` is the true final observation): the env's own
    vector implementation when it has one (all copies in one call), else one env per copy."""
    if native_vector and not async_envs:
        envs = gym.make_vec(env_id, num_envs, "vector_entry_point", max_episode_steps=max_episode_steps,
                            **env_kwargs)
    else:
        envs = gym.make_vec(env_id, num_envs, "async" if async_envs else "sync", max_episode_steps=max_episode_steps,
                            vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP}, **env_kwargs)
    if envs.metadata.get("autoreset_mode") != AutoresetMode.SAME_STEP:
        envs.close()
        raise TrainError(f"env '{env_id}' does not autoreset in SAME_STEP mode (gymnasium {gym.__version__}): "
                         f"the truncation bootstrap needs it; use gymnasium 1.1 or later")
    return envs


class RewardMeter(gym.vector.VectorWrapper):
    """Sums the rewards of all envs until `take()` returns their average per step and starts again: on a continuing
    task, the average reward of the last rollout is an LTA measurement that needs no episode to end."""

    def __init__(self, env):
        super().__init__(env)
        self.total, self.steps = 0.0, 0

    def step(self, actions):
        obs, reward, terminated, truncated, info = self.env.step(actions)
        self.total, self.steps = self.total + float(np.sum(reward)), self.steps + len(reward)
        return obs, reward, terminated, truncated, info

    def take(self):
        average = self.total / self.steps if self.steps else math.nan
        self.total, self.steps = 0.0, 0
        return average


# ---------------------------------------------------------------------------------------------------------------
# The agent in numpy: the same weights and math, without a torch call per step
# ---------------------------------------------------------------------------------------------------------------

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def numpy_layers(net):
    """The (weight transposed, bias) of each Linear of `net` (an `mlp`), as numpy views of its weights."""
    modules = list(net)
    expected = [nn.Linear, nn.Tanh] * (len(modules) // 2) + [nn.Linear]
    if [type(module) for module in modules] != expected:
        raise TypeError(f"the numpy mirrors take Linear/Tanh MLPs only, got {[type(m).__name__ for m in modules]}: "
                        f"update it together with `mlp` (ppo_continuous.py)")
    return [(layer.weight.detach().cpu().numpy().T, layer.bias.detach().cpu().numpy()) for layer in modules[::2]]


def numpy_forward(layers, x):
    for weight, bias in layers[:-1]:
        x = np.tanh(x @ weight + bias)
    weight, bias = layers[-1]
    return x @ weight + bias


def numpy_mlp(net):
    """`net` (an `mlp`) as a numpy function of a batch, sharing its weights (views, no copy).

    On a CPU a numpy forward of a small MLP costs a fraction of a torch call, which otherwise costs more than the
    env step itself. Float rounding differs from torch's in the last bits (README, Speed).
    """
    return functools.partial(numpy_forward, numpy_layers(net))


def block_diagonal(upper_left, lower_right):
    """scipy.linalg.block_diag of two matrices, without its import (~0.14 s of every run's start)."""
    (rows, columns), dtype = upper_left.shape, upper_left.dtype
    matrix = np.zeros((rows + lower_right.shape[0], columns + lower_right.shape[1]), dtype=dtype)
    matrix[:rows, :columns], matrix[rows:, columns:] = upper_left, lower_right
    return matrix


def numpy_policy(agent):
    """The agent as `(obs, noise) -> (action, log_prob, value)` in numpy, for the per-step rollout: the same
    weights and math as `get_action_and_value`, with the Gaussian noise given.

    Actor and critic run as one MLP of twice the width (first layers side by side, the others block-diagonal):
    half the numpy calls, which with one env cost more than their arithmetic. It copies the weights, so it is built
    again after each learning phase."""
    actor, critic = numpy_layers(agent.actor_mean), numpy_layers(agent.critic)
    if len(actor) != len(critic):
        raise TypeError("numpy_policy runs actor and critic side by side, so they need the same number of layers: "
                        "update it together with `Agent` (ppo_continuous.py)")
    layers = [(np.concatenate([actor[0][0], critic[0][0]], axis=1), np.concatenate([actor[0][1], critic[0][1]]))]
    layers += [(block_diagonal(actor_weight, critic_weight), np.concatenate([actor_bias, critic_bias]))
               for (actor_weight, actor_bias), (critic_weight, critic_bias) in zip(actor[1:], critic[1:])]
    log_std = agent.actor_logstd.detach().cpu().numpy()
    std, action_size = np.exp(log_std), log_std.shape[-1]
    log_prob_constant = (-log_std - LOG_SQRT_2PI).sum(-1)

    def act(obs, noise):
        output = numpy_forward(layers, obs)
        log_prob = log_prob_constant - 0.5 * (noise * noise).sum(-1)  # = gaussian_log_prob(action, ...)
        return output[:, :action_size] + std * noise, log_prob, output[:, action_size]

    return act


def deterministic_numpy_policy(agent, obs_stats, clip_obs):
    """Raw observations -> `get_deterministic_action`, with frozen normalisation statistics (None: no
    normalisation): the policy that evaluation scores, as numpy."""
    actor, env_action = numpy_mlp(agent.actor_mean), env_action_map(agent)
    mean, var = (None, None) if obs_stats is None else (np.array(obs_stats[0]), np.array(obs_stats[1]))

    def act(raw_obs):
        obs = np.asarray(raw_obs, dtype=np.float32)
        if mean is not None:
            obs = normalize_observation(obs, mean, var, clip_obs)
        return env_action(actor(obs))

    return act


def env_action_map(agent):
    """The agent's raw (Gaussian) action -> the env's action: clipped into the bounds, or squashed with tanh.

    PPO (ppo_continuous.py) keeps the raw sample and its Gaussian log-probability: the map is fixed, so the
    probability ratio is the same before and after it. Squashing keeps every sample distinct where clipping makes
    all samples beyond a bound equal, which stops exploration and starves the gradient once a mean leaves the bounds.
    """
    low, high = agent.action_low.cpu().numpy(), agent.action_high.cpu().numpy()
    if agent.squash_actions:
        return lambda action: low + (high - low) * (np.tanh(action) + 1) / 2
    return lambda action: np.clip(action, low, high)


def check_numpy_mirrors(agent):
    """Raise if the numpy policies no longer compute what the agent computes (after an edit of `Agent`, say):
    the rollout's log-probabilities and values, and the deterministic actions that evaluation scores."""
    generator, device = torch.Generator().manual_seed(0), agent.action_low.device
    obs = torch.randn(8, agent.actor_mean[0].in_features, generator=generator)
    noise = torch.randn(8, agent.actor_logstd.shape[1], generator=generator)
    action, log_prob, value = numpy_policy(agent)(obs.numpy(), noise.numpy())
    with torch.no_grad():
        _, torch_log_prob, _, torch_value = agent.get_action_and_value(obs.to(device),
                                                                       torch.from_numpy(action).to(device))
        torch_action = agent.get_deterministic_action(obs.to(device))
    for name, mirror, reference in [("log-probabilities", log_prob, torch_log_prob), ("values", value, torch_value),
                                    ("deterministic actions", deterministic_numpy_policy(agent, None, math.inf)(
                                        obs.numpy()), torch_action)]:
        if not np.allclose(mirror, reference.cpu().numpy(), rtol=1e-4, atol=1e-4):
            raise RuntimeError(f"the numpy policy's {name} differ from the agent's: update the numpy mirrors "
                               f"(ppo_support.py) together with `Agent`")


def next_state_distribution_of(envs, env_id, action_size):
    """`--expected-td`: the vector env's `next_state_distribution(actions) -> (observations (N, M, obs),
    probabilities (N, M))`, probed once; TrainError where the env has none or cannot give it."""
    method = getattr(envs.unwrapped, "next_state_distribution", None)
    if method is None:
        raise TrainError(f"--expected-td needs a vector env with a next_state_distribution method (the queueing "
                         f"networks in continuous time, without --async-envs); env '{env_id}' has none: drop the flag")
    try:
        method(np.zeros((envs.num_envs, action_size), dtype=np.float32))
    except ValueError as error:
        raise TrainError(f"--expected-td: {error}; drop the flag") from None
    return method


class RunningStats(RunningMeanStd):
    """gymnasium's RunningMeanStd with the same numbers, minus np.mean's and np.var's ~13-20 µs of overhead per
    update for a one-row batch (one env), whose mean is the row and whose variance is 0. The trainer updates two
    every step: the observation statistics and the reward scaler's return statistics."""

    def update(self, batch):
        if len(batch) != 1:
            return super().update(batch)
        # gymnasium's update_mean_var_count_from_moments with a batch of one row: the same operations in the same
        # order, less those that add zero or multiply by one.
        delta, total = batch[0] - self.mean, self.count + 1
        self.mean = self.mean + delta / total
        self.var = (self.var * self.count + np.square(delta) * self.count / total) / total
        self.count = total


def normalize_observation(obs, mean, var, clip):
    """What every observation goes through before the networks see it (gymnasium's formula)."""
    return np.clip((obs - mean) / np.sqrt(var + 1e-8), -clip, clip).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# The evaluation protocol
# ---------------------------------------------------------------------------------------------------------------

CONTINUING_EVAL_DEFAULTS = {"episodes": 128, "horizon": 20_000, "warmup": 2_500}
EPISODIC_EVAL_EPISODES = 10


def evaluation_protocol(args, env_info):
    """How every candidate of this problem instance is scored: the same for all runs, whatever their training
    options (`--reset-steps`, `--num-envs`), so scores are comparable and the registry can rank them."""
    continuing = env_info["continuing"] if args.eval_continuing is None else args.eval_continuing
    if continuing:
        defaults = CONTINUING_EVAL_DEFAULTS
    else:
        if args.eval_warmup:
            raise TrainError("--eval-warmup applies to continuing tasks only: add --eval-continuing to score "
                             "this env as one")
        defaults = {"episodes": EPISODIC_EVAL_EPISODES, "horizon": env_info["time_limit"], "warmup": 0}
    protocol = {"kind": "continuing" if continuing else "episodic",
                "episodes": args.eval_episodes or defaults["episodes"],
                "horizon": args.eval_horizon or defaults["horizon"],
                "warmup": defaults["warmup"] if args.eval_warmup is None else args.eval_warmup,
                "seed": args.eval_seed}
    if protocol["horizon"] is None:
        raise TrainError(f"env '{args.env_id}' has no time limit, so evaluation episodes would never end: "
                         f"give --eval-horizon")
    if protocol["episodes"] < 2:
        raise TrainError(f"--eval-episodes must be at least 2 for a confidence interval, got {protocol['episodes']}")
    return protocol


def evaluate(policy, env_id, env_kwargs, protocol, native_vector):
    """Score a deterministic policy (raw observations -> actions) under `protocol`, in raw reward units.

    Copy i of `episodes` copies starts from seed `seed + i` (the same streams for every candidate: common random
    numbers), runs `warmup` steps that are discarded, then is scored over at most `horizon` steps: its LTA
    return is its reward per scored step, until its episode ends (episodic) or over the whole horizon
    (continuing). The copies are independent, so the t-interval across them is the 95% confidence interval.
    """
    copies, warmup, length = protocol["episodes"], protocol["warmup"], protocol["warmup"] + protocol["horizon"]
    envs = make_vector_env(env_id, env_kwargs, copies, length, native_vector)
    try:
        obs, _ = envs.reset(seed=protocol["seed"])
        returns, lengths, ended = np.zeros(copies), np.zeros(copies), np.zeros(copies, dtype=bool)
        for step in range(length):
            obs, reward, terminated, truncated, _ = envs.step(policy(obs))
            if protocol["kind"] == "continuing" and terminated.any():
                raise TrainError(f"env '{env_id}' terminated an episode, so it is not a continuing task: "
                                 f"evaluate it with --no-eval-continuing")
            if step >= warmup:
                returns += np.where(ended, 0.0, reward)
                lengths += ~ended
            ended |= terminated | truncated
            if ended.all():
                break
    finally:
        envs.close()
    per_episode = returns / lengths
    mean, half_width = mean_confidence_interval(per_episode)
    return {"mean": mean, "half_width": half_width, "episodes": copies, "protocol": protocol,
            "per_episode": per_episode.tolist()}


def format_score(evaluation):
    return f"{evaluation['mean']:.6g} +- {evaluation['half_width']:.3g}"


# What an evaluation step costs, in training steps (measured: criss-cross 1/24, HalfCheetah-v4 1/2): with the env's
# native vector implementation all copies step in one call and the policy runs once for all of them.
EVAL_STEP_COST = {"native_vector": 1 / 20, "one_env_per_copy": 1 / 2}
# By default, the evaluations of an interval cost at most this share of its training.
EVAL_COST_SHARE = 0.5


def default_eval_every(total_timesteps, batch_size, protocol, nominated_per_interval, native_vector):
    """A tenth of the run (at least one rollout), but never so often that the evaluations of an interval (the
    periodic one and the nominated ones) cost more than EVAL_COST_SHARE of its training, at the measured relative
    cost of an evaluation step: so evaluation stays a minority of a short run, and long runs keep ten periodic
    evaluations under the same protocol. Steps only: the same for every machine."""
    evaluation_steps = protocol["episodes"] * (protocol["warmup"] + protocol["horizon"])
    cost = EVAL_STEP_COST["native_vector" if native_vector else "one_env_per_copy"]
    floor = math.ceil((1 + nominated_per_interval) * evaluation_steps * cost / EVAL_COST_SHARE)
    return max(total_timesteps // 10, batch_size, floor)


class CandidateSelection:
    """Which agents are evaluated, which evaluated agent is the best, and when patience runs out: a function of
    steps and scores only, so one seed selects the same best.pt and stops at the same step on any machine.

    Periodic evaluations fall on the grid `start + k * every` (at the first rollout end at or after each point).
    A new best training measurement nominates the agent; at most `nominated_per_interval` nominated agents are
    evaluated between two grid points. Patience counts evaluations in a row that did not beat the best.
    """

    def __init__(self, start_step, every, nominated_per_interval, patience=None, lower_is_better=False):
        self.start, self.every, self.quota, self.patience = start_step, every, nominated_per_interval, patience
        self.better = (lambda a, b: a < b) if lower_is_better else (lambda a, b: a > b)
        self.best_measurement, self.nominated = math.nan, False
        self.interval, self.nominated_in_interval = 0, 0
        self.best, self.evaluations_since_best = None, 0

    def measured(self, value):
        """A training measurement of the current agent; True if it is the best so far (it nominates the agent)."""
        if math.isfinite(value) and (math.isnan(self.best_measurement) or self.better(value, self.best_measurement)):
            self.best_measurement, self.nominated = value, True
            return True
        return False

    def due(self, step):
        """Whether the agent at `step` is to be evaluated: a grid point has passed, or it is nominated and this
        interval still allows a nominated evaluation."""
        return (step - self.start) // self.every > self.interval or (self.nominated and
                                                                    self.nominated_in_interval < self.quota)

    def evaluated(self, step, evaluation):
        """Record the evaluation (a dict with the score as "mean") of the agent at `step`; True if it is the new
        best. The first evaluation is always the best so far."""
        interval = (step - self.start) // self.every
        if interval > self.interval:
            self.interval, self.nominated_in_interval = interval, 0
        else:
            self.nominated_in_interval += 1
        self.nominated = False
        if self.best is None or self.better(evaluation["mean"], self.best["mean"]):
            self.best, self.evaluations_since_best = evaluation, 0
            return True
        self.evaluations_since_best += 1
        return False

    @property
    def out_of_patience(self):
        return bool(self.patience) and self.evaluations_since_best >= self.patience


def paired_difference(first, second, confidence=0.95):
    """`first - second` of two evaluations under one protocol: episode i of both faced the same seeds (common random
    numbers), so the Student-t interval is over the n paired differences. `unpaired_half_width` is what Welch's
    interval would give for the same scores taken as independent, for comparison."""
    a, b = np.asarray(first["per_episode"]), np.asarray(second["per_episode"])
    if first["protocol"] != second["protocol"] or len(a) != len(b):
        raise ValueError("a paired difference needs two evaluations under the same protocol")
    mean, half_width = mean_confidence_interval(a - b, confidence)
    var_a, var_b = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    dof = (var_a + var_b) ** 2 / ((var_a ** 2 + var_b ** 2) / (len(a) - 1)) if var_a + var_b > 0 else len(a) - 1
    unpaired = float(stdtrit(dof, 0.5 + confidence / 2) * math.sqrt(var_a + var_b))
    return {"mean": mean, "half_width": half_width, "episodes": len(a), "unpaired_half_width": unpaired}


def mean_confidence_interval(values, confidence=0.95):
    """The mean of independent measurements and the half-width of its Student-t confidence interval."""
    values = np.asarray(values, dtype=np.float64)
    sem = values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean()), float(stdtrit(len(values) - 1, 0.5 + confidence / 2) * sem)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint files
# ---------------------------------------------------------------------------------------------------------------

CHECKPOINT_KEYS = ("agent", "obs_size", "action_size", "obs_rms", "reward_rms", "optimizers", "args", "counters")


def read_checkpoint(path, name=None):
    """The checkpoint in `path`: a file, or a binary file object that messages call `name`."""
    name = path if name is None else name
    try:
        with warnings.catch_warnings():  # torch's remarks on the pickle protocol of a file it then refuses
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._weights_only_unpickler")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        raise TrainError(f"cannot read checkpoint '{name}': {error.strerror or error}") from None
    except Exception as error:  # whatever bytes the file holds; torch's own advice would be to load it unsafely
        raise TrainError(f"cannot read checkpoint '{name}': the file is corrupt or not a checkpoint (torch.load "
                         f"with weights_only=True raised {type(error).__name__})") from None
    if not isinstance(checkpoint, dict) or not all(key in checkpoint for key in CHECKPOINT_KEYS):
        raise TrainError(f"'{name}' is not a checkpoint of ppo_continuous.py (it lacks the keys "
                         f"{', '.join(CHECKPOINT_KEYS)})")
    return checkpoint


def check_fits_env(checkpoint, path, env_id, env_info):
    """Raise TrainError if the checkpoint's network does not take this env's observations or give its actions."""
    sizes = (env_info["obs_size"], env_info["action_space"].shape[0])
    if (checkpoint["obs_size"], checkpoint["action_size"]) != sizes:
        raise TrainError(f"checkpoint '{path}' has observation/action sizes {checkpoint['obs_size']}/"
                         f"{checkpoint['action_size']}, but env '{env_id}' has {sizes[0]}/{sizes[1]}: give the "
                         f"--env-id (and --env-kwargs) it was trained on")


def check_output_file(path, option):
    """Raise TrainError before any work is done if `path` cannot be written as a file."""
    path = Path(path)
    if path.is_dir():
        raise TrainError(f"{option} '{path}' is a folder: give a file name")
    if not path.parent.is_dir():
        raise TrainError(f"{option} '{path}': '{path.parent}' is not an existing folder: create it or give another "
                         f"path")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise TrainError(f"{option} '{path}' is not writable: give another path")


def observation_stats(checkpoint):
    """The frozen (mean, var) of the checkpoint's observation normalisation, or None without it."""
    stats = checkpoint["obs_rms"]
    return None if stats is None else (stats["mean"].numpy(), stats["var"].numpy())


def rms_state(rms):
    return None if rms is None else {"mean": torch.as_tensor(rms.mean), "var": torch.as_tensor(rms.var),
                                     "count": float(rms.count)}


def load_rms_state(rms, state):
    rms.mean, rms.var, rms.count = state["mean"].numpy().copy(), state["var"].numpy().copy(), state["count"]


def score_checkpoints(args, env_kwargs, agent_from_checkpoint):
    """`--eval-only` (`args.eval_only`) or `--compare` (`args.compare`, A and B scored under A's protocol on the
    same seeds, and A - B paired) of ppo_continuous.py, given its resolved options and `agent_from_checkpoint(
    checkpoint, path)`. Every check comes before any evaluation. Prints the scores, writes them to `args.eval_json`
    if given, and returns them."""
    paths = [args.eval_only] if args.eval_only else list(args.compare)
    if args.eval_json:
        check_output_file(args.eval_json, "--eval-json")
    with global_state(args):
        checkpoints = [read_checkpoint(path) for path in paths]
        trained_on, definition = checkpoints[0]["args"], checkpoints[0].get("problem_definition")
        if definition and (args.env_id, args.env_kwargs) == (trained_on["env_id"], trained_on["env_kwargs"]):
            env_kwargs = {**env_kwargs, **definition}  # the instance itself, not a path relative to where it trained
        env_info = check_env(args.env_id, env_kwargs)
        protocol = evaluation_protocol(args, env_info)
        policies = []
        for path, checkpoint in zip(paths, checkpoints):
            check_fits_env(checkpoint, path, args.env_id, env_info)
            agent = agent_from_checkpoint(checkpoint, path)
            check_numpy_mirrors(agent)
            policies.append(deterministic_numpy_policy(agent, observation_stats(checkpoint),
                                                       checkpoint["args"]["clip_obs"]))
        start = time.perf_counter()
        evaluations = [evaluate(policy, args.env_id, env_kwargs, protocol, env_info["native_vector"])
                       for policy in policies]
    say(f"protocol {json.dumps(protocol)} ({time.perf_counter() - start:.1f} s)")
    for path, checkpoint, evaluation in zip(paths, checkpoints, evaluations):
        say(f"{path} (instance {checkpoint.get('instance')}, step {checkpoint['global_step']}): LTA return "
            f"{format_score(evaluation)} (95% CI over {evaluation['episodes']} episodes)")
    result = {"checkpoint": str(paths[0]), **evaluations[0]}
    if args.compare:
        difference = paired_difference(*evaluations)
        say(f"A - B: {format_score(difference)} (paired 95% CI over the {difference['episodes']} episodes both faced "
            f"with the same seeds; unpaired it would be +- {difference['unpaired_half_width']:.3g})")
        result = {"a": {"checkpoint": str(paths[0]), **evaluations[0]},
                  "b": {"checkpoint": str(paths[1]), **evaluations[1]}, "difference": difference}
    if args.eval_json:
        Path(args.eval_json).write_text(json.dumps(result, indent=2))
    return result


# ---------------------------------------------------------------------------------------------------------------
# The run folder, its loggers, the terminal, and the process state a run borrows
# ---------------------------------------------------------------------------------------------------------------

def open_registry(args, instance, protocol):
    """The instance's registry (`--registry`, else the SQLite file in `--checkpoint-dir`), checked up front: one
    that cannot be reached or written, or that ranks this instance by another protocol or the other way round, is
    refused before anything is trained."""
    try:
        saver = CheckpointSaver(args.registry or args.checkpoint_dir, instance, top_k=args.top_k,
                                lower_is_better=args.lower_is_better, protocol=protocol)
        saver.check()
    except RegistryError as error:
        raise TrainError(str(error)) from None
    except OSError as error:
        raise TrainError(f"cannot write checkpoints under --checkpoint-dir '{args.checkpoint_dir}' "
                         f"({error.strerror or error}): give a writable folder") from None
    hint = "" if args.registry or saver.entries() else legacy_hint(args.checkpoint_dir, instance)
    if hint:
        warn(hint)
    return saver


RUN_NAME_INSTANCE_LENGTH = 80


def unique_run_dir(instance, args):
    """`runs/{instance}__{exp_name}__{seed}__{time}`, or with `-1`, `-2`, ... if taken. Each candidate is created
    with one mkdir, which fails if it exists: runs started in the same second never share a folder. An instance
    key longer than RUN_NAME_INSTANCE_LENGTH is cut there, ending in a hash of the whole, so that paths printed in
    a terminal stay readable (the full key is in the checkpoints and the registry)."""
    if len(instance) > RUN_NAME_INSTANCE_LENGTH:
        digest = hashlib.sha256(instance.encode()).hexdigest()[:10]
        instance = f"{instance[:RUN_NAME_INSTANCE_LENGTH - 11]}-{digest}"
    name = f"{instance}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = Path("runs") / name
    try:
        run_dir.parent.mkdir(exist_ok=True)
        for suffix in itertools.count(1):
            try:
                run_dir.mkdir()
                return run_dir
            except FileExistsError:
                run_dir = Path("runs") / f"{name}-{suffix}"
    except OSError as error:
        raise TrainError(f"cannot create the run folder '{run_dir}' ({error.strerror or error}): run from a "
                         f"writable directory") from None


def open_writer(run_dir, given, args, resources):
    """TensorBoard, and with --track Weights & Biases mirroring it (as CleanRL does); `resources` (an ExitStack)
    closes them."""
    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=asdict(args), name=run_dir.name, save_code=True)
        resources.callback(wandb.finish)
    writer = resources.enter_context(contextlib.closing(SummaryWriter(str(run_dir))))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
        f"|{key}|{value}|" for key, value in asdict(given).items()))
    return writer


class Progress:
    """A live progress bar on a terminal; plain lines every ~5% of the run otherwise (logs, CI)."""

    def __init__(self, total, start):
        self.total, self.is_terminal, self.last_line, self.bar = total, sys.stdout.isatty(), -1, None
        if self.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeRemainingColumn)  # imported here: only a terminal needs it
            self.bar = RichProgress(TextColumn("steps"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                    TextColumn("{task.fields[stats]}"))
            self.task = self.bar.add_task("train", total=total, completed=start, stats="")
            self.bar.start()

    def update(self, step, sps, lta_name, lta, best):
        stats = f"SPS {sps:.0f}  {lta_name} {lta:.4g}  best eval {best:.4g}"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, stats=stats)
        elif step * 20 // max(self.total, 1) > self.last_line:
            self.last_line = step * 20 // max(self.total, 1)
            say(f"step {step}/{self.total}  {stats}")

    def close(self):
        """Stop the live bar, which also shows the terminal's cursor again (safe to call twice)."""
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def write_line(stream, message):
    """Print a line to `stream`; if its reader has gone (`| head`, or a `| tee` that Ctrl-C killed with the run),
    go on quietly: a message never costs a checkpoint."""
    try:
        print(message, file=stream, flush=True)
    except OSError:  # EPIPE, or EIO from a terminal that went away
        with contextlib.suppress(OSError, ValueError):  # (a stream without a file descriptor: nothing to redirect)
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


def say(message):
    write_line(sys.stdout, message)


def warn(message):
    write_line(sys.stderr, f"warning: {message}")


# MuJoCo's notice about an attribute of the XML models of gymnasium's MuJoCo envs, printed at every env creation.
HARMLESS_MUJOCO_WARNING = "compiler attribute 'settotalmass' is deprecated"


@contextlib.contextmanager
def quiet_mujoco(env_id):
    """A MuJoCo env of gymnasium runs quietly: gymnasium's advice to move from v4 to v5 (v4 is the default for
    CleanRL's published numbers, README) and MuJoCo's `settotalmass` notice are dropped; any other MuJoCo warning
    goes to stderr as a warning, and none is appended to MUJOCO_LOG.TXT in the working directory."""
    spec = gym.envs.registration.registry.get(env_id)
    if spec is None or not str(spec.entry_point).startswith("gymnasium.envs.mujoco"):
        yield
        return
    import mujoco
    previous = mujoco.get_mju_user_warning()
    mujoco.set_mju_user_warning(lambda message: None if HARMLESS_MUJOCO_WARNING in message
                                else warn(f"MuJoCo: {message.strip()}"))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", rf".*The environment {re.escape(env_id)} is out of date",
                                    DeprecationWarning)
            yield
    finally:
        mujoco.set_mju_user_warning(previous)


@contextlib.contextmanager
def global_state(args):
    """Seed the global random generators, set torch's and numpy's threads for the run and quieten MuJoCo's known
    notices; restore it all afterwards."""
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state(), torch.get_num_threads(),
             torch.backends.cudnn.deterministic)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(args.num_threads)
    try:
        # numpy's BLAS too: its threads thrash on small matrices
        with threadpool_limits(args.num_threads), quiet_mujoco(args.env_id):
            yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
        torch.set_num_threads(saved[3])
        torch.backends.cudnn.deterministic = saved[4]


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signal_handlers(handler):
    """`handler` for Ctrl-C and SIGTERM while the block runs, the previous handlers afterwards. Signals reach the
    main thread only, so elsewhere (a thread of the caller's) nothing is changed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, old_handler in previous.items():
            signal.signal(signum, old_handler)


@contextlib.contextmanager
def stop_signals():
    """Ctrl-C or SIGTERM asks the loop to stop at the end of the current step or minibatch; a second one
    interrupts at once."""
    stop = {"requested": False}

    def handler(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        warn("stopping at the end of this step (press Ctrl-C again to interrupt)")

    with signal_handlers(handler):
        yield stop


# ---------------------------------------------------------------------------------------------------------------
# The command line: --help in groups
# ---------------------------------------------------------------------------------------------------------------

def field_docs(cls):
    """The docstring under each field of a dataclass, read from its source (what tyro shows as help)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {node.target.id: after.value.value for node, after in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)}


def checkpoint_defaults(cls, argv, flags, not_inherited):
    """A `cls` of the options saved in the checkpoint that follows one of `flags` in `argv` (its first path), as
    the defaults of a run that resumes or evaluates it; `cls()` if there is none. `not_inherited` are not taken."""
    defaults = cls()
    for flag in flags:
        for i, word in enumerate(argv):
            path = argv[i + 1] if word == flag and i + 1 < len(argv) else word.partition("=")[2] \
                if word.startswith(flag + "=") else None
            if path:
                saved = read_checkpoint(path)["args"]
                known = {field.name for field in dataclasses.fields(cls)} - set(not_inherited)
                defaults = cls(**{name: tuple(value) if isinstance(value, list) else value
                                  for name, value in saved.items() if name in known})
    return defaults


def grouped_cli(cls, defaults, groups, argv, description):
    """A `cls` dataclass from the command line, with `--help` in sections (the flags stay flat).

    `groups` maps the first field of each section to its name; `defaults` is a `cls` whose values are the
    defaults. A default written in a field's help text replaces tyro's "(default: None)": one default per option.
    """
    docs, fields, group = field_docs(cls), {}, None
    for field in dataclasses.fields(cls):
        group = groups.get(field.name, group)
        hint = {"help_behavior_hint": ""} if "(default:" in docs[field.name] else {}
        fields.setdefault(group, []).append((field.name, Annotated[field.type, tyro.conf.arg(help=docs[field.name],
                                             **hint)], dataclasses.field(default=getattr(defaults, field.name))))
    sections = {name: dataclasses.make_dataclass(name, section) for name, section in fields.items()}
    view = dataclasses.make_dataclass("Options", [(name, section, dataclasses.field(default_factory=section))
                                                  for name, section in sections.items()])
    options = tyro.cli(view, args=argv, description=description, config=(tyro.conf.OmitArgPrefixes,))
    return cls(**{name: value for section in sections for name, value in vars(getattr(options, section)).items()})


# ---------------------------------------------------------------------------------------------------------------
# The compiled update (--compile)
# ---------------------------------------------------------------------------------------------------------------

def why_not_compiled(steps_to_train, min_steps, on_gpu):
    """Why a run with --compile takes the eager update, or None when compiling pays: it needs enough steps to
    repay its start-up cost and, on a CPU, the C++ compiler inductor calls. Steps only, so a seed's mode (and
    with it its result) does not depend on the machine's speed."""
    if steps_to_train < min_steps:
        return (f"eager update: {steps_to_train:,} steps to train, fewer than --compile-min-steps {min_steps:,} "
                f"(compiling costs seconds at start-up)")
    compiler = os.environ.get("CXX", {"darwin": "clang++", "win32": "cl"}.get(sys.platform, "g++"))  # inductor's
    if not on_gpu and shutil.which(compiler) is None:
        return (f"eager update: --compile needs a C++ compiler and '{compiler}' was not found (install one or set "
                f"CXX); --no-compile silences this")
    return None


class Adam:
    """torch.optim.Adam(params, eps=eps, fused=True) without torch.optim.Optimizer, whose methods import
    torch._dynamo on first use: about 1.5 s, more than half of a short run's start-up. Same fused kernel (the
    numbers are identical: a test checks it bit for bit against torch.optim.Adam), same `param_groups`, `state` and
    state_dict format (a checkpoint saved by either loads into the other)."""

    HYPERPARAMETERS = {"betas": (0.9, 0.999), "weight_decay": 0, "amsgrad": False, "maximize": False, "foreach": None,
                       "capturable": False, "differentiable": False, "fused": True, "decoupled_weight_decay": False}

    def __init__(self, param_groups, eps):
        self.param_groups = [{**self.HYPERPARAMETERS, "eps": eps, **group, "params": list(group["params"])}
                             for group in param_groups]
        self.state = collections.defaultdict(dict)

    def zero_grad(self):
        for group in self.param_groups:
            for param in group["params"]:
                param.grad = None

    def state_of(self, param):
        """The parameter's moments and step count, created at zero where missing (torch.optim.Adam creates them on
        its first step)."""
        state = self.state[param]
        if not state:
            state.update(step=torch.zeros((), device=param.device), exp_avg=torch.zeros_like(param),
                         exp_avg_sq=torch.zeros_like(param))
        return state

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [param for param in group["params"] if param.grad is not None]
            states = [self.state_of(param) for param in params]
            functional_adam(params, [param.grad for param in params], [state["exp_avg"] for state in states],
                            [state["exp_avg_sq"] for state in states], [], [state["step"] for state in states],
                            fused=True, amsgrad=False, beta1=group["betas"][0], beta2=group["betas"][1],
                            lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                            maximize=group["maximize"], decoupled_weight_decay=group["decoupled_weight_decay"])

    def state_dict(self):
        index = {param: i for i, param in enumerate(param for group in self.param_groups for param in group["params"])}
        return {"state": {index[param]: dict(state) for param, state in self.state.items()},
                "param_groups": [{**group, "params": [index[param] for param in group["params"]]}
                                 for group in self.param_groups]}

    def load_state_dict(self, saved):
        sizes = [len(group["params"]) for group in self.param_groups]
        if [len(group["params"]) for group in saved["param_groups"]] != sizes:
            raise ValueError(f"the saved optimizer state has parameter groups of sizes "
                             f"{[len(group['params']) for group in saved['param_groups']]}, this optimizer {sizes}")
        params = [param for group in self.param_groups for param in group["params"]]
        for group, saved_group in zip(self.param_groups, saved["param_groups"]):
            group.update({key: value for key, value in saved_group.items() if key != "params"})
        self.state = collections.defaultdict(dict, {
            params[i]: {key: value.to(params[i].device, torch.float32 if key == "step" else params[i].dtype)
                        for key, value in state.items()} for i, state in saved["state"].items()})


def compiled_minibatch_update(agent, optimizers, clip_groups, loss_fn, max_grad_norm, minibatch_size):
    """`minibatch_update` (ppo_continuous.py) as one graph compiled by torch.compile; returns
    `update(minibatch) -> parts`, or None (with a warning) when compiling fails.

    `loss_fn(agent(obs, actions), minibatch) -> (loss, parts)` is the loss, minimised by the optimizers' Adam with
    each of `clip_groups` clipped to global norm `max_grad_norm` (None: no clipping); a minibatch is the six
    tensors (obs, actions, log_probs, advantages, returns, values) of ppo_continuous.py's learning phase.

    On a CPU each of the ~100 small ops of an eager update costs more in overhead than in arithmetic. Written as a
    pure function (torch.func.grad for the gradients, torch's functional Adam on the optimizers' own state), the
    whole update becomes one graph that inductor compiles into a few C++ kernels. Same math as `minibatch_update`;
    fused kernels round differently in the last bits. Compiles now, on copies, so a failure stops the run up front.
    """
    for optimizer in optimizers:
        if type(optimizer) is not Adam:
            raise TypeError("compiled_minibatch_update mirrors ppo_support.Adam: update it together with "
                            "make_optimizers (ppo_continuous.py)")
        for group in optimizer.param_groups:
            for param in group["params"]:
                optimizer.state_of(param)  # the state Adam would create on its first step, now
    names = [name for name, _ in agent.named_parameters()]
    position = {param: i for i, param in enumerate(agent.parameters())}
    groups = [group for optimizer in optimizers for group in optimizer.param_groups]
    group_positions = [[position[param] for param in group["params"]] for group in groups]
    clip_positions = [[position[param] for param in params] for params in clip_groups]

    def pick(tensors, positions):
        return [tensors[i] for i in positions]

    def loss(params, minibatch):
        outputs = torch.func.functional_call(agent, dict(zip(names, params)), minibatch[:2])
        return loss_fn(outputs, minibatch)

    def update(params, exp_avgs, exp_avg_sqs, steps, lrs, minibatch):
        grads, parts = torch.func.grad(loss, has_aux=True)(params, minibatch)
        if max_grad_norm is not None:
            for positions in clip_positions:  # clip_grad_norm_, on gradients that are not in `.grad`
                total_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(grads[i])
                                                                   for i in positions]))
                scale = torch.clamp(max_grad_norm / (total_norm + 1e-6), max=1.0)
                for i in positions:
                    grads[i] = grads[i] * scale
        for group, positions, lr in zip(groups, group_positions, lrs):
            functional_adam(*(pick(tensors, positions) for tensors in (params, grads, exp_avgs, exp_avg_sqs)), [],
                            pick(steps, positions), foreach=False, amsgrad=False, lr=lr, beta1=group["betas"][0],
                            beta2=group["betas"][1], weight_decay=group["weight_decay"], eps=group["eps"],
                            maximize=group["maximize"], decoupled_weight_decay=group["decoupled_weight_decay"])
        return parts

    # Detached views: the update writes the agent's weights and the optimizers' state in place, outside autograd.
    state = {param: s for optimizer in optimizers for param, s in optimizer.state.items()}
    params = [param.detach() for param in agent.parameters()]
    exp_avgs, exp_avg_sqs, steps = ([state[param][key] for param in agent.parameters()]
                                    for key in ("exp_avg", "exp_avg_sq", "step"))
    lrs = [torch.tensor(group["lr"], device=params[0].device) for group in groups]
    # Dynamo keeps at most 8 graphs per function, and the options are constants of the graph: without a reset,
    # the 9th configuration trained in one process (a sweep calling train()) would fail to compile.
    torch.compiler.reset()
    compiled = torch.compile(update, fullgraph=True, dynamic=False)
    copies = [[tensor.clone() for tensor in tensors] for tensors in (params, exp_avgs, exp_avg_sqs, steps, lrs)]
    obs_size, action_size = agent.critic[0].in_features, agent.actor_logstd.shape[1]
    example = [torch.zeros(minibatch_size, *shape, device=params[0].device)
               for shape in ((obs_size,), (action_size,), (), (), (), ())]
    start = time.perf_counter()
    try:
        compiled(*copies, tuple(example))
    except Exception as error:
        first_line = next(iter(str(error).strip().splitlines()), "")
        warn(f"--compile failed ({type(error).__name__}: {first_line}): training with the eager update")
        return None
    say(f"compiled the minibatch update in {time.perf_counter() - start:.1f} s")

    def compiled_update(minibatch):
        for lr, group in zip(lrs, groups):
            lr.fill_(group["lr"])
        return compiled(params, exp_avgs, exp_avg_sqs, steps, lrs, minibatch)

    return compiled_update
