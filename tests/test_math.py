"""The learning math against naive reference implementations."""

import math

import numpy as np
import pytest
import torch

from ppo_continuous import (compute_gae, explained_variance, gaussian_entropy, gaussian_log_prob,
                            learning_rate_factor, normalize_observation, policy_loss, value_loss)


def naive_gae(rewards, values, next_value, terminated, truncated, truncation_values, gamma, lam):
    """Sum of (gamma * lam)^l * delta_{t+l}, walking forward until the episode or the rollout ends."""
    num_steps, num_envs = rewards.shape
    advantages = np.zeros((num_steps, num_envs))
    for env in range(num_envs):
        def delta(t):
            if terminated[t, env]:
                bootstrap = 0.0
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
    assert learning_rate_factor("constant", 7, 10, 0.9) == 1.0
    assert [learning_rate_factor("linear", i, 4, 0.9) for i in (1, 2, 3, 4)] == [1.0, 0.75, 0.5, 0.25]
    assert learning_rate_factor("exponential", 3, 10, 0.9) == pytest.approx(0.81)


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


def test_numpy_policy_matches_get_action_and_value():
    from ppo_continuous import Agent, numpy_policy
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
