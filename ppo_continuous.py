"""PPO for continuous actions, in one file, for long-term-average (LTA) performance on problem instances.

The story, top to bottom: `Args` (every option, with its help text), the agent, the math as small pure
functions (Gaussian log-probability, GAE with bootstrapping on truncation, the PPO losses), environment
construction, checkpoints, evaluation, then `train`: collect a rollout, compute advantages, learn, log.
Run `python ppo_continuous.py --help` for the options; README.md explains the terms.
"""

import functools
import json
import math
import os
import pickle
import random
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
import tyro
from gymnasium.vector import AutoresetMode
from gymnasium.wrappers.utils import RunningMeanStd
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn
from torch.optim.adam import adam as functional_adam
from torch.utils.tensorboard import SummaryWriter

from checkpoint_saver import CheckpointSaver, instance_key, save_atomic


@dataclass
class Args:
    exp_name: str = Path(__file__).stem
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment (torch, numpy, python and the environments)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled and a GPU is available, train on it"""
    num_threads: int = 1
    """torch CPU threads; one is fastest for small networks"""
    compile: bool = False
    """compile the minibatch update into one graph (torch.compile): ~3x faster learning; needs a C++ compiler"""

    env_id: str = "HalfCheetah-v4"
    """the gymnasium environment id; `module:EnvId` imports `module` first (for your own registered envs)"""
    env_kwargs: str = "{}"
    """a JSON object of keyword arguments passed to `gym.make`"""
    total_timesteps: int = 1000000
    """total environment steps of the experiment (over all envs)"""
    num_envs: int = 1
    """the number of parallel environments"""
    async_envs: bool = False
    """step the environments in subprocesses (AsyncVectorEnv); worth it for expensive envs"""
    num_steps: int = 2048
    """steps per environment in each rollout (the rollout length)"""
    reset_steps: Optional[int] = None
    """episode time limit per env (a TimeLimit); default: the env's own limit"""

    learning_rate: float = 3e-4
    """the default learning rate of both networks"""
    actor_lr: Optional[float] = None
    """the actor's learning rate (default: --learning-rate)"""
    critic_lr: Optional[float] = None
    """the critic's learning rate (default: --learning-rate)"""
    shared_optimizer: bool = True
    """one Adam over all parameters, grad norm clipped globally; else one Adam per network, each clipped"""
    anneal_lr: bool = True
    """anneal the learning rates linearly to zero (CleanRL's meaning); overridden by --lr-schedule"""
    lr_schedule: Optional[Literal["constant", "linear", "exponential"]] = None
    """learning-rate schedule over rollouts (default: linear with --anneal-lr, else constant)"""
    lr_decay_rate: float = 0.999
    """the per-rollout factor of the exponential schedule"""

    gamma: Optional[float] = None
    """the discount factor (default: 0.99, or 1.0 with --average-reward)"""
    gae_lambda: float = 0.95
    """the lambda of generalized advantage estimation"""
    bootstrap_truncation: bool = True
    """on a time-limit truncation, bootstrap from the value of the true final observation"""
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
    """average-reward PPO: advantages from differential rewards r - rho (see README)"""
    rho_step_size: float = 0.1
    """step size of the moving average that estimates rho, the average reward per step"""

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
    """stop the learning phase early once the approximate KL exceeds this"""
    hidden_sizes: Tuple[int, ...] = (64, 64)
    """hidden layer sizes of both the actor and the critic MLPs"""

    problem_instance: Optional[str] = None
    """the problem-instance key for the checkpoint registry (default: env id + env kwargs)"""
    checkpoint_dir: str = "runs/checkpoints"
    """root of the best-LTA checkpoint registry shared by all runs"""
    top_k: int = 5
    """how many best checkpoints the registry keeps per problem instance"""
    lower_is_better: bool = False
    """the LTA return is a cost: lower is better (for checkpoints, best.pt and early stopping)"""
    early_stop_patience: Optional[int] = None
    """stop when the best LTA return has not improved over this many measurements (default: off)"""
    eval_episodes: int = 10
    """episodes of deterministic evaluation of the run's best agent at the end (0: none)"""
    eval_only: Optional[str] = None
    """evaluate this checkpoint and exit, without training"""
    resume: Optional[str] = None
    """continue training from this checkpoint (weights, statistics, optimizers, counters) as a new run"""


class Agent(nn.Module):
    """CleanRL's continuous agent: separate actor and critic MLPs, state-independent log-std."""

    def __init__(self, obs_size, action_size, hidden_sizes=(64, 64), action_low=None, action_high=None):
        super().__init__()
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
        """The mean action, clipped to the action bounds: the policy used for evaluation."""
        return torch.clamp(self.actor_mean(x), self.action_low, self.action_high)


