"""PPO for continuous actions, for long-term-average (LTA) performance on problem instances.

The story, top to bottom: `Args` (every option, with its help text), the agent, the math as small pure
functions (Gaussian log-probability, GAE with bootstrapping on truncation, the PPO losses), the training envs,
checkpoints, then `train`: collect a rollout, compute advantages, learn, log. After `train` come the parts a
reader may skip: what happens when episodes end or a candidate is evaluated, setting up and restoring a run, and
the options. The rest lives in `ppo_support.py`: env checks, the evaluation protocol, checkpoint files, the run
folder, the terminal, and two faster mirrors of this file's math (the agent's forward pass in numpy, the update
compiled by `--compile`); the registry lives in `checkpoint_saver.py`.
Run `python ppo_continuous.py --help` for the options; README.md explains the terms.
"""

import contextlib
import dataclasses
import functools
import importlib.util
import io
import json
import math
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional, Tuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn

from checkpoint_saver import RegistryError, entry_bytes, instance_key, save_atomic, without_password
from ppo_support import (LOG_SQRT_2PI, Adam, CandidateSelection, Progress, RewardMeter, RunningStats, TrainError,
                         check_env, check_fits_env, check_numpy_mirrors, checkpoint_defaults, compiled_minibatch_update,
                         default_eval_every, deterministic_numpy_policy, env_action_map, evaluate, evaluation_protocol,
                         format_score, global_state, grouped_cli, load_rms_state, make_vector_env,
                         next_state_distribution_of, normalize_observation, numpy_mlp, numpy_policy, observation_stats,
                         open_registry, open_writer, read_checkpoint, rms_state, say, score_checkpoints,
                         signal_handlers, stop_signals, unique_run_dir, warn, why_not_compiled, write_line)


