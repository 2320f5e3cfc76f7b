"""The learning math against naive reference implementations, and the truncation bootstrap through a rollout."""

import copy
import math
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn as nn

import ppo_continuous
from ppo_continuous import (TrainError, compute_gae, differential_returns, explained_variance, gaussian_entropy,
                            gaussian_log_prob, learning_rate_factor, make_training_envs, policy_loss, resolved_args,
                            update_rho, value_loss)
from ppo_support import (RunningStats, check_env, check_numpy_mirrors, make_vector_env, mean_confidence_interval,
                         normalize_observation, numpy_mlp, numpy_policy)
import tests.envs  # noqa: F401  (registers the test envs)
from tests.conftest import fast_args


def naive_gae(rewards, values, next_value, terminated, truncated, truncation_values, gamma, lam,
              expected_next_values=None):
    """Sum of (gamma * lam)^l * delta_{t+l}, walking forward until the episode or the rollout ends; with
    `expected_next_values`, each delta bootstraps from its own expected next value (unless terminated)."""
    num_steps, num_envs = rewards.shape
    advantages = np.zeros((num_steps, num_envs))
    for env in range(num_envs):
        def delta(t):
            if terminated[t, env]:
                bootstrap = 0.0
            elif expected_next_values is not None:
                bootstrap = expected_next_values[t, env]
            elif truncated[t, env]:
                bootstrap = truncation_values[t, env]
            elif t == num_steps - 1:
                bootstrap = next_value[env]
            else:
                bootstrap = values[t + 1, env]
            return rewards[t, env] + gamma * bootstrap - values[t, env]

        for t in range(num_steps):
            total, weight = 0.0, 1.0
            for k in range(t, num_steps):
                total += weight * delta(k)
                if terminated[k, env] or truncated[k, env]:
                    break
                weight *= gamma * lam
            advantages[t, env] = total
    return advantages


def monte_carlo_returns(rewards, next_value, terminated, truncated, truncation_values, gamma):
    """lambda = 1: the discounted reward sum to the episode's end plus the discounted bootstrap there."""
    num_steps, num_envs = rewards.shape
    returns = np.zeros((num_steps, num_envs))
    for env in range(num_envs):
        for t in range(num_steps):
            total, discount, k = 0.0, 1.0, t
            while True:
                total += discount * rewards[k, env]
                discount *= gamma
                if terminated[k, env]:
                    break
                if truncated[k, env]:
                    total += discount * truncation_values[k, env]
                    break
                if k == num_steps - 1:
                    total += discount * next_value[env]
                    break
                k += 1
            returns[t, env] = total
    return returns


def random_rollout(seed, num_steps=40, num_envs=5):
    rng = np.random.default_rng(seed)
    terminated = rng.random((num_steps, num_envs)) < 0.08
    truncated = rng.random((num_steps, num_envs)) < 0.08
    truncated[0, 0] = terminated[0, 0] = True  # a time-out on the terminating step: termination wins
    terminated[-1, 1], truncated[-1, 1] = True, False  # terminated at the rollout's last step
    terminated[-1, 2], truncated[-1, 2] = False, True  # truncated at the rollout's last step
    terminated[-1, 3] = truncated[-1, 3] = False  # still running: bootstrap from next_value
    return (rng.normal(size=(num_steps, num_envs)).astype(np.float32),
            rng.normal(size=(num_steps, num_envs)).astype(np.float32),
            rng.normal(size=num_envs).astype(np.float32),
            terminated, truncated,
            rng.normal(size=(num_steps, num_envs)).astype(np.float32))