def numpy_policy(agent):
    """The agent as a numpy function `(obs, noise) -> (action, log_prob, value)` for the per-step rollout.

    Same weights (views, no copy) and same math as `get_action_and_value`; on a CPU a numpy forward of a small
    MLP costs a fraction of a torch call, which otherwise costs more than the env step itself. Float rounding
    differs from torch's in the last bits (README, Speed).
    """
    def linear_layers(net):
        return [(layer.weight.detach().cpu().numpy().T, layer.bias.detach().cpu().numpy())
                for layer in net if isinstance(layer, nn.Linear)]

    def forward(layers, x):
        for weight, bias in layers[:-1]:
            x = np.tanh(x @ weight + bias)
        weight, bias = layers[-1]
        return x @ weight + bias

    actor, critic = linear_layers(agent.actor_mean), linear_layers(agent.critic)
    log_std = agent.actor_logstd.detach().cpu().numpy()

    def act(obs, noise):
        action = forward(actor, obs) + np.exp(log_std) * noise
        log_prob = (-0.5 * noise ** 2 - log_std - LOG_SQRT_2PI).sum(-1)  # = gaussian_log_prob(action, ...)
        return action, log_prob, forward(critic, obs)[:, 0]

    return act


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


LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_log_prob(action, mean, log_std):
    """Log-density of a diagonal Normal, summed over action dimensions (= torch.distributions.Normal's)."""
    return (-((action - mean) ** 2) / (2 * torch.exp(2 * log_std)) - log_std - LOG_SQRT_2PI).sum(-1)


def gaussian_entropy(log_std):
    """Entropy of a diagonal Normal, summed over action dimensions."""
    return (0.5 + LOG_SQRT_2PI + log_std).sum(-1)