@dataclass
class Args:
    # run
    exp_name: str = Path(__file__).stem
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment (torch, numpy, python and the training environments)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled and a GPU is available, train on it"""
    num_threads: int = 1
    """torch CPU threads; one is fastest for small networks"""
    compile: bool = True
    """compile the minibatch update into one graph (torch.compile, ~3x faster learning) in runs that train at least
    --compile-min-steps and, on a CPU, find a C++ compiler; other runs say why they stay eager"""
    compile_min_steps: int = 100_000
    """fewest steps to train for compiling to pay: below, its start-up cost (on HalfCheetah 12 s the first time, 1 s
    from inductor's disk cache, on a quiet machine) outweighs what it saves"""
    track: bool = False
    """log the run to Weights & Biases (WANDB_MODE=offline works without network)"""
    wandb_project_name: str = "ppo_continuous"
    """the Weights & Biases project"""
    wandb_entity: Optional[str] = None
    """the Weights & Biases entity (team); none: your default entity"""

    # env
    env_id: str = "HalfCheetah-v4"
    """the gymnasium environment id; `module:EnvId` imports `module` first (for your own registered envs)"""
    env_kwargs: str = "{}"
    """a JSON object of keyword arguments passed to `gym.make`"""
    num_envs: int = 1
    """the number of parallel environments"""
    async_envs: bool = False
    """step the environments in subprocesses (AsyncVectorEnv); worth it for expensive envs"""
    reset_steps: Optional[int] = None
    """episode time limit per env during training (default: the env's own limit)"""

    # rollout
    total_timesteps: int = 1000000
    """total environment steps of the experiment over all envs, rounded down to whole rollouts"""
    num_steps: int = 2048
    """steps per environment in each rollout (the rollout length)"""
    gamma: Optional[float] = None
    """the discount factor (default: 0.99, or 1.0 with --average-reward)"""
    gae_lambda: float = 0.95
    """the lambda of generalized advantage estimation"""
    bootstrap_truncation: bool = True
    """on a time-limit truncation, bootstrap from the value of the true final observation"""
    expected_td: bool = False
    """bootstrap every TD error from the expected value of the next state, over the next-state distribution the env
    reports (`next_state_distribution`: queueing networks in continuous time), instead of from the sampled next
    state: the same expectation with less variance (a control variate)"""
    time_scaled: bool = False
    """divide the reward at step t of an episode by t (t = 1, 2, ...)"""
    moving_average: bool = True
    """scale rewards by the running std of the discounted return (gymnasium's NormalizeReward)"""
    clip_reward: float = 10.0
    """clip scaled rewards to [-clip_reward, clip_reward] (with --moving-average)"""
    norm_obs: bool = True
    """normalise observations with running mean and variance (saved with every checkpoint)"""
    clip_obs: float = 10.0
    """clip normalised observations to [-clip_obs, clip_obs]"""
    average_reward: bool = False
    """average-reward PPO: advantages from differential rewards r - rho (continuing tasks, gamma 1; see README)"""
    rho_step_size: float = 0.1
    """step size of the moving average that estimates rho, the average reward per step"""

    # PPO update
    learning_rate: float = 3e-4
    """the default learning rate of both networks"""
    actor_lr: Optional[float] = None
    """the actor's learning rate (default: --learning-rate)"""
    critic_lr: Optional[float] = None
    """the critic's learning rate (default: --learning-rate)"""
    actor_starts: int = 0
    """steps before the actor's first update: until then only the critic and the observation statistics learn, so
    the first policy gradients come from a critic that knows the starting policy on data past the env's transient"""
    shared_optimizer: bool = True
    """one Adam over all parameters, grad norm clipped globally; else one Adam per network, each clipped"""
    anneal_lr: bool = True
    """anneal the learning rates linearly to zero (CleanRL's meaning); overridden by --lr-schedule"""
    lr_schedule: Optional[Literal["constant", "linear", "exponential"]] = None
    """learning-rate schedule over steps (default: linear with --anneal-lr, else constant)"""
    lr_decay_rate: float = 0.999
    """the per-rollout factor of the exponential schedule"""
    num_minibatches: int = 32
    """the number of minibatches per update"""
    update_epochs: int = 10
    """the number of updates (passes over the batch) per rollout"""
    norm_adv: bool = True
    """normalise advantages within each minibatch"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient"""
    clip_vloss: bool = True
    """use a clipped value loss, as in the PPO paper's code"""
    ent_coef: float = 0.0
    """coefficient of the entropy bonus"""
    vf_coef: float = 0.5
    """coefficient of the value loss"""
    max_grad_norm: Optional[float] = 0.5
    """maximum global norm of the gradients (None: no clipping)"""
    target_kl: Optional[float] = None
    """stop the learning phase early once the approximate KL exceeds this (default: never)"""
    hidden_sizes: Tuple[int, ...] = (64, 64)
    """hidden layer sizes of both the actor and the critic MLPs"""
    squash_actions: bool = False
    """map the Gaussian sample into the action bounds with tanh instead of clipping it (bounded actions only)"""

    # evaluation
    eval_episodes: Optional[int] = None
    """evaluation episodes (one per env copy) (default: 10; 128 for continuing tasks)"""
    eval_horizon: Optional[int] = None
    """steps scored per evaluation episode (default: the env's own time limit; 20000 for continuing tasks)"""
    eval_warmup: Optional[int] = None
    """steps run and discarded before scoring, continuing tasks only (default: 2500)"""
    eval_seed: int = 1_000_000
    """seed of evaluation copy 0 (copy i: +i); the same for every candidate (common random numbers)"""
    eval_continuing: Optional[bool] = None
    """score as a continuing task, with warm-up (default: the env's metadata['continuing'])"""
    eval_every: Optional[int] = None
    """steps between periodic evaluations (default: a tenth of the run; longer when evaluations are long, README)"""
    eval_nominated: int = 1
    """at most this many evaluations of nominated agents between two periodic ones (0: periodic ones only)"""
    eval_only: Optional[str] = None
    """evaluate this checkpoint under the evaluation protocol and exit, without training"""
    compare: Optional[Tuple[str, str]] = None
    """evaluate checkpoints A and B on the same evaluation seeds, with the paired difference A - B, and exit"""
    eval_json: Optional[str] = None
    """with --eval-only or --compare: also write the scores to this JSON file"""

    # checkpoints
    problem_instance: Optional[str] = None
    """the problem-instance key for the checkpoint registry (default: env id + env kwargs)"""
    checkpoint_dir: str = "runs/checkpoints"
    """folder of the default best-LTA registry, the SQLite file registry.db (one machine)"""
    registry: Optional[str] = None
    """database URL of the registry instead, e.g. postgresql://user@host/db shared by many machines (default: none)"""
    top_k: int = 5
    """how many best checkpoints the registry keeps per problem instance"""
    lower_is_better: bool = False
    """the LTA return is a cost: lower is better (for checkpoints, best.pt and early stopping)"""
    early_stop_patience: Optional[int] = None
    """stop when this many evaluations in a row have not improved the run's best (default: never)"""
    save_latest_every: int = 10
    """save latest.pt every this many rollouts, to resume a killed run (0: never)"""
    resume: Optional[str] = None
    """continue training from this checkpoint; its options are the defaults of this run"""


class Agent(nn.Module):
    """CleanRL's continuous agent: separate actor and critic MLPs, state-independent log-std. Rollouts and
    evaluation run its numpy mirror (ppo_support.py), checked against it at the start of every run."""

    def __init__(self, obs_size, action_size, hidden_sizes=(64, 64), action_low=None, action_high=None,
                 squash_actions=False):
        super().__init__()
        self.squash_actions = squash_actions
        self.critic = mlp(obs_size, hidden_sizes, 1, last_layer_std=1.0)
        self.actor_mean = mlp(obs_size, hidden_sizes, action_size, last_layer_std=0.01)
        self.actor_logstd = nn.Parameter(torch.zeros(1, action_size))
        # The action bounds travel with the weights, so a loaded agent acts within them.
        low = torch.full((action_size,), -math.inf) if action_low is None else torch.as_tensor(action_low)
        high = torch.full((action_size,), math.inf) if action_high is None else torch.as_tensor(action_high)
        self.register_buffer("action_low", low.float())
        self.register_buffer("action_high", high.float())

    def get_value(self, x):
        return self.critic(x)

    def forward(self, x, action):
        """`get_action_and_value` on given actions (the entry point `torch.func.functional_call` uses)."""
        return self.get_action_and_value(x, action)

    def get_action_and_value(self, x, action=None):
        action_mean = self.actor_mean(x)
        action_logstd = self.actor_logstd.expand_as(action_mean)
        if action is None:
            action = action_mean + action_logstd.exp() * torch.randn_like(action_mean)
        log_prob = gaussian_log_prob(action, action_mean, action_logstd)
        return action, log_prob, gaussian_entropy(action_logstd), self.critic(x).squeeze(-1)

    def get_deterministic_action(self, x):
        """The mean action, clipped (or squashed) into the action bounds: the policy used for evaluation."""
        mean = self.actor_mean(x)
        if self.squash_actions:
            return self.action_low + (self.action_high - self.action_low) * (torch.tanh(mean) + 1) / 2
        return torch.clamp(mean, self.action_low, self.action_high)


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


def mlp(in_size, hidden_sizes, out_size, last_layer_std):
    layers, size = [], in_size
    for hidden in hidden_sizes:
        layers += [layer_init(nn.Linear(size, hidden)), nn.Tanh()]
        size = hidden
    return nn.Sequential(*layers, layer_init(nn.Linear(size, out_size), std=last_layer_std))


def gaussian_log_prob(action, mean, log_std):
    """Log-density of a diagonal Normal, summed over action dimensions (= torch.distributions.Normal's)."""
    return (-((action - mean) ** 2) / (2 * torch.exp(2 * log_std)) - log_std - LOG_SQRT_2PI).sum(-1)


def gaussian_entropy(log_std):
    """Entropy of a diagonal Normal, summed over action dimensions."""
    return (0.5 + LOG_SQRT_2PI + log_std).sum(-1)


def compute_gae(rewards, values, next_value, terminated, truncated, truncation_values, gamma, gae_lambda,
                expected_next_values=None):
    """Generalized advantage estimates for a rollout of shape (num_steps, num_envs).

    Step t's TD target bootstraps from the value of the state it led to: nothing on termination, the value
    of the true final observation on truncation (`truncation_values[t]`), `values[t + 1]` otherwise, and
    `next_value` (the value of the observation after the rollout) at the last step. Advantages never flow
    across the end of an episode. Pass `truncated` into `terminated` to treat time-outs as terminations.
    With `expected_next_values[t]` (E[V(next state) | state t, action t], `--expected-td`), step t bootstraps
    from it instead, whichever next state came (a truncation's too); a termination still gives nothing.
    """
    if expected_next_values is None:
        next_values = np.concatenate([values[1:], next_value[None]])
        next_values = np.where(truncated, truncation_values, next_values)
    else:
        next_values = expected_next_values
    next_values = np.where(terminated, 0.0, next_values)
    deltas = rewards + gamma * next_values - values
    carry = gamma * gae_lambda * ~(terminated | truncated)
    advantages = np.zeros_like(deltas)
    last = np.zeros_like(next_value)
    for t in reversed(range(len(rewards))):
        last = advantages[t] = deltas[t] + carry[t] * last
    return advantages


def update_rho(rho, rollout_rewards, step_size):
    """Average-reward mode's estimate of the reward per step: the first rollout's mean, then a moving average."""
    rollout_rho = float(np.mean(rollout_rewards))
    return rollout_rho if rho is None else rho + step_size * (rollout_rho - rho)


def differential_returns(advantages, values):
    """Value targets of the average-reward mode, centred: the differential value is defined up to a constant,
    and pinning the batch mean of the targets at zero stops it drifting. Exact for gamma = 1 without
    terminations, where a constant offset cancels in every TD error."""
    returns = advantages + values
    return returns - returns.mean()


def policy_loss(new_log_prob, old_log_prob, advantages, clip_coef):
    """PPO's clipped surrogate loss (to minimise) and the probability ratio."""
    ratio = torch.exp(new_log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)
    return torch.max(unclipped, clipped).mean(), ratio


def value_loss(new_values, old_values, returns, clip_coef, clip_vloss):
    """Half the mean squared error to the returns; with clip_vloss, the pessimistic clipped form."""
    unclipped = (new_values - returns) ** 2
    if not clip_vloss:
        return 0.5 * unclipped.mean()
    clipped_values = old_values + torch.clamp(new_values - old_values, -clip_coef, clip_coef)
    return 0.5 * torch.max(unclipped, (clipped_values - returns) ** 2).mean()


def ppo_loss(agent_outputs, minibatch, args):
    """The minibatch loss from the agent's outputs on it, and its logged parts (detached).

    `agent_outputs` is `get_action_and_value(obs, actions)`; `minibatch` is (obs, actions, log_probs, advantages,
    returns, values) as collected.
    """
    _, new_log_prob, entropy, new_values = agent_outputs
    _, _, old_log_prob, advantages, returns, old_values = minibatch
    if args.norm_adv:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    pg_loss, ratio = policy_loss(new_log_prob, old_log_prob, advantages, args.clip_coef)
    v_loss = value_loss(new_values, old_values, returns, args.clip_coef, args.clip_vloss)
    entropy_loss = entropy.mean()
    loss = pg_loss - args.ent_coef * entropy_loss + args.vf_coef * v_loss
    return loss, tuple(part.detach() for part in (pg_loss, v_loss, entropy_loss, ratio))


def make_optimizers(agent, args):
    """Adam for the actor and the critic: one optimizer (CleanRL's) or one each; and the groups whose gradients
    are clipped together. `Adam` (ppo_support.py): torch.optim.Adam's fused kernel, minus a slow import."""
    actor_params = list(agent.actor_mean.parameters()) + [agent.actor_logstd]
    critic_params = list(agent.critic.parameters())
    if args.shared_optimizer:
        optimizers = [Adam([{"params": actor_params, "lr": args.actor_lr},
                            {"params": critic_params, "lr": args.critic_lr}], eps=1e-5)]
        return optimizers, [actor_params + critic_params]
    optimizers = [Adam([{"params": actor_params, "lr": args.actor_lr}], eps=1e-5),
                  Adam([{"params": critic_params, "lr": args.critic_lr}], eps=1e-5)]
    return optimizers, [actor_params, critic_params]


def minibatch_update(agent, optimizers, clip_groups, args, minibatch):
    """One gradient step on a minibatch; returns the parts of its loss (see `ppo_loss`). With --compile,
    `compiled_minibatch_update` (ppo_support.py) takes the same step on `ppo_loss`: change the two together."""
    loss, parts = ppo_loss(agent(minibatch[0], minibatch[1]), minibatch, args)
    for optimizer in optimizers:
        optimizer.zero_grad()
    loss.backward()
    if args.max_grad_norm is not None:
        for params in clip_groups:
            nn.utils.clip_grad_norm_(params, args.max_grad_norm)
    for optimizer in optimizers:
        optimizer.step()
    return parts


def learning_rate_factor(schedule, global_step, total_timesteps, rollouts_done, decay_rate):
    """The factor applied to the base learning rates for the rollout that starts at `global_step`.

    Linear decays with the steps done, so a resumed run continues the same line; exponential decays by
    `decay_rate` per rollout done.
    """
    if schedule == "linear":
        return max(1.0 - global_step / total_timesteps, 0.0)
    if schedule == "exponential":
        return decay_rate ** rollouts_done
    return 1.0


def explained_variance(predicted, actual):
    var_actual = np.var(actual)
    return np.nan if var_actual == 0 else 1 - np.var(actual - predicted) / var_actual


def average_lta_return(episode_returns, episode_lengths):
    """The avg LTA return: the mean over ended episodes of return per step."""
    return float(np.mean(episode_returns / episode_lengths))


# ---------------------------------------------------------------------------------------------------------------
# The training environments
# ---------------------------------------------------------------------------------------------------------------

class TimeScaledReward(gym.vector.VectorWrapper):
    """`--time-scaled`: the reward at step t of each episode is divided by t (t = 1, 2, ...)."""

    def reset(self, **kwargs):
        self.episode_step = np.zeros(self.num_envs)
        return self.env.reset(**kwargs)

    def step(self, actions):
        obs, reward, terminated, truncated, info = self.env.step(actions)
        self.episode_step += 1
        reward = reward / self.episode_step
        self.episode_step[terminated | truncated] = 0
        return obs, reward, terminated, truncated, info


def make_training_envs(args, env_kwargs, env_info):
    """The training vector env: raw episode and rollout statistics first, then the reward transformations. The
    trainer maps the agent's raw actions into the bounds itself (`env_action_map`), so the raw sample is stored."""
    # The env's own limit explicitly: a native vector env given None would run without one.
    envs = make_vector_env(args.env_id, env_kwargs, args.num_envs, args.reset_steps or env_info["time_limit"],
                           env_info["native_vector"], args.async_envs)
    envs = reward_meter = RewardMeter(gym.wrappers.vector.RecordEpisodeStatistics(envs))
    reward_normalizer = None
    if args.time_scaled:
        envs = TimeScaledReward(envs)
    if args.moving_average:
        # An undiscounted running return has no stationary scale, so the scaler discounts at 0.99 when gamma = 1.
        envs = reward_normalizer = gym.wrappers.vector.NormalizeReward(envs, gamma=args.gamma if args.gamma < 1
                                                                       else 0.99)
        reward_normalizer.return_rms = RunningStats(shape=())
        # One numpy call per step: gymnasium's vector ClipReward clips each copy's reward in a Python loop.
        envs = gym.wrappers.vector.TransformReward(envs, lambda reward: np.clip(reward, -args.clip_reward,
                                                                                args.clip_reward))
    return envs, reward_normalizer, reward_meter


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------

def make_checkpoint(run, evaluation=None):
    """Everything needed to use or resume the agent; plain types only, so `torch.load(weights_only=True)` works.
    `args` are the options as given (defaults not yet filled in), so a resumed run can change one of them."""
    reward_rms = None if run.reward_normalizer is None else rms_state(run.reward_normalizer.return_rms)
    return {
        "agent": run.agent.state_dict(),
        "obs_size": run.agent.actor_mean[0].in_features,
        "action_size": run.agent.actor_logstd.shape[1],
        "obs_rms": rms_state(run.obs_rms),
        "reward_rms": reward_rms,
        "optimizers": [optimizer.state_dict() for optimizer in run.optimizers],
        "args": {key: list(value) if isinstance(value, tuple) else value for key, value in
                 asdict(dataclasses.replace(run.given, registry=without_password(run.given.registry))).items()},
        "instance": run.instance,
        "problem_definition": run.env_info["problem_definition"],
        "score": None if evaluation is None else evaluation["mean"],
        "half_width": None if evaluation is None else evaluation["half_width"],
        "protocol": run.protocol,
        "global_step": run.counters["global_step"],
        "counters": {**run.counters, "rho": run.rho},
    }


def load_agent_weights(agent, checkpoint, path):
    try:
        agent.load_state_dict(checkpoint["agent"])
    except RuntimeError as error:
        raise TrainError(f"checkpoint '{path}' does not fit the agent ({str(error).splitlines()[0]} "
                         f"{str(error).splitlines()[-1].strip()})") from None


def agent_from_checkpoint(checkpoint, path):
    agent = Agent(checkpoint["obs_size"], checkpoint["action_size"], tuple(checkpoint["args"]["hidden_sizes"]),
                  squash_actions=checkpoint["args"].get("squash_actions", False))
    load_agent_weights(agent, checkpoint, path)
    return agent


def load_checkpoint(path=None, *, instance=None, rank=1, registry="runs/checkpoints"):
    """Returns `(agent, normalize_obs)` of the checkpoint file `path`, or of entry `rank` (1: the best) of `instance`
    (its key or a unique part) in the `registry` (a database URL, or the folder of registry.db): the agent in eval
    mode and its observation normalisation.

    `agent.get_deterministic_action(normalize_obs(raw_obs))` is the policy exactly as it was at training time.
    Raises TrainError for a file or entry that is not a readable checkpoint.
    """
    if instance is not None:
        path = f"entry {rank} of {instance} in the registry {without_password(registry)}"
        try:
            checkpoint = read_checkpoint(io.BytesIO(entry_bytes(registry, instance, rank)), path)
        except (OSError, RegistryError) as error:
            raise TrainError(str(error)) from None
    else:
        checkpoint = read_checkpoint(path)
    stats, clip = observation_stats(checkpoint), checkpoint["args"]["clip_obs"]

    def normalize_obs(obs):
        obs = np.asarray(obs, dtype=np.float32)
        return torch.as_tensor(obs if stats is None else normalize_observation(obs, *stats, clip))

    return agent_from_checkpoint(checkpoint, path).eval(), normalize_obs


# ---------------------------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------------------------

def train(args, on_evaluation=None):
    """Train a PPO agent; returns a summary dict (run_dir, best and final evaluations, counters, timing).

    `on_evaluation(global_step, evaluation)` is called after each evaluation; returning True stops the run.
    Raises TrainError on bad options. Changes global state only while it runs (see README, Library use).
    """
    given = args  # as the caller gave them: checkpoints save these, so a resumed run can change one
    args, env_kwargs = resolved_args(args)
    with global_state(args), stop_signals() as stop, contextlib.ExitStack() as resources:
        run = Run(given, args, env_kwargs, resources)  # envs, agent, optimizers, run folder, registry
        agent, counters, envs, batch_size = run.agent, run.counters, run.envs, args.num_envs * args.num_steps
        buffers = {name: np.zeros((args.num_steps, args.num_envs, *shape), dtype=dtype) for name, shape, dtype in [
            ("obs", (run.obs_size,), np.float32), ("actions", (run.action_size,), np.float32),
            ("logprobs", (), np.float32), ("rewards", (), np.float32), ("values", (), np.float32),
            ("terminated", (), bool), ("truncated", (), bool), ("truncation_values", (), np.float32),
            ("expected_next_values", (), np.float32)]}
        next_obs = run.reset_envs()
        while counters["global_step"] + batch_size <= args.total_timesteps and not run.stopped(stop):
            run.begin_rollout()

            # COLLECT ROLLOUT
            policy = numpy_policy(agent)  # `get_action_and_value` in numpy, with the noise given (ppo_support.py)
            for step in range(args.num_steps):
                counters["global_step"] += args.num_envs
                buffers["obs"][step] = next_obs
                # torch's generator draws the noise: the random stream `get_action_and_value` would use.
                action, logprob, value = policy(next_obs, torch.randn(args.num_envs, run.action_size).numpy())
                buffers["actions"][step], buffers["logprobs"][step], buffers["values"][step] = action, logprob, value
                env_action = run.env_action(action)
                if args.expected_td:
                    buffers["expected_next_values"][step] = run.expected_next_value(env_action)
                raw_obs, reward, terminated, truncated, infos = envs.step(env_action)
                buffers["rewards"][step], buffers["terminated"][step], buffers["truncated"][step] = (
                    reward, terminated, truncated)
                next_obs = run.observe(raw_obs)
                if args.bootstrap_truncation and (truncated & ~terminated).any():
                    buffers["truncation_values"][step] = run.truncation_values(infos, truncated & ~terminated)
                if "_episode" in infos:
                    run.episodes_ended(infos)
                if stop["requested"]:
                    break
            if stop["requested"]:
                break
            run.end_rollout(buffers, on_evaluation)  # may evaluate the agent that collected the rollout

            # COMPUTE THE ADVANTAGES, BOOTSTRAPPING WHERE TRAJECTORIES DID NOT END WITH TERMINATION
            with torch.inference_mode():
                next_value = agent.get_value(torch.from_numpy(next_obs).to(run.device)).squeeze(-1).cpu().numpy()
            rewards = buffers["rewards"]
            if args.average_reward:
                run.rho = update_rho(run.rho, rewards, args.rho_step_size)
                rewards = rewards - run.rho
            terminated = buffers["terminated"] | (buffers["truncated"] & (not args.bootstrap_truncation))
            advantages = compute_gae(rewards, buffers["values"], next_value, terminated, buffers["truncated"],
                                     buffers["truncation_values"], args.gamma, args.gae_lambda,
                                     buffers["expected_next_values"] if args.expected_td else None)
            returns = (differential_returns(advantages, buffers["values"]) if args.average_reward
                       else advantages + buffers["values"])

            # LEARNING PHASE: update_epochs passes over the batch, in shuffled minibatches
            batch = tuple(torch.from_numpy(array.reshape(batch_size, *array.shape[2:])).to(run.device) for array in
                          (buffers["obs"], buffers["actions"], buffers["logprobs"], advantages, returns,
                           buffers["values"]))
            ratios = []
            for epoch in range(args.update_epochs):
                # Shuffling once per epoch and slicing gives the same random minibatches with one gather.
                permutation = torch.randperm(batch_size, device=run.device)
                shuffled = [tensor[permutation] for tensor in batch]
                for start in range(0, batch_size, run.minibatch_size):
                    minibatch = tuple(tensor[start:start + run.minibatch_size] for tensor in shuffled)
                    pg_loss, v_loss, entropy_loss, ratio = run.update(minibatch)
                    counters["minibatch_updates"] += 1
                    ratios.append(ratio)
                    if stop["requested"]:  # a long learning phase still stops within a minibatch
                        break
                counters["updates"] += 1
                approx_kl = ((ratio - 1) - ratio.log()).mean()  # the epoch's last minibatch, as CleanRL
                if stop["requested"] or (args.target_kl is not None and approx_kl > args.target_kl):
                    break

            # LOG
            run.log_update((pg_loss, v_loss, entropy_loss), ratios, buffers["values"], returns)
            run.save_latest()
        return run.finish(on_evaluation, interrupted=stop["requested"])


# ---------------------------------------------------------------------------------------------------------------
# What the loop delegates: a run's state, episodes ending, evaluating candidates, logging and saving
# ---------------------------------------------------------------------------------------------------------------

class Run:
    """The state of one training run and the bookkeeping the training loop hands over to it. What it opens (envs,
    run folder, loggers) is closed by `resources`, an ExitStack, also when building it fails half-way."""

    def __init__(self, given, args, env_kwargs, resources):
        self.given, self.args, self.env_kwargs = given, args, env_kwargs
        self.device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
        self.env_info = check_env(args.env_id, env_kwargs)
        self.obs_size, self.action_size = self.env_info["obs_size"], self.env_info["action_space"].shape[0]
        self.protocol = evaluation_protocol(args, self.env_info)
        self.instance = instance_key(args.env_id, env_kwargs, args.problem_instance)
        self.saver = open_registry(args, self.instance, self.protocol)
        resumed = read_checkpoint(args.resume) if args.resume else None

        space = self.env_info["action_space"]
        if args.squash_actions and not (np.isfinite(space.low).all() and np.isfinite(space.high).all()):
            raise TrainError(f"--squash-actions needs finite action bounds, and env '{args.env_id}' has {space}")
        self.agent = Agent(self.obs_size, self.action_size, args.hidden_sizes, space.low, space.high,
                           args.squash_actions).to(self.device)
        check_numpy_mirrors(self.agent)
        self.env_action = env_action_map(self.agent)
        self.optimizers, self.clip_groups = make_optimizers(self.agent, args)
        self.base_lrs = [[group["lr"] for group in optimizer.param_groups] for optimizer in self.optimizers]
        self.obs_rms = RunningStats(shape=(self.obs_size,)) if args.norm_obs else None
        self.counters = {"global_step": 0, "rollouts": 0, "resets": 0, "updates": 0, "minibatch_updates": 0,
                         "evaluations": 0}
        self.rho, self.told_duplicate = None, False
        if resumed is not None:
            self.restore(resumed)
        if self.counters["global_step"] + args.num_envs * args.num_steps > args.total_timesteps:
            raise TrainError(f"nothing to train: step {self.counters['global_step']} + one rollout "
                             f"({args.num_envs * args.num_steps} steps) exceeds --total-timesteps "
                             f"{args.total_timesteps}: raise it")
        self.minibatch_size = args.num_envs * args.num_steps // args.num_minibatches
        # Env subprocesses (--async-envs) inherit this: they ignore Ctrl-C and SIGTERM, and this process stops them.
        with signal_handlers(signal.SIG_IGN):
            self.envs, self.reward_normalizer, self.reward_meter = make_training_envs(args, env_kwargs,
                                                                                      self.env_info)
        resources.callback(self.envs.close)
        self.next_state_distribution = (next_state_distribution_of(self.envs, args.env_id, self.action_size)
                                        if args.expected_td else None)
        if resumed is not None and self.reward_normalizer is not None and resumed["reward_rms"] is not None:
            # The scale statistics carry over; the running returns of episodes that no longer exist do not.
            load_rms_state(self.reward_normalizer.return_rms, resumed["reward_rms"])
        self.run_dir = unique_run_dir(self.instance, args)
        resources.push(self.remove_failed_run_dir)
        self.writer = open_writer(self.run_dir, given, args, resources)
        say(f"run: {self.run_dir}  instance: {self.instance}  device: {self.device}")
        say(f"evaluation protocol: {json.dumps(self.protocol)}")
        why_eager = args.compile and why_not_compiled(args.total_timesteps - self.counters["global_step"],
                                                      args.compile_min_steps, self.device.type == "cuda")
        if why_eager:
            say(why_eager)
        compiled = (compiled_minibatch_update(self.agent, self.optimizers, self.clip_groups,
                                              functools.partial(ppo_loss, args=args), args.max_grad_norm,
                                              self.minibatch_size) if args.compile and not why_eager else None)
        self.update = compiled or functools.partial(minibatch_update, self.agent, self.optimizers, self.clip_groups,
                                                    args)

        batch_size = args.num_envs * args.num_steps
        self.final_step = self.counters["global_step"] + (
            (args.total_timesteps - self.counters["global_step"]) // batch_size) * batch_size
        self.start_step, self.start_time, self.rollouts_seen = self.counters["global_step"], time.time(), 0
        self.selection = CandidateSelection(self.start_step, args.eval_every or default_eval_every(
            args.total_timesteps, batch_size, self.protocol, args.eval_nominated, self.env_info["native_vector"]),
            args.eval_nominated,
            args.early_stop_patience, args.lower_is_better)
        self.latest_lta, self.rollout_lta, self.stopped_by_callback = math.nan, math.nan, False
        self.timing = {"rollout_seconds": 0.0, "update_seconds": 0.0, "eval_seconds": 0.0}
        self.stats, self.phase_start = {}, time.perf_counter()
        self.progress = resources.enter_context(contextlib.closing(Progress(self.final_step,
                                                                            self.counters["global_step"])))

    def restore(self, checkpoint):
        """Continue from `--resume`: weights, optimizer state, observation statistics, counters and rho."""
        path, saved = self.args.resume, checkpoint["args"]
        for name in ("hidden_sizes", "norm_obs", "shared_optimizer", "squash_actions"):
            before, now = saved.get(name, getattr(Args(), name)), getattr(self.args, name)
            if (list(before) if name == "hidden_sizes" else before) != (list(now) if name == "hidden_sizes" else now):
                raise TrainError(f"--{name.replace('_', '-')} cannot change on resume: '{path}' was trained with "
                                 f"{before}, this run asks for {now}")
        check_fits_env(checkpoint, path, self.args.env_id, self.env_info)
        load_agent_weights(self.agent, checkpoint, path)
        for optimizer, state in zip(self.optimizers, checkpoint["optimizers"]):
            optimizer.load_state_dict(state)
        if self.obs_rms is not None:
            load_rms_state(self.obs_rms, checkpoint["obs_rms"])
        self.counters.update({name: checkpoint["counters"].get(name, 0) for name in self.counters})
        self.rho = checkpoint["counters"].get("rho")
        say(f"resumed from {path} at step {self.counters['global_step']}")

    def reset_envs(self):
        raw_obs, _ = self.envs.reset(seed=self.args.seed)
        return self.observe(raw_obs)

    def observe(self, raw_obs):
        """Update the running observation statistics and normalise with them."""
        if self.obs_rms is None:
            return raw_obs.astype(np.float32)
        self.obs_rms.update(raw_obs)
        return normalize_observation(raw_obs, self.obs_rms.mean, self.obs_rms.var, self.args.clip_obs)

    def truncation_values(self, infos, bootstrap):
        """V(true final observation) of the envs whose episodes were cut by the time limit (0 elsewhere)."""
        if "final_obs" not in infos:
            raise RuntimeError("a truncation came without infos['final_obs']: this gymnasium's SAME_STEP "
                               "autoreset differs from the one this trainer was written for (gymnasium 1.x)")
        final_obs = np.stack(infos["final_obs"][bootstrap]).astype(np.float32)
        if self.obs_rms is not None:
            final_obs = normalize_observation(final_obs, self.obs_rms.mean, self.obs_rms.var, self.args.clip_obs)
        values = np.zeros(self.args.num_envs, dtype=np.float32)
        with torch.inference_mode():
            values[bootstrap] = self.agent.get_value(torch.from_numpy(final_obs).to(self.device)).squeeze(-1).cpu()
        return values

    def expected_next_value(self, env_action):
        """`--expected-td`: E[V(next state)] per env, over the next states the env says this action can lead to,
        valued like the state the action was chosen in: same critic, same normalisation statistics (a step later they
        will also have counted the next observation, a difference of one sample in all those seen)."""
        next_obs, probabilities = self.next_state_distribution(env_action)
        next_obs = next_obs.astype(np.float32)
        if self.obs_rms is not None:
            next_obs = normalize_observation(next_obs, self.obs_rms.mean, self.obs_rms.var, self.args.clip_obs)
        values = self.rollout_critic(next_obs.reshape(-1, next_obs.shape[-1])).reshape(probabilities.shape)
        return (probabilities * values).sum(axis=1)

    def episodes_ended(self, infos):
        """Log the avg LTA return of the episodes that just ended; a new best of this run nominates the agent
        for evaluation (the measurement itself is too noisy to rank checkpoints by)."""
        ended, step = infos["_episode"], self.counters["global_step"]
        self.counters["resets"] += int(ended.sum())
        returns, lengths = infos["episode"]["r"][ended], infos["episode"]["l"][ended]
        self.latest_lta = average_lta_return(returns, lengths)
        self.writer.add_scalar("charts/episodic_return", returns.mean(), step)
        self.writer.add_scalar("charts/episodic_length", lengths.mean(), step)
        self.writer.add_scalar("charts/avg_LTA_return", self.latest_lta, step)
        if self.selection.measured(self.latest_lta):
            self.writer.add_scalar("charts/best_LTA_return", self.latest_lta, step)

    def begin_rollout(self):
        """Set this rollout's learning rates (the schedule is a function of the steps done)."""
        args = self.args
        factor = learning_rate_factor(args.lr_schedule, self.counters["global_step"], args.total_timesteps,
                                      self.counters["rollouts"], args.lr_decay_rate)
        for optimizer, lrs in zip(self.optimizers, self.base_lrs):
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = lr * factor
        if self.counters["global_step"] < args.actor_starts:
            self.optimizers[0].param_groups[0]["lr"] = 0.0  # the actor's group, shared optimizer or not
        self.lr_factor, self.phase_start = factor, time.perf_counter()
        self.rollout_critic = numpy_mlp(self.agent.critic) if args.expected_td else None

    def end_rollout(self, buffers, on_evaluation):
        """Checks that need a rollout to see, then the evaluation of the agent that collected it, if the candidate
        selection says one is due."""
        args, self.rollouts_seen = self.args, self.rollouts_seen + 1
        self.counters["rollouts"] += 1
        self.timing["rollout_seconds"] += time.perf_counter() - self.phase_start
        self.rollout_lta = self.reward_meter.take()
        self.writer.add_scalar("charts/rollout_average_reward", self.rollout_lta, self.counters["global_step"])
        if args.average_reward and buffers["terminated"].any():
            raise TrainError(f"--average-reward is for continuing tasks, but env '{args.env_id}' terminated an "
                             f"episode: train it in the discounted mode")
        if self.rollouts_seen == 1 and args.gamma == 1 and not args.average_reward and not buffers["terminated"].any():
            warn("gamma = 1 in the discounted mode, and no episode has terminated: on a task without terminations "
                 "the values grow without bound; use --average-reward or a gamma below 1")
        if self.rollouts_seen == 3 and self.counters["resets"] == 0 and (args.reset_steps or
                                                                         self.env_info["time_limit"]) is None:
            warn(f"no episode has ended after {self.counters['global_step']} steps: the env has no time limit, so "
                 f"no LTA return is measured in training (set --reset-steps); periodic evaluations still run")
        if self.selection.due(self.counters["global_step"]):
            self.evaluate_candidate(on_evaluation)
        self.phase_start = time.perf_counter()

    def evaluate_candidate(self, on_evaluation=None):
        """Score the current agent under the protocol; it enters best.pt and the registry by this score only."""
        step, start = self.counters["global_step"], time.perf_counter()
        policy = deterministic_numpy_policy(self.agent, None if self.obs_rms is None else
                                            (self.obs_rms.mean, self.obs_rms.var), self.args.clip_obs)
        evaluation = evaluate(policy, self.args.env_id, self.env_kwargs, self.protocol, self.env_info["native_vector"])
        self.timing["eval_seconds"] += time.perf_counter() - start
        self.counters["evaluations"] += 1
        mean, half_width = evaluation["mean"], evaluation["half_width"]
        for tag, value in [("eval/LTA_return", mean), ("eval/LTA_return_ci_low", mean - half_width),
                           ("eval/LTA_return_ci_high", mean + half_width), ("eval/LTA_return_half_width", half_width),
                           ("perf/eval_seconds", self.timing["eval_seconds"])]:
            self.writer.add_scalar(tag, value, step)
        if self.selection.evaluated(step, evaluation):
            save_atomic(make_checkpoint(self, evaluation), self.run_dir / "best.pt")
            self.writer.add_scalar("eval/best_LTA_return", mean, step)
        try:
            self.saver.submit(mean, lambda: make_checkpoint(self, evaluation), self.run_dir.name, step, half_width)
        except RegistryError as error:
            raise TrainError(str(error)) from None
        if self.saver.duplicate_of is not None and not self.told_duplicate:  # said once: later repeats add nothing
            self.told_duplicate = True
            say("registry: step {} scored exactly as run {run_name} at step {global_step} (the same policy as far as the "
                "protocol can tell): only the earlier entry is kept".format(step, **self.saver.duplicate_of))
        if on_evaluation is not None and on_evaluation(step, evaluation):
            self.stopped_by_callback = True
        return evaluation

    def stopped(self, stop):
        # The first evaluation always sets the best, so patience runs out only after at least one update.
        return stop["requested"] or self.selection.out_of_patience or self.stopped_by_callback

    def log_update(self, losses, ratios, values, returns):
        """TensorBoard scalars of this rollout's learning phase, and the progress bar."""
        self.timing["update_seconds"] += time.perf_counter() - self.phase_start
        (pg_loss, v_loss, entropy_loss), ratio = losses, ratios[-1]
        step, logratio = self.counters["global_step"], ratio.log()
        values, returns = values.reshape(-1), returns.reshape(-1)
        sps = (step - self.start_step) / max(time.time() - self.start_time, 1e-9)
        self.stats = {
            "charts/learning_rate": self.optimizers[0].param_groups[0]["lr"],
            "charts/actor_learning_rate": self.optimizers[0].param_groups[0]["lr"],
            "charts/critic_learning_rate": self.args.critic_lr * self.lr_factor,
            "charts/SPS": sps,
            "perf/rollout_seconds": self.timing["rollout_seconds"],
            "perf/update_seconds": self.timing["update_seconds"],
            "losses/value_loss": v_loss.item(),
            "losses/policy_loss": pg_loss.item(),
            "losses/entropy": entropy_loss.item(),
            "losses/old_approx_kl": (-logratio).mean().item(),
            "losses/approx_kl": ((ratio - 1) - logratio).mean().item(),
            "losses/clipfrac": ((torch.cat(ratios) - 1.0).abs() > self.args.clip_coef).float().mean().item(),
            "losses/explained_variance": explained_variance(values, returns),
            "values/mean_abs_error": float(np.abs(returns - values).mean()),
            "values/returns_variance": float(np.var(returns)),
            **{f"counters/{name}": value for name, value in self.counters.items() if name != "global_step"},
        }
        if self.args.average_reward:
            self.stats["charts/rho"] = self.rho
        for tag, value in self.stats.items():
            self.writer.add_scalar(tag, value, step)
        best = math.nan if self.selection.best is None else self.selection.best["mean"]
        if self.protocol["kind"] == "continuing":  # no need to wait for an episode to end
            self.progress.update(step, sps, "rollout LTA", self.rollout_lta, best)
        else:
            self.progress.update(step, sps, "LTA", self.latest_lta, best)

    def save_latest(self):
        every = self.args.save_latest_every
        if every and self.rollouts_seen % every == 0:
            save_atomic(make_checkpoint(self), self.run_dir / "latest.pt")

    def finish(self, on_evaluation, interrupted):
        """Evaluate the last agent (unless interrupted, to stop at once), save final.pt with its own score,
        print where the run ended and return the summary."""
        stopped_early = self.selection.out_of_patience
        reason = ("interrupted" if interrupted else "early stop" if stopped_early
                  else "stopped by on_evaluation" if self.stopped_by_callback else "done")
        final = None if interrupted or self.counters["updates"] == 0 else self.evaluate_candidate(on_evaluation)
        save_atomic(make_checkpoint(self, final), self.run_dir / "final.pt")  # before any output, which can fail
        self.progress.close()
        say(f"{reason}: step {self.counters['global_step']}/{self.final_step}; evaluations took "
            f"{self.timing['eval_seconds']:.1f} s of {time.time() - self.start_time:.1f} s")
        for name, evaluation in (("best.pt", self.selection.best), ("final.pt", final)):
            if evaluation is not None:
                say(f"{name}: LTA return {format_score(evaluation)} (95% CI over {evaluation['episodes']} "
                    f"{self.protocol['kind']} episodes)")
        say(f"saved in {self.run_dir}")
        return {"run_dir": self.run_dir, "instance": self.instance, "protocol": self.protocol,
                "best": self.selection.best, "final": final, "agent": self.agent, "obs_rms": self.obs_rms,
                "counters": self.counters, "stats": self.stats, "timing": self.timing, "interrupted": interrupted,
                "stopped_early": stopped_early}

    def remove_failed_run_dir(self, error_type, error, traceback):
        """A run that failed on bad input (found only in training, such as an env that terminates) leaves no
        folder behind unless it saved a checkpoint (an exit callback of `resources`)."""
        if isinstance(error, TrainError) and not any(self.run_dir.glob("*.pt")):
            shutil.rmtree(self.run_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# Options: defaults that depend on other options, checks, the command line, and --eval-only
# ---------------------------------------------------------------------------------------------------------------

def resolved_args(args):
    """A copy of `args` with the defaults that depend on other options filled in, and the env kwargs; raises
    TrainError for options that cannot work."""
    gamma = args.gamma if args.gamma is not None else 1.0 if args.average_reward else 0.99
    resolved = dataclasses.replace(
        args, gamma=gamma, lr_schedule=args.lr_schedule or ("linear" if args.anneal_lr else "constant"),
        actor_lr=args.learning_rate if args.actor_lr is None else args.actor_lr,
        critic_lr=args.learning_rate if args.critic_lr is None else args.critic_lr,
        hidden_sizes=tuple(args.hidden_sizes))
    for names, valid, requirement in [
        (["total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "num_threads", "learning_rate",
          "actor_lr", "critic_lr", "clip_coef", "clip_reward", "clip_obs", "top_k"], lambda v: v > 0, "positive"),
        (["reset_steps", "max_grad_norm", "target_kl", "early_stop_patience", "eval_episodes", "eval_horizon",
          "eval_every"], lambda v: v is None or v > 0, "positive (or None)"),
        (["actor_starts", "eval_warmup", "eval_nominated", "save_latest_every", "compile_min_steps"],
         lambda v: v is None or v >= 0, "zero or positive"),
        (["gamma", "gae_lambda"], lambda v: 0 <= v <= 1, "in [0, 1]"),
        (["rho_step_size", "lr_decay_rate"], lambda v: 0 < v <= 1, "in (0, 1]")]:
        for name in names:
            if not valid(getattr(resolved, name)):
                raise TrainError(f"--{name.replace('_', '-')} must be {requirement}, got {getattr(resolved, name)}")
    if resolved.average_reward and resolved.gamma != 1:
        raise TrainError(f"--average-reward needs --gamma 1 (got {resolved.gamma}): centring the differential values "
                         f"is exact only without discounting")
    if resolved.average_reward and not resolved.bootstrap_truncation:
        raise TrainError("--average-reward needs --bootstrap-truncation: time-outs taken as terminations would "
                         "break the cancellation of the value offset; drop --no-bootstrap-truncation")
    if not resolved.hidden_sizes or min(resolved.hidden_sizes) <= 0:
        raise TrainError(f"--hidden-sizes must be one or more positive sizes, got {resolved.hidden_sizes}")
    batch_size = resolved.num_envs * resolved.num_steps
    if batch_size % resolved.num_minibatches:
        raise TrainError(f"the batch (--num-envs {resolved.num_envs} x --num-steps {resolved.num_steps} = "
                         f"{batch_size}) is not divisible by --num-minibatches {resolved.num_minibatches}: "
                         f"choose sizes that divide it")
    if resolved.track and importlib.util.find_spec("wandb") is None:
        raise TrainError("--track needs the wandb package: pip install -r requirements.txt")
    if sum(map(bool, (resolved.eval_only, resolved.compare, resolved.resume))) > 1:
        raise TrainError("--eval-only, --compare and --resume exclude each other: give one")
    if resolved.eval_json and not (resolved.eval_only or resolved.compare):
        raise TrainError("--eval-json writes the scores of --eval-only or --compare: give one of them (a training "
                         "run records its scores in its checkpoints and TensorBoard logs)")
    try:
        env_kwargs = json.loads(resolved.env_kwargs)
    except json.JSONDecodeError as error:
        raise TrainError(f"--env-kwargs is not valid JSON ({error}): give an object such as '{{\"key\": 1}}'") from None
    if not isinstance(env_kwargs, dict):
        raise TrainError(f"--env-kwargs must be a JSON object such as '{{\"key\": 1}}', got {resolved.env_kwargs}")
    return resolved, env_kwargs


HELP_GROUPS = {"exp_name": "run", "env_id": "env", "total_timesteps": "rollout", "learning_rate": "ppo_update",
               "eval_episodes": "evaluation", "problem_instance": "checkpoints"}
NOT_INHERITED = ("resume", "eval_only", "compare", "eval_json")


def cli_args(argv=None):
    """`Args` from the command line, with `--help` in groups (the flags stay flat). With `--resume PATH`,
    `--eval-only PATH` or `--compare PATH B` the checkpoint's options are the defaults, so only what changes needs
    repeating."""
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = checkpoint_defaults(Args, argv, ("--resume", "--eval-only", "--compare"), NOT_INHERITED)
    return grouped_cli(Args, defaults, HELP_GROUPS, argv, __doc__.split("\n\n")[0])


def evaluate_checkpoints(args):
    """`--eval-only PATH`: score a checkpoint under the evaluation protocol of its problem instance (its options
    are the defaults, see `cli_args`); `--compare A B`: both under A's protocol, with their paired difference
    (ppo_support.score_checkpoints)."""
    args, env_kwargs = resolved_args(args)
    return score_checkpoints(args, env_kwargs, agent_from_checkpoint)


def main(argv=None):
    try:
        args = cli_args(argv)
        if args.eval_only or args.compare:
            evaluate_checkpoints(args)
            return 0
        summary = train(args)
    except TrainError as error:
        write_line(sys.stderr, f"error: {error}")
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started (while compiling, say)
        write_line(sys.stderr, "interrupted: files already saved are intact (they are written atomically)")
        return 130
    return 130 if summary["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