@pytest.mark.parametrize("gamma", [0.0, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("lam", [0.0, 0.95, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_matches_naive_reference(gamma, lam, seed):
    rewards, values, next_value, terminated, truncated, truncation_values = random_rollout(seed)
    got = compute_gae(rewards, values, next_value, terminated, truncated, truncation_values, gamma, lam)
    want = naive_gae(rewards, values, next_value, terminated, truncated, truncation_values, gamma, lam)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gamma, lam", [(0.99, 0.95), (1.0, 0.0), (1.0, 1.0)])
def test_gae_with_expected_next_values_matches_naive_reference(gamma, lam):
    rewards, values, next_value, terminated, truncated, truncation_values = random_rollout(5)
    expected = np.random.default_rng(6).normal(size=rewards.shape).astype(np.float32)
    got = compute_gae(rewards, values, next_value, terminated, truncated, truncation_values, gamma, lam, expected)
    want = naive_gae(rewards, values, next_value, terminated, truncated, truncation_values, gamma, lam, expected)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, compute_gae(rewards, values, next_value, terminated, truncated, truncation_values,
                                            gamma, lam))


@pytest.mark.parametrize("gamma", [0.9, 1.0])
def test_gae_with_lambda_one_gives_monte_carlo_returns(gamma):
    rewards, values, next_value, terminated, truncated, truncation_values = random_rollout(3)
    advantages = compute_gae(rewards, values, next_value, terminated, truncated, truncation_values, gamma, 1.0)
    want = monte_carlo_returns(rewards, next_value, terminated, truncated, truncation_values, gamma)
    np.testing.assert_allclose(advantages + values, want, rtol=1e-5, atol=1e-4)


def test_truncation_bootstraps_from_the_final_observation_and_termination_does_not():
    rewards = np.array([[1.0, 1.0, 1.0]])
    values = np.array([[0.5, 0.5, 0.5]])
    next_value = np.array([7.0, 7.0, 7.0])  # the value of a reset observation: must never be used here
    terminated = np.array([[True, False, False]])
    truncated = np.array([[False, True, False]])
    truncation_values = np.array([[100.0, 3.0, 100.0]])
    advantages = compute_gae(rewards, values, next_value, terminated, truncated, truncation_values, 1.0, 0.95)
    np.testing.assert_allclose(advantages + values, [[1.0, 1.0 + 3.0, 1.0 + 7.0]])


def test_no_bootstrap_truncation_treats_time_outs_as_terminations():
    rewards, values, next_value, terminated, truncated, truncation_values = random_rollout(4)
    as_terminal = compute_gae(rewards, values, next_value, terminated | truncated, truncated,
                              truncation_values, 0.99, 0.95)
    want = naive_gae(rewards, values, next_value, terminated | truncated, np.zeros_like(truncated),
                     truncation_values, 0.99, 0.95)
    np.testing.assert_allclose(as_terminal, want, rtol=1e-5, atol=1e-5)


def test_gaussian_log_prob_and_entropy_match_torch_distributions():
    torch.manual_seed(0)
    mean, log_std = torch.randn(64, 6), torch.randn(1, 6).expand(64, 6)
    action = mean + torch.randn(64, 6) * 2
    normal = torch.distributions.Normal(mean, log_std.exp())
    torch.testing.assert_close(gaussian_log_prob(action, mean, log_std), normal.log_prob(action).sum(1))
    torch.testing.assert_close(gaussian_entropy(log_std), normal.entropy().sum(1))


def test_policy_loss_is_the_clipped_surrogate():
    torch.manual_seed(1)
    old, new, adv = torch.randn(100), torch.randn(100) * 0.3, torch.randn(100)
    new = old + new
    loss, ratio = policy_loss(new, old, adv, 0.2)
    naive = []
    for r, a in zip(torch.exp(new - old).tolist(), adv.tolist()):
        naive.append(-min(r * a, min(max(r, 0.8), 1.2) * a))
    assert loss.item() == pytest.approx(sum(naive) / len(naive), rel=1e-5)
    torch.testing.assert_close(ratio, torch.exp(new - old))


def test_value_loss_clipped_and_unclipped():
    new, old, ret = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 1.9]), torch.tensor([3.0, -1.0, 0.0])
    assert value_loss(new, old, ret, 0.2, False).item() == pytest.approx(0.5 * (4 + 1 + 4) / 3)
    # clipped values: 0.2, 0.0, 2.0 -> errors 2.8^2 vs 2^2, 1 vs 1, 4 vs 4: the max of each pair
    assert value_loss(new, old, ret, 0.2, True).item() == pytest.approx(0.5 * (2.8 ** 2 + 1 + 4) / 3, rel=1e-6)


def test_explained_variance():
    actual = np.array([1.0, 2.0, 3.0, 4.0])
    assert explained_variance(actual, actual) == 1.0
    assert explained_variance(np.zeros(4), actual) == pytest.approx(1 - np.var(actual) / np.var(actual))
    assert math.isnan(explained_variance(actual, np.ones(4)))


def test_learning_rate_schedules():
    # learning_rate_factor(schedule, global_step, total_timesteps, rollouts_done, decay_rate)
    assert learning_rate_factor("constant", 700, 1000, 7, 0.9) == 1.0
    # Linear: a function of the steps done (so a resumed run with another batch size continues the line).
    assert [learning_rate_factor("linear", step, 1000, 99, 0.9) for step in (0, 250, 600, 1000)] == [
        1.0, 0.75, 0.4, 0.0]
    assert learning_rate_factor("linear", 1200, 1000, 0, 0.9) == 0.0  # never negative
    # Exponential: decay_rate per rollout done, whatever the steps.
    assert learning_rate_factor("exponential", 123, 1000, 0, 0.9) == 1.0
    assert learning_rate_factor("exponential", 0, 1000, 2, 0.9) == pytest.approx(0.81)
    assert learning_rate_factor("exponential", 999, 1000, 3, 0.5) == pytest.approx(0.125)


def test_observation_normalisation_matches_gymnasium_wrapper():
    import gymnasium as gym
    from gymnasium.wrappers.utils import RunningMeanStd
    wrapped = gym.wrappers.NormalizeObservation(gym.make("Pendulum-v1"))
    raw_env = gym.make("Pendulum-v1")
    rms = RunningMeanStd(shape=(3,), dtype=np.float32)  # the wrapper's dtype; the trainer keeps float64
    for raw, normalised in [(raw_env.reset(seed=0)[0], wrapped.reset(seed=0)[0])] + [
            (raw_env.step([a])[0], wrapped.step([a])[0]) for a in (-2.0, 0.5, 2.0)]:
        rms.update(raw[None])
        np.testing.assert_array_equal(normalize_observation(raw, rms.mean, rms.var, np.inf), normalised)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_running_stats_update_is_gymnasiums_bit_for_bit(dtype):
    from gymnasium.wrappers.utils import RunningMeanStd
    rng = np.random.default_rng(0)
    ours, theirs = RunningStats(shape=(5,)), RunningMeanStd(shape=(5,))
    for rows in (1, 1, 3, 1, 8, 1, 1):  # one env, and batches of several, interleaved
        batch = (rng.normal(size=(rows, 5)) * 10 + 3).astype(dtype)
        ours.update(batch)
        theirs.update(batch)
        assert ours.count == theirs.count
        np.testing.assert_array_equal(ours.mean, theirs.mean)
        np.testing.assert_array_equal(ours.var, theirs.var)


def test_reward_scaler_with_running_stats_matches_gymnasiums():
    import gymnasium as gym
    args, env_kwargs = resolved_args(ppo_continuous.Args(env_id="Pendulum-v1", reset_steps=50))
    ours, normalizer, _ = make_training_envs(args, env_kwargs, check_env("Pendulum-v1", env_kwargs))
    assert isinstance(normalizer.return_rms, RunningStats)
    theirs = gym.wrappers.vector.NormalizeReward(make_vector_env("Pendulum-v1", {}, 1, 50, native_vector=False),
                                                 gamma=args.gamma)
    ours.reset(seed=3), theirs.reset(seed=3)
    for action in np.random.default_rng(0).uniform(-2, 2, size=(120, 1, 1)).astype(np.float32):  # 2 episode ends
        np.testing.assert_array_equal(ours.step(action)[1], np.clip(theirs.step(action)[1], -args.clip_reward,
                                                                      args.clip_reward))
    assert normalizer.return_rms.count == theirs.return_rms.count


def test_numpy_policy_matches_get_action_and_value():
    from ppo_continuous import Agent
    torch.manual_seed(0)
    agent = Agent(5, 3, (16, 8))
    with torch.no_grad():
        agent.actor_logstd.copy_(torch.tensor([[0.3, -0.5, 0.1]]))
    obs, noise = torch.randn(4, 5), torch.randn(4, 3)
    action, log_prob, value = numpy_policy(agent)(obs.numpy(), noise.numpy())
    mean = agent.actor_mean(obs)
    want_action = mean + agent.actor_logstd.exp() * noise
    _, want_log_prob, _, want_value = agent.get_action_and_value(obs, want_action)
    np.testing.assert_allclose(action, want_action.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(log_prob, want_log_prob.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(value, want_value.detach().numpy(), rtol=1e-5, atol=1e-6)


class SoftplusStd(ppo_continuous.Agent):
    """An edit a researcher might make: the std through softplus instead of exp."""

    def get_action_and_value(self, x, action=None):
        mean = self.actor_mean(x)
        std = nn.functional.softplus(self.actor_logstd.expand_as(mean))
        action = mean + std * torch.randn_like(mean) if action is None else action
        log_prob = gaussian_log_prob(action, mean, std.log())
        return action, log_prob, gaussian_entropy(std.log()), self.critic(x).squeeze(-1)


class TanhMean(ppo_continuous.Agent):
    """Another: a deterministic action squashed with tanh, whatever --squash-actions says."""

    def get_deterministic_action(self, x):
        return torch.tanh(self.actor_mean(x))


class ScaledValue(ppo_continuous.Agent):
    def get_action_and_value(self, x, action=None):
        action, log_prob, entropy, value = super().get_action_and_value(x, action)
        return action, log_prob, entropy, 2 * value


def test_check_numpy_mirrors_catches_an_agent_edited_without_its_numpy_mirror():
    torch.manual_seed(0)
    check_numpy_mirrors(ppo_continuous.Agent(5, 3, (16, 8)))
    check_numpy_mirrors(ppo_continuous.Agent(5, 3, (16, 8), -np.ones(3), np.ones(3), squash_actions=True))
    for edited, what in [(SoftplusStd, "log-probabilities"), (ScaledValue, "values"),
                         (TanhMean, "deterministic actions")]:
        agent = edited(5, 3, (16, 8))
        with torch.no_grad():  # a mean far from 0, so tanh is not the identity there
            agent.actor_mean[-1].bias.fill_(2.0)
        with pytest.raises(RuntimeError, match=f"numpy policy's {what} differ"):
            check_numpy_mirrors(agent)


def test_update_rho_starts_at_the_first_rollout_mean_then_moves_by_the_step_size():
    assert update_rho(None, np.array([[1.0, 2.0], [3.0, 4.0]]), 0.1) == 2.5
    assert update_rho(2.5, np.array([[5.0, 5.0]]), 0.1) == pytest.approx(2.75)
    assert update_rho(2.5, np.array([[5.0, 5.0]]), 1.0) == 5.0
    assert update_rho(-1.0, np.array([[-1.0, -1.0]]), 0.3) == -1.0


def test_differential_returns_are_the_centred_lambda_returns():
    advantages = np.array([[1.0, 2.0], [3.0, 4.0]])
    values = np.array([[0.0, 0.0], [1.0, 1.0]])
    # returns 1, 2, 4, 5 (mean 3), centred
    np.testing.assert_allclose(differential_returns(advantages, values), [[-2.0, -1.0], [1.0, 2.0]])


def test_mean_confidence_interval_is_the_student_t_interval():
    mean, half_width = mean_confidence_interval([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    # t(0.975, 3) = 3.182446..., sample std sqrt(5/3), n = 4
    assert half_width == pytest.approx(3.182446305284263 * math.sqrt(5 / 3) / 2, rel=1e-9)
    assert mean_confidence_interval([0.5, 0.5, 0.5]) == (0.5, 0.0)
    rng = np.random.default_rng(0)
    sample = rng.normal(size=30)
    low, high = scipy.stats.t.interval(0.95, 29, loc=sample.mean(), scale=scipy.stats.sem(sample))
    assert mean_confidence_interval(sample)[1] == pytest.approx((high - low) / 2, rel=1e-9)


def torch_adam(param_groups):
    """torch.optim.Adam with the groups (parameters, learning rates) of one of `make_optimizers`' optimizers."""
    return torch.optim.Adam([{"params": list(group["params"]), "lr": group["lr"]} for group in param_groups],
                            eps=1e-5, fused=True)


@pytest.mark.parametrize("shared_optimizer", [False, True])
def test_adam_is_torch_adam_bit_for_bit_and_their_states_interchange(shared_optimizer):
    args, _ = resolved_args(ppo_continuous.Args(shared_optimizer=shared_optimizer, actor_lr=1e-3, critic_lr=3e-3))
    agents = []
    for _ in range(2):
        torch.manual_seed(0)
        agents.append(ppo_continuous.Agent(5, 2))
    ours, _ = ppo_continuous.make_optimizers(agents[0], args)
    reference = [torch_adam(optimizer.param_groups) for optimizer in ppo_continuous.make_optimizers(agents[1], args)[0]]
    obs, actions = torch.randn(64, 5), torch.randn(64, 2)

    def train_steps(agent, optimizers, steps):
        for _ in range(steps):
            for optimizer in optimizers:
                optimizer.zero_grad()
            _, log_prob, _, value = agent(obs, actions)
            (log_prob.mean() + value.pow(2).mean()).backward()
            for optimizer in optimizers:
                optimizer.step()

    train_steps(agents[0], ours, 5)
    train_steps(agents[1], reference, 5)
    assert all(torch.equal(a, b) for a, b in zip(agents[0].parameters(), agents[1].parameters()))
    for mine, theirs in zip(ours, reference):
        assert mine.state_dict()["param_groups"] == theirs.state_dict()["param_groups"]
    # Each continues from the other's saved state (old checkpoints hold torch's), on a copy of the other's agent.
    copies = [copy.deepcopy(agent) for agent in agents]
    ours_from_torch = ppo_continuous.make_optimizers(copies[1], args)[0]
    torch_from_ours = [torch_adam(optimizer.param_groups)
                       for optimizer in ppo_continuous.make_optimizers(copies[0], args)[0]]
    for optimizer, saved in zip(ours_from_torch, reference):
        optimizer.load_state_dict(copy.deepcopy(saved.state_dict()))
    for optimizer, saved in zip(torch_from_ours, ours):
        optimizer.load_state_dict(copy.deepcopy(saved.state_dict()))
    for agent, optimizers in ((agents[0], ours), (agents[1], reference), (copies[1], ours_from_torch),
                              (copies[0], torch_from_ours)):
        train_steps(agent, optimizers, 3)
    assert all(torch.equal(a, b) for a, b in zip(agents[0].parameters(), copies[1].parameters()))
    assert all(torch.equal(a, b) for a, b in zip(agents[1].parameters(), copies[0].parameters()))
    with pytest.raises(ValueError, match="parameter groups of sizes"):
        ours[0].load_state_dict({"state": {}, "param_groups": [{"params": [0]}]})


def test_a_short_eager_run_never_imports_torch_dynamo(tmp_path):
    """torch.optim's optimizers import torch._dynamo on first use, about 1.5 s of a short run's start-up."""
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import ppo_continuous; ppo_continuous.main(['--env-id', "
              "'Pendulum-v1', '--total-timesteps', '512', '--num-steps', '256', '--no-compile']); "
              "print('torch._dynamo' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script, str(Path(ppo_continuous.__file__).parent)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "False"


def test_numpy_mlp_refuses_a_network_it_does_not_mirror():
    relu_net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    with pytest.raises(TypeError, match="Linear/Tanh"):
        numpy_mlp(relu_net)
    tanh_net = ppo_continuous.mlp(3, (8,), 1, last_layer_std=1.0)
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    np.testing.assert_allclose(numpy_mlp(tanh_net)(x), tanh_net(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options, want", [(dict(gamma=0.995), 0.995), (dict(gamma=0.9), 0.9),
                                           (dict(gamma=1.0), 0.99), (dict(), 0.99),
                                           (dict(average_reward=True), 0.99)])
def test_reward_scaler_discounts_with_gamma_below_one_else_with_0_99(options, want):
    args, env_kwargs = resolved_args(fast_args(**options))
    envs, reward_normalizer, _ = make_training_envs(args, env_kwargs, check_env(args.env_id, env_kwargs))
    try:
        assert isinstance(reward_normalizer, gym.wrappers.vector.NormalizeReward)
        assert reward_normalizer.gamma == want
    finally:
        envs.close()


def test_a_vector_env_without_same_step_autoreset_is_refused():
    info = check_env("NextStepVector-v0", {})
    assert info["native_vector"]
    with pytest.raises(TrainError, match="SAME_STEP"):
        make_vector_env("NextStepVector-v0", {}, 2, 10, info["native_vector"])


# ---------------------------------------------------------------------------------------------------------------
# The truncation bootstrap through a real rollout: ConstantReward-v0 pays 2 per step, observes [t, 1] and is
# truncated after 10 steps, so every return is known once the critic's values are.
# ---------------------------------------------------------------------------------------------------------------

GAE_ARGS = ("rewards", "values", "next_value", "terminated", "truncated", "truncation_values", "gamma",
            "gae_lambda")


def spy_on_rollouts(monkeypatch):
    """Record compute_gae's inputs and outputs for each rollout, with the critic's value of the true final
    observation [10, 1] and of the observation after the rollout, computed independently with the agent of
    that rollout (compute_gae runs before the learning phase)."""
    calls, agents = [], []
    original_gae, original_optimizers = ppo_continuous.compute_gae, ppo_continuous.make_optimizers

    def make_optimizers(agent, args):
        agents.append(agent)
        return original_optimizers(agent, args)

    def compute_gae(*args):
        advantages = original_gae(*args)
        call = {name: np.copy(value) for name, value in zip(GAE_ARGS, args)}
        with torch.no_grad():
            value_of = lambda obs: agents[-1].get_value(torch.tensor([obs])).item()  # noqa: E731
            call.update(advantages=advantages.copy(), final_value=value_of([10.0, 1.0]))
            call["after_value"] = value_of([float(32 * (len(calls) + 1) % 10), 1.0])
        calls.append(call)
        return advantages

    monkeypatch.setattr(ppo_continuous, "make_optimizers", make_optimizers)
    monkeypatch.setattr(ppo_continuous, "compute_gae", compute_gae)
    return calls


def hand_returns(final_value, after_value, steps_before_first_end, bootstrap, gamma=0.5, reward=2.0,
                 num_steps=32, episode=10):
    """lambda = 1 returns of one env over a rollout: discounted rewards to the end of the episode, plus
    gamma^k V(true final observation) on truncation (or nothing without bootstrapping), or V(observation after
    the rollout) for the unfinished episode at the end."""
    ends = list(range(steps_before_first_end, num_steps, episode))
    returns = np.zeros(num_steps)
    for t in reversed(range(num_steps)):
        if t in ends:
            returns[t] = reward + gamma * (final_value if bootstrap else 0.0)
        elif t == num_steps - 1:
            returns[t] = reward + gamma * after_value
        else:
            returns[t] = reward + gamma * returns[t + 1]
    return returns


@pytest.mark.parametrize("bootstrap", [True, False])
def test_truncation_bootstraps_from_the_true_final_observation_through_the_rollout(indir, monkeypatch, bootstrap):
    calls = spy_on_rollouts(monkeypatch)
    ppo_continuous.train(fast_args(env_id="tests.envs:ConstantReward-v0", num_steps=32, total_timesteps=128,
                                   gamma=0.5, gae_lambda=1.0, moving_average=False, norm_obs=False,
                                   bootstrap_truncation=bootstrap, eval_horizon=None))
    assert len(calls) == 2
    for rollout, call in enumerate(calls):
        first_end = 9 if rollout == 0 else 7  # episodes end at env steps 10, 20, ...: rollout steps 9, 19, 29 / 7, ...
        ends = list(range(first_end, 32, 10))
        assert [t for t in range(32) if call["truncated"][t].all()] == ends and call["truncated"].sum() == 2 * 3
        assert call["gamma"] == 0.5 and call["gae_lambda"] == 1.0
        np.testing.assert_array_equal(call["rewards"], 2.0)
        if bootstrap:
            assert not call["terminated"].any()  # a time-out is not a termination
            np.testing.assert_allclose(call["truncation_values"][ends], call["final_value"], rtol=1e-6)
        else:
            np.testing.assert_array_equal(np.asarray(call["terminated"], bool), call["truncated"])
        returns = call["advantages"] + call["values"]
        want = hand_returns(call["final_value"], call["after_value"], first_end, bootstrap)
        for env in range(2):
            np.testing.assert_allclose(returns[:, env], want, rtol=1e-5, atol=1e-5)


def test_expected_td_bootstraps_from_the_env_next_state_distribution_through_the_rollout(indir, monkeypatch):
    """--expected-td on a queueing network: each step's bootstrap is sum_k p_k V(candidate k) over what the env
    reported before the step, valued by the critic of that rollout, and the advantages are GAE over those."""
    from queueing.vector_env import QueueNetworkVectorEnv
    reported, realised, calls, agents = [], [], [], []
    original_distribution, original_step = QueueNetworkVectorEnv.next_state_distribution, QueueNetworkVectorEnv.step
    original_gae, original_optimizers = ppo_continuous.compute_gae, ppo_continuous.make_optimizers

    def next_state_distribution(self, actions):
        reported.append(original_distribution(self, actions))
        realised.append(self)  # the training env's next step: the one that follows
        return reported[-1]

    def step(self, actions):
        obs, reward, terminated, truncated, infos = original_step(self, actions)
        if realised and realised[-1] is self:  # not the evaluation's envs
            realised[-1] = [infos["final_obs"][copy] if truncated[copy] else obs[copy] for copy in range(len(obs))]
        return obs, reward, terminated, truncated, infos

    def make_optimizers(agent, args):
        agents.append(agent)
        return original_optimizers(agent, args)

    def compute_gae(*args):
        with torch.no_grad():  # before the learning phase: the critic that collected the rollout
            step_reports = reported[-32:]
            want = [(torch.from_numpy(p) * agents[-1].get_value(torch.from_numpy(obs)).squeeze(-1)).sum(-1).numpy()
                    for obs, p in step_reports]
        calls.append((np.copy(args[-1]), np.array(want), original_gae(*args), [np.copy(a) for a in args[:-1]]))
        return calls[-1][2]

    monkeypatch.setattr(QueueNetworkVectorEnv, "next_state_distribution", next_state_distribution)
    monkeypatch.setattr(QueueNetworkVectorEnv, "step", step)
    monkeypatch.setattr(ppo_continuous, "make_optimizers", make_optimizers)
    monkeypatch.setattr(ppo_continuous, "compute_gae", compute_gae)
    ppo_continuous.train(fast_args(env_id="queueing:QueueNetwork-v0", num_steps=32, total_timesteps=128,
                                   env_kwargs='{"instance": "criss-cross-bh", "allocation": "priority"}',
                                   average_reward=True, norm_obs=False, expected_td=True, reset_steps=20))
    assert len(calls) == 2 and len(reported) == 1 + 64  # the probe at start-up, then one per step
    for (candidates, probabilities), next_obs in zip(reported[1:], realised[1:]):  # reported before each step
        for copy, obs in enumerate(next_obs):
            assert probabilities[copy][(candidates[copy] == obs).all(axis=1)].sum() > 0
    for expected, want, advantages, (rewards, values, next_value, terminated, truncated, truncation_values, gamma,
                                     lam) in calls:
        assert truncated.any() and np.ptp(expected) > 0
        np.testing.assert_allclose(expected, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(advantages, naive_gae(rewards, values, next_value, terminated, truncated,
                                                         truncation_values, gamma, lam, want), rtol=1e-4, atol=1e-4)