def compute_gae(rewards, values, next_value, terminated, truncated, truncation_values, gamma, gae_lambda):
    """Generalized advantage estimates for a rollout of shape (num_steps, num_envs).

    Step t's TD target bootstraps from the value of the state it led to: nothing on termination, the value
    of the true final observation on truncation (`truncation_values[t]`), `values[t + 1]` otherwise, and
    `next_value` (the value of the observation after the rollout) at the last step. Advantages never flow
    across the end of an episode. Pass `truncated` into `terminated` to treat time-outs as terminations.
    """
    next_values = np.concatenate([values[1:], next_value[None]])
    next_values = np.where(truncated, truncation_values, next_values)
    next_values = np.where(terminated, 0.0, next_values)
    deltas = rewards + gamma * next_values - values
    carry = gamma * gae_lambda * ~(terminated | truncated)
    advantages = np.zeros_like(deltas)
    last = np.zeros_like(next_value)
    for t in reversed(range(len(rewards))):
        last = advantages[t] = deltas[t] + carry[t] * last
    return advantages


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
    are clipped together. fused: one Adam kernel per step instead of a Python loop over parameters."""
    actor_params = list(agent.actor_mean.parameters()) + [agent.actor_logstd]
    critic_params = list(agent.critic.parameters())
    if args.shared_optimizer:
        optimizers = [torch.optim.Adam([{"params": actor_params, "lr": args.actor_lr},
                                        {"params": critic_params, "lr": args.critic_lr}], eps=1e-5, fused=True)]
        return optimizers, [actor_params + critic_params]
    optimizers = [torch.optim.Adam(actor_params, lr=args.actor_lr, eps=1e-5, fused=True),
                  torch.optim.Adam(critic_params, lr=args.critic_lr, eps=1e-5, fused=True)]
    return optimizers, [actor_params, critic_params]


def minibatch_update(agent, optimizers, clip_groups, args, minibatch):
    """One gradient step on a minibatch; returns the parts of its loss (see `ppo_loss`)."""
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


def compiled_minibatch_update(agent, optimizers, clip_groups, args, minibatch_size):
    """`minibatch_update` as one graph compiled by torch.compile (--compile); returns `update(minibatch) -> parts`.

    On a CPU each of the ~100 small ops of an eager update costs more in overhead than in arithmetic. Written as a
    pure function (torch.func.grad for the gradients, torch's functional Adam on the optimizers' own state), the
    whole update becomes one graph that inductor compiles into a few C++ kernels. Same math as `minibatch_update`;
    fused kernels round differently in the last bits. Compiles now, on copies, so a failure stops the run up front.
    """
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for param in group["params"]:
                if not optimizer.state[param]:  # Adam creates its state on its first step: the same state, now
                    optimizer.state[param] = {"step": torch.zeros((), device=param.device), "exp_avg":
                                              torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}
    names = [name for name, _ in agent.named_parameters()]
    position = {param: i for i, param in enumerate(agent.parameters())}
    groups = [group for optimizer in optimizers for group in optimizer.param_groups]
    group_positions = [[position[param] for param in group["params"]] for group in groups]
    clip_positions = [[position[param] for param in params] for params in clip_groups]

    def pick(tensors, positions):
        return [tensors[i] for i in positions]

    def loss(params, minibatch):
        outputs = torch.func.functional_call(agent, dict(zip(names, params)), minibatch[:2])
        return ppo_loss(outputs, minibatch, args)

    def update(params, exp_avgs, exp_avg_sqs, steps, lrs, minibatch):
        grads, parts = torch.func.grad(loss, has_aux=True)(params, minibatch)
        if args.max_grad_norm is not None:
            for positions in clip_positions:  # clip_grad_norm_, on gradients that are not in `.grad`
                total_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(grads[i])
                                                                   for i in positions]))
                scale = torch.clamp(args.max_grad_norm / (total_norm + 1e-6), max=1.0)
                for i in positions:
                    grads[i] = grads[i] * scale
        for group, positions, lr in zip(groups, group_positions, lrs):
            # make_optimizers' Adam has no amsgrad (whose extra state this does not create).
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
    try:
        compiled(*copies, tuple(example))
    except Exception as error:
        first_line = next(iter(str(error).strip().splitlines()), "")
        fail(f"--compile failed ({type(error).__name__}: {first_line}): train without --compile")

    def compiled_update(minibatch):
        for lr, group in zip(lrs, groups):
            lr.fill_(group["lr"])
        return compiled(params, exp_avgs, exp_avg_sqs, steps, lrs, minibatch)

    return compiled_update


def explained_variance(predicted, actual):
    var_actual = np.var(actual)
    return np.nan if var_actual == 0 else 1 - np.var(actual - predicted) / var_actual


def learning_rate_factor(schedule, iteration, num_iterations, decay_rate):
    """The factor applied to the base learning rates at rollout `iteration` (1-based)."""
    if schedule == "linear":
        return 1.0 - (iteration - 1.0) / num_iterations
    if schedule == "exponential":
        return decay_rate ** (iteration - 1)
    return 1.0


def normalize_observation(obs, mean, var, clip):
    """What every observation goes through before the networks see it (gymnasium's formula)."""
    return np.clip((obs - mean) / np.sqrt(var + 1e-8), -clip, clip).astype(np.float32)


def average_lta_return(episode_returns, episode_lengths):
    """The seed's avg LTA return: the mean over ended episodes of return per step."""
    return float(np.mean(episode_returns / episode_lengths))


def fail(message):
    """Bad input: one line on stderr, exit status 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def resolve_args(args):
    """Fill the defaults that depend on other options and reject what cannot work."""
    if args.gamma is None:
        args.gamma = 1.0 if args.average_reward else 0.99
    if args.lr_schedule is None:
        args.lr_schedule = "linear" if args.anneal_lr else "constant"
    args.actor_lr = args.learning_rate if args.actor_lr is None else args.actor_lr
    args.critic_lr = args.learning_rate if args.critic_lr is None else args.critic_lr
    positive = ["total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "num_threads",
                "learning_rate", "actor_lr", "critic_lr", "clip_coef", "clip_reward", "clip_obs", "top_k"]
    for name in positive:
        if not getattr(args, name) > 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ["reset_steps", "max_grad_norm", "target_kl", "early_stop_patience"]:
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            fail(f"--{name.replace('_', '-')} must be positive (or None), got {getattr(args, name)}")
    for name in ["gamma", "gae_lambda"]:
        if not 0 <= getattr(args, name) <= 1:
            fail(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    for name in ["rho_step_size", "lr_decay_rate"]:
        if not 0 < getattr(args, name) <= 1:
            fail(f"--{name.replace('_', '-')} must be in (0, 1], got {getattr(args, name)}")
    if args.eval_episodes < 0:
        fail(f"--eval-episodes must be zero or positive, got {args.eval_episodes}")
    if not args.hidden_sizes or min(args.hidden_sizes) <= 0:
        fail(f"--hidden-sizes must be one or more positive sizes, got {args.hidden_sizes}")
    batch_size = args.num_envs * args.num_steps
    if batch_size % args.num_minibatches:
        fail(f"the batch (--num-envs {args.num_envs} x --num-steps {args.num_steps} = {batch_size}) "
             f"is not divisible by --num-minibatches {args.num_minibatches}: choose sizes that divide it")
    if args.total_timesteps < batch_size and not args.eval_only:
        fail(f"--total-timesteps {args.total_timesteps} is less than one rollout "
             f"(--num-envs x --num-steps = {batch_size}): raise it or shorten the rollout")
    if args.eval_only and args.resume:
        fail("--eval-only and --resume exclude each other: give one")
    compiler = os.environ.get("CXX", {"darwin": "clang++", "win32": "cl"}.get(sys.platform, "g++"))  # inductor's
    on_cpu = not (args.cuda and torch.cuda.is_available())
    if args.compile and on_cpu and not args.eval_only and shutil.which(compiler) is None:
        fail(f"--compile needs a C++ compiler and '{compiler}' was not found: install one (or set CXX), "
             f"or train without --compile")
    try:
        env_kwargs = json.loads(args.env_kwargs)
    except json.JSONDecodeError as error:
        fail(f"--env-kwargs is not valid JSON ({error}): give an object such as '{{\"key\": 1}}'")
    if not isinstance(env_kwargs, dict):
        fail(f"--env-kwargs must be a JSON object such as '{{\"key\": 1}}', got {args.env_kwargs}")
    return env_kwargs


class TimeScaledReward(gym.vector.VectorWrapper):
    """The seed's `time_scaled`: the reward at step t of each episode is divided by t (t = 1, 2, ...)."""

    def reset(self, **kwargs):
        self.episode_step = np.zeros(self.num_envs)
        return self.env.reset(**kwargs)

    def step(self, actions):
        obs, reward, terminated, truncated, info = self.env.step(actions)
        self.episode_step += 1
        reward = reward / self.episode_step
        self.episode_step[terminated | truncated] = 0
        return obs, reward, terminated, truncated, info


def make_env_fn(env_id, env_kwargs, reset_steps):
    return lambda: gym.make(env_id, max_episode_steps=reset_steps, **env_kwargs)


def check_env(env_id, env_kwargs, reset_steps):
    """Make one env to turn a bad id, bad kwargs or a non-Box action space into a one-line error.

    Returns the observation size, the action space and the episode time limit (None if there is none).
    """
    try:
        env = make_env_fn(env_id, env_kwargs, reset_steps)()
    except gym.error.Error as error:
        fail(f"cannot make env '{env_id}': {error}")
    except ModuleNotFoundError as error:
        fail(f"cannot make env '{env_id}': {error} (the part before ':' must be an importable module)")
    except (TypeError, ValueError) as error:
        fail(f"cannot make env '{env_id}' with --env-kwargs {json.dumps(env_kwargs)}: {error}")
    obs_space, action_space, time_limit = env.observation_space, env.action_space, env.spec.max_episode_steps
    env.close()
    if not isinstance(action_space, gym.spaces.Box):
        fail(f"env '{env_id}' has action space {action_space}: only continuous (Box) action spaces are supported")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        fail(f"env '{env_id}' has observation space {obs_space}: only flat Box observations are supported")
    return obs_space.shape[0], action_space, time_limit


def make_envs(args, env_kwargs, num_envs, train=True):
    """The vector env: SAME_STEP autoreset (so `final_obs` is real), raw episode statistics first, then the
    reward transformations (training only), and action clipping last so the agent's raw sample is stored."""
    env_fns = [make_env_fn(args.env_id, env_kwargs, args.reset_steps) for _ in range(num_envs)]
    vector_env_class = gym.vector.AsyncVectorEnv if args.async_envs else gym.vector.SyncVectorEnv
    envs = vector_env_class(env_fns, autoreset_mode=AutoresetMode.SAME_STEP)
    envs = gym.wrappers.vector.RecordEpisodeStatistics(envs)
    reward_normalizer = None
    if train and args.time_scaled:
        envs = TimeScaledReward(envs)
    if train and args.moving_average:
        # An undiscounted running return has no stationary scale, so the scaler discounts at 0.99 when gamma = 1.
        envs = reward_normalizer = gym.wrappers.vector.NormalizeReward(envs, gamma=min(args.gamma, 0.99))
        envs = gym.wrappers.vector.ClipReward(envs, -args.clip_reward, args.clip_reward)
    envs = gym.wrappers.vector.ClipAction(envs)
    return envs, reward_normalizer


def rms_state(rms):
    return None if rms is None else {"mean": torch.as_tensor(rms.mean), "var": torch.as_tensor(rms.var),
                                     "count": float(rms.count)}


def load_rms_state(rms, state):
    rms.mean, rms.var, rms.count = state["mean"].numpy().copy(), state["var"].numpy().copy(), state["count"]


def make_checkpoint(agent, obs_rms, reward_normalizer, optimizers, args, counters, instance, score=None):
    """Everything needed to use or resume the agent; plain types only, so `torch.load(weights_only=True)` works."""
    reward_state = None
    if reward_normalizer is not None:
        reward_state = {**rms_state(reward_normalizer.return_rms),
                        "accumulated_reward": torch.as_tensor(reward_normalizer.accumulated_reward)}
    return {
        "agent": agent.state_dict(),
        "obs_size": agent.actor_mean[0].in_features,
        "action_size": agent.actor_logstd.shape[1],
        "obs_rms": rms_state(obs_rms),
        "reward_rms": reward_state,
        "optimizers": [optimizer.state_dict() for optimizer in optimizers],
        "args": {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(args).items()},
        "instance": instance,
        "score": score,
        "global_step": counters["global_step"],
        "iteration": counters["rollouts"],
        "counters": dict(counters),
    }


CHECKPOINT_KEYS = ("agent", "obs_size", "action_size", "obs_rms", "reward_rms", "optimizers", "args", "counters")


def read_checkpoint(path):
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        fail(f"cannot read checkpoint '{path}': {str(error).splitlines()[0]}")
    if not isinstance(checkpoint, dict) or not all(key in checkpoint for key in CHECKPOINT_KEYS):
        fail(f"'{path}' is not a checkpoint of ppo_continuous.py (it lacks the keys {', '.join(CHECKPOINT_KEYS)})")
    return checkpoint


def agent_from_checkpoint(checkpoint):
    agent = Agent(checkpoint["obs_size"], checkpoint["action_size"], tuple(checkpoint["args"]["hidden_sizes"]))
    agent.load_state_dict(checkpoint["agent"])
    return agent


def observation_normalizer(checkpoint):
    """A function from raw observations to the agent's input tensor, with the checkpoint's frozen statistics."""
    stats, clip = checkpoint["obs_rms"], checkpoint["args"]["clip_obs"]
    if stats is None:
        return lambda obs: torch.as_tensor(np.asarray(obs, dtype=np.float32))
    mean, var = stats["mean"].numpy(), stats["var"].numpy()
    return lambda obs: torch.as_tensor(normalize_observation(np.asarray(obs), mean, var, clip))


def load_checkpoint(path):
    """Returns `(agent, normalize_obs)`: the agent in eval mode and its observation normalisation.

    `agent.get_deterministic_action(normalize_obs(raw_obs))` is the policy exactly as it was at training time.
    """
    checkpoint = read_checkpoint(path)
    return agent_from_checkpoint(checkpoint).eval(), observation_normalizer(checkpoint)


def evaluate(agent, normalize_obs, args, env_kwargs, num_episodes, seed, device):
    """Raw returns and lengths of `num_episodes` episodes (one per env) with the deterministic action."""
    envs, _ = make_envs(args, env_kwargs, num_episodes, train=False)
    obs, _ = envs.reset(seed=seed)
    returns, lengths = np.full(num_episodes, np.nan), np.zeros(num_episodes)
    with torch.inference_mode():
        while np.isnan(returns).any():
            action = agent.get_deterministic_action(normalize_obs(obs).to(device)).cpu().numpy()
            obs, _, _, _, infos = envs.step(action)
            if "_episode" in infos:
                first_end = infos["_episode"] & np.isnan(returns)
                returns[first_end] = infos["episode"]["r"][first_end]
                lengths[first_end] = infos["episode"]["l"][first_end]
    envs.close()
    return returns, lengths


def report_evaluation(returns, lengths, writer=None, global_step=0):
    lta = average_lta_return(returns, lengths)
    if writer is not None:
        writer.add_scalar("eval/episodic_return", returns.mean(), global_step)
        writer.add_scalar("eval/LTA_return", lta, global_step)
    print(f"eval: {len(returns)} episodes, episodic return {returns.mean():.4g} +- {returns.std():.3g}, "
          f"LTA return {lta:.6g}")
    return lta


def unique_run_dir(args):
    name = f"{args.env_id.replace(':', '_').replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir, suffix = Path("runs") / name, 1
    while run_dir.exists():
        run_dir, suffix = Path("runs") / f"{name}-{suffix}", suffix + 1
    run_dir.mkdir(parents=True)
    return run_dir


class Progress:
    """A live progress bar on a terminal; plain lines every ~5% of the run otherwise (logs, CI)."""

    def __init__(self, total, start):
        self.total, self.is_terminal, self.last_line = total, sys.stdout.isatty(), -1
        if self.is_terminal:
            self.bar = RichProgress(TextColumn("steps"), BarColumn(), MofNCompleteColumn(),
                                              TimeRemainingColumn(), TextColumn("{task.fields[stats]}"))
            self.task = self.bar.add_task("train", total=total, completed=start, stats="")
            self.bar.start()

    def update(self, step, sps, lta, best):
        stats = f"SPS {sps:.0f}  LTA {lta:.4g}  best {best:.4g}"
        if self.is_terminal:
            self.bar.update(self.task, completed=step, stats=stats)
        elif step * 20 // self.total > self.last_line:
            self.last_line = step * 20 // self.total
            print(f"step {step}/{self.total}  {stats}", flush=True)

    def close(self):
        if self.is_terminal:
            self.bar.stop()


def install_stop_handler():
    """Ctrl-C (or SIGTERM) asks the loop to stop at the end of the current step; a second one interrupts."""
    stop = {"requested": False}

    def handler(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        print("\nstopping at the end of this step (press Ctrl-C again to interrupt)", file=sys.stderr)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def seed_everything(seed, torch_deterministic):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic


def run_evaluation_only(args, device):
    """Evaluate `args.eval_only` on the env and env kwargs it was trained on."""
    checkpoint = read_checkpoint(args.eval_only)
    saved = checkpoint["args"]
    args.env_id, args.clip_obs = saved["env_id"], saved["clip_obs"]
    args.reset_steps = args.reset_steps or saved["reset_steps"]
    env_kwargs = json.loads(saved["env_kwargs"])
    _, _, time_limit = check_env(args.env_id, env_kwargs, args.reset_steps)
    if time_limit is None:
        fail(f"env '{args.env_id}' has no time limit, so evaluation episodes never end: set --reset-steps")
    agent = agent_from_checkpoint(checkpoint).to(device).eval()
    print(f"evaluating {args.eval_only} on {args.env_id} (instance {checkpoint['instance']}, "
          f"saved at step {checkpoint['global_step']}, score {checkpoint['score']})")
    returns, lengths = evaluate(agent, observation_normalizer(checkpoint), args, env_kwargs,
                                max(args.eval_episodes, 1), args.seed, device)
    return report_evaluation(returns, lengths)


def train(args, env_kwargs):
    """The training loop of the seed notes. Returns a summary dict (tests and benchmarks use it)."""
    torch.set_num_threads(args.num_threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    seed_everything(args.seed, args.torch_deterministic)
    if args.eval_only:
        return {"eval_LTA_return": run_evaluation_only(args, device)}
    resumed = read_checkpoint(args.resume) if args.resume else None
    if resumed is not None:
        args.hidden_sizes = tuple(resumed["args"]["hidden_sizes"])
    obs_size, action_space, time_limit = check_env(args.env_id, env_kwargs, args.reset_steps)
    action_size = action_space.shape[0]
    if resumed is not None and (resumed["obs_size"], resumed["action_size"]) != (obs_size, action_size):
        fail(f"checkpoint '{args.resume}' has observation/action sizes {resumed['obs_size']}/"
             f"{resumed['action_size']}, but env '{args.env_id}' has {obs_size}/{action_size}")
    batch_size = args.num_envs * args.num_steps
    minibatch_size = batch_size // args.num_minibatches
    num_iterations = args.total_timesteps // batch_size
    instance = instance_key(args.env_id, env_kwargs, args.problem_instance)
    better = (lambda a, b: a < b) if args.lower_is_better else (lambda a, b: a > b)

    saver = CheckpointSaver(args.checkpoint_dir, instance, top_k=args.top_k, lower_is_better=args.lower_is_better)
    try:
        saver.entries()
    except ValueError as error:  # the instance's registry ranks the other way round
        fail(f"{error} (--lower-is-better)")

    agent = Agent(obs_size, action_size, args.hidden_sizes, action_space.low, action_space.high).to(device)
    optimizers, clip_groups = make_optimizers(agent, args)
    base_lrs = [[group["lr"] for group in optimizer.param_groups] for optimizer in optimizers]
    obs_rms = RunningMeanStd(shape=(obs_size,)) if args.norm_obs else None
    counters = {"global_step": 0, "rollouts": 0, "resets": 0, "updates": 0, "minibatch_updates": 0}
    rho = None
    if resumed is not None:
        agent.load_state_dict(resumed["agent"])
        for optimizer, state in zip(optimizers, resumed["optimizers"]):
            optimizer.load_state_dict(state)
        if obs_rms is not None and resumed["obs_rms"] is not None:
            load_rms_state(obs_rms, resumed["obs_rms"])
        counters.update({name: resumed["counters"][name] for name in counters})
        rho = resumed["counters"].get("rho")
        print(f"resumed from {args.resume} at step {counters['global_step']}")
    timing = {"compile_seconds": 0.0, "rollout_seconds": 0.0, "update_seconds": 0.0}
    if args.compile:
        compile_start = time.perf_counter()
        update = compiled_minibatch_update(agent, optimizers, clip_groups, args, minibatch_size)
        timing["compile_seconds"] = time.perf_counter() - compile_start
        print(f"compiled the minibatch update in {timing['compile_seconds']:.1f} s")
    else:
        update = functools.partial(minibatch_update, agent, optimizers, clip_groups, args)

    # Env subprocesses ignore Ctrl-C (they inherit this while being forked): the main process stops them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    envs, reward_normalizer = make_envs(args, env_kwargs, args.num_envs)
    stop = install_stop_handler()
    run_dir = unique_run_dir(args)
    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
        f"|{key}|{value}|" for key, value in asdict(args).items()))
    print(f"run: {run_dir}  instance: {instance}  device: {device}")
    if args.compile:
        writer.add_scalar("perf/compile_seconds", timing["compile_seconds"], counters["global_step"])

    def normalize(obs):
        if obs_rms is None:
            return obs.astype(np.float32)
        return normalize_observation(obs, obs_rms.mean, obs_rms.var, args.clip_obs)

    def checkpoint(score=None):
        return make_checkpoint(agent, obs_rms, reward_normalizer, optimizers, args,
                               {**counters, "rho": rho}, instance, score)

    # Rollout storage lives in numpy (cheap per-step writes); torch views it without copying for the update.
    obs_buf = np.zeros((args.num_steps, args.num_envs, obs_size), dtype=np.float32)
    actions_buf = np.zeros((args.num_steps, args.num_envs, action_size), dtype=np.float32)
    logprobs_buf = np.zeros((args.num_steps, args.num_envs), dtype=np.float32)
    rewards_buf = np.zeros((args.num_steps, args.num_envs), dtype=np.float32)
    values_buf = np.zeros((args.num_steps, args.num_envs), dtype=np.float32)
    terminated_buf = np.zeros((args.num_steps, args.num_envs), dtype=bool)
    truncated_buf = np.zeros((args.num_steps, args.num_envs), dtype=bool)
    truncation_values_buf = np.zeros((args.num_steps, args.num_envs), dtype=np.float32)

    raw_obs, _ = envs.reset(seed=args.seed)
    if reward_normalizer is not None and resumed is not None and resumed["reward_rms"] is not None:
        load_rms_state(reward_normalizer.return_rms, resumed["reward_rms"])
        reward_normalizer.accumulated_reward[:] = resumed["reward_rms"]["accumulated_reward"].numpy()
    if obs_rms is not None:
        obs_rms.update(raw_obs)
    next_obs = normalize(raw_obs)
    start_step, start_time = counters["global_step"], time.time()
    best_lta, latest_lta, measurements_since_best = math.nan, math.nan, 0
    warned_no_episode, stopped_early = False, False
    progress = Progress(num_iterations * batch_size, counters["global_step"])
    stats = {}

    for iteration in range(counters["rollouts"] + 1, num_iterations + 1):
        rollout_start = time.perf_counter()
        factor = learning_rate_factor(args.lr_schedule, iteration, num_iterations, args.lr_decay_rate)
        for optimizer, lrs in zip(optimizers, base_lrs):
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = lr * factor

        # COLLECT ROLLOUT
        policy = numpy_policy(agent)
        for step in range(args.num_steps):
            counters["global_step"] += args.num_envs
            obs_buf[step] = next_obs
            # torch's generator draws the noise, so the random stream is the one `get_action_and_value` would use.
            action, logprob, value = policy(next_obs, torch.randn(args.num_envs, action_size).numpy())
            actions_buf[step], logprobs_buf[step], values_buf[step] = action, logprob, value
            raw_obs, reward, terminated, truncated, infos = envs.step(action)
            rewards_buf[step], terminated_buf[step], truncated_buf[step] = reward, terminated, truncated
            if obs_rms is not None:
                obs_rms.update(raw_obs)
            next_obs = normalize(raw_obs)

            bootstrap = truncated & ~terminated
            if args.bootstrap_truncation and bootstrap.any():
                final_obs = normalize(np.stack(infos["final_obs"][bootstrap]))
                with torch.inference_mode():
                    final_values = agent.get_value(torch.from_numpy(final_obs).to(device)).squeeze(-1)
                truncation_values_buf[step, bootstrap] = final_values.cpu().numpy()

            if "_episode" in infos:
                ended = infos["_episode"]
                counters["resets"] += int(ended.sum())
                episode_returns, episode_lengths = infos["episode"]["r"][ended], infos["episode"]["l"][ended]
                latest_lta = average_lta_return(episode_returns, episode_lengths)
                writer.add_scalar("charts/episodic_return", episode_returns.mean(), counters["global_step"])
                writer.add_scalar("charts/episodic_length", episode_lengths.mean(), counters["global_step"])
                writer.add_scalar("charts/avg_LTA_return", latest_lta, counters["global_step"])
                if math.isfinite(latest_lta):
                    saver.submit(latest_lta, checkpoint(latest_lta), run_dir.name, counters["global_step"])
                    if math.isnan(best_lta) or better(latest_lta, best_lta):
                        best_lta, measurements_since_best = latest_lta, 0
                        save_atomic(checkpoint(latest_lta), run_dir / "best.pt")
                        writer.add_scalar("charts/best_LTA_return", best_lta, counters["global_step"])
                    else:
                        measurements_since_best += 1
                if args.early_stop_patience and measurements_since_best >= args.early_stop_patience:
                    stopped_early = True
            if stop["requested"] or stopped_early:
                break
        if stop["requested"] or stopped_early:
            break

        if counters["resets"] == 0 and iteration >= 3 and not warned_no_episode:
            warned_no_episode = True
            print(f"warning: no episode has ended after {counters['global_step']} steps, so no LTA return can be "
                  f"measured (and no checkpoint saved): set --reset-steps to give episodes a time limit",
                  file=sys.stderr)

        update_start = time.perf_counter()
        timing["rollout_seconds"] += update_start - rollout_start

        # COMPUTE THE ADVANTAGES, BOOTSTRAPPING WHERE TRAJECTORIES DID NOT END WITH TERMINATION
        with torch.inference_mode():
            next_value = agent.get_value(torch.from_numpy(next_obs).to(device)).squeeze(-1).cpu().numpy()
        rewards = rewards_buf
        if args.average_reward:
            rollout_rho = float(rewards_buf.mean())
            rho = rollout_rho if rho is None else rho + args.rho_step_size * (rollout_rho - rho)
            rewards = rewards_buf - rho
        terminated = terminated_buf if args.bootstrap_truncation else terminated_buf | truncated_buf
        advantages = compute_gae(rewards, values_buf, next_value, terminated, truncated_buf,
                                 truncation_values_buf, args.gamma, args.gae_lambda)
        returns = advantages + values_buf
        if args.average_reward:
            # The differential value is defined up to a constant; pinning its mean at zero stops it drifting.
            returns = returns - returns.mean()

        # PREP ROLLOUT INTO A BATCH
        b_obs = torch.from_numpy(obs_buf.reshape(batch_size, obs_size)).to(device)
        b_actions = torch.from_numpy(actions_buf.reshape(batch_size, action_size)).to(device)
        b_logprobs = torch.from_numpy(logprobs_buf.reshape(batch_size)).to(device)
        b_advantages = torch.from_numpy(advantages.reshape(batch_size)).to(device)
        b_returns = torch.from_numpy(returns.reshape(batch_size)).to(device)
        b_values = torch.from_numpy(values_buf.reshape(batch_size)).to(device)

        # LEARNING PHASE
        batch = (b_obs, b_actions, b_logprobs, b_advantages, b_returns, b_values)
        ratios = []
        for epoch in range(args.update_epochs):
            # Shuffling once per epoch and slicing gives the same random minibatches with one gather per epoch.
            permutation = torch.randperm(batch_size, device=device)
            shuffled = [tensor[permutation] for tensor in batch]
            for start in range(0, batch_size, minibatch_size):
                minibatch = tuple(tensor[start:start + minibatch_size] for tensor in shuffled)
                pg_loss, v_loss, entropy_loss, ratio = update(minibatch)
                counters["minibatch_updates"] += 1
                ratios.append(ratio)
            counters["updates"] += 1
            with torch.no_grad():  # the epoch's last minibatch, as CleanRL logs it and checks target_kl
                logratio = ratio.log()
                old_approx_kl = (-logratio).mean()
                approx_kl = ((ratio - 1) - logratio).mean()
            if args.target_kl is not None and approx_kl > args.target_kl:
                break
        counters["rollouts"] = iteration
        timing["update_seconds"] += time.perf_counter() - update_start

        # LOG
        values_np, returns_np = values_buf.reshape(-1), returns.reshape(-1)
        sps = (counters["global_step"] - start_step) / max(time.time() - start_time, 1e-9)
        stats = {
            "charts/learning_rate": optimizers[0].param_groups[0]["lr"],
            "charts/actor_learning_rate": args.actor_lr * factor,
            "charts/critic_learning_rate": args.critic_lr * factor,
            "charts/SPS": sps,
            "perf/rollout_seconds": timing["rollout_seconds"],
            "perf/update_seconds": timing["update_seconds"],
            "losses/value_loss": v_loss.item(),
            "losses/policy_loss": pg_loss.item(),
            "losses/entropy": entropy_loss.item(),
            "losses/old_approx_kl": old_approx_kl.item(),
            "losses/approx_kl": approx_kl.item(),
            "losses/clipfrac": ((torch.cat(ratios) - 1.0).abs() > args.clip_coef).float().mean().item(),
            "losses/explained_variance": explained_variance(values_np, returns_np),
            "values/mean_abs_error": float(np.abs(returns_np - values_np).mean()),
            "values/returns_variance": float(np.var(returns_np)),
            **{f"counters/{name}": value for name, value in counters.items() if name != "global_step"},
        }
        if args.average_reward:
            stats["charts/rho"] = rho
        for tag, value in stats.items():
            writer.add_scalar(tag, value, counters["global_step"])
        progress.update(counters["global_step"], sps, latest_lta, best_lta)

    progress.close()
    envs.close()
    save_atomic(checkpoint(best_lta if math.isfinite(best_lta) else None), run_dir / "final.pt")
    reason = "interrupted" if stop["requested"] else "early stop" if stopped_early else "done"
    print(f"{reason}: step {counters['global_step']}/{num_iterations * batch_size}, best LTA return {best_lta:.6g}, "
          f"saved {run_dir / 'final.pt'}")
    summary = {"run_dir": run_dir, "agent": agent, "obs_rms": obs_rms, "best_LTA_return": best_lta,
               "counters": counters, "stats": stats, "timing": timing, "interrupted": stop["requested"]}
    if not stop["requested"] and args.eval_episodes > 0:
        if time_limit is None:
            print("no evaluation: the env has no time limit, so episodes never end (set --reset-steps)")
        else:
            best_path = run_dir / "best.pt" if (run_dir / "best.pt").exists() else run_dir / "final.pt"
            best_agent, normalize_obs = load_checkpoint(best_path)
            returns, lengths = evaluate(best_agent.to(device), normalize_obs, args, env_kwargs,
                                        args.eval_episodes, args.seed + 1_000_000, device)
            summary["eval_LTA_return"] = report_evaluation(returns, lengths, writer, counters["global_step"])
    writer.close()
    return summary


def main():
    args = tyro.cli(Args)
    env_kwargs = resolve_args(args)
    try:
        summary = train(args, env_kwargs)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started (while compiling, say)
        print("interrupted: files already saved are intact (they are written atomically)", file=sys.stderr)
        raise SystemExit(130)
    if summary.get("interrupted"):
        raise SystemExit(130)


if __name__ == "__main__":
    main()
