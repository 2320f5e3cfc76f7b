"""Average-reward PPO, the gamma guards, and the built-in queueing instances through the trainer."""

import numpy as np
import pytest
import torch

import ppo_continuous
from checkpoint_saver import read_instance
from ppo_continuous import TrainError, resolved_args, train
from tests.conftest import fast_args, one_line_error, run_dirs, scalars, values

CONSTANT = dict(env_id="tests.envs:ConstantReward-v0", eval_horizon=None)


def spy_on_learning(monkeypatch):
    """Record the rewards compute_gae gets and the first epoch's minibatches (the whole batch, shuffled)."""
    rollouts = []
    original_gae, original_update = ppo_continuous.compute_gae, ppo_continuous.minibatch_update

    def compute_gae(rewards, values, *rest):
        advantages = original_gae(rewards, values, *rest)
        rollouts.append({"rewards": np.copy(rewards), "values": np.copy(values), "advantages": advantages.copy(),
                         "minibatches": []})
        return advantages

    def minibatch_update(agent, optimizers, clip_groups, args, minibatch):
        batch_size = args.num_envs * args.num_steps
        seen = rollouts[-1]["minibatches"]
        if sum(len(part[0]) for part in seen) < batch_size:
            seen.append(tuple(tensor.clone() for tensor in minibatch))
        return original_update(agent, optimizers, clip_groups, args, minibatch)

    monkeypatch.setattr(ppo_continuous, "compute_gae", compute_gae)
    monkeypatch.setattr(ppo_continuous, "minibatch_update", minibatch_update)
    return rollouts


def test_rho_is_the_average_reward_and_the_value_targets_are_centred(indir, monkeypatch):
    rollouts = spy_on_learning(monkeypatch)
    summary = train(fast_args(**CONSTANT, total_timesteps=1024, average_reward=True, moving_average=False))
    logged = scalars(summary["run_dir"])
    assert values(logged, "charts/rho") == [2.0] * 4
    checkpoint = torch.load(summary["run_dir"] / "final.pt", weights_only=True)
    assert checkpoint["counters"]["rho"] == 2.0
    assert checkpoint["args"]["gamma"] is None and resolved_args(fast_args(average_reward=True))[0].gamma == 1.0
    assert len(rollouts) == 4
    for rollout in rollouts:
        np.testing.assert_array_equal(rollout["rewards"], 0.0)  # differential rewards r - rho
        returns = torch.cat([minibatch[4] for minibatch in rollout["minibatches"]]).numpy()
        assert len(returns) == 256
        # The value targets the learner sees are the lambda-returns, centred to mean zero.
        assert returns.mean() == pytest.approx(0.0, abs=1e-5)
        uncentred = (rollout["advantages"] + rollout["values"]).reshape(-1)
        np.testing.assert_allclose(np.sort(returns), np.sort(uncentred - uncentred.mean()), rtol=1e-5, atol=1e-5)
        assert abs(uncentred.mean()) > 1e-3  # so centring is not a no-op here
    # The logged value error is measured against the centred targets.
    last = rollouts[-1]
    centred = (last["advantages"] + last["values"]).reshape(-1)
    centred = centred - centred.mean()
    assert values(logged, "values/mean_abs_error")[-1] == pytest.approx(
        np.abs(centred - last["values"].reshape(-1)).mean(), rel=1e-4)
    assert values(logged, "values/returns_variance")[-1] == pytest.approx(np.var(centred), rel=1e-4)


def test_rho_follows_a_moving_average_of_the_rollout_rewards(indir, monkeypatch):
    # Pendulum's (unscaled) rewards lie in [-16.3, 0]; rho moves toward each rollout's mean by --rho-step-size.
    rollouts = spy_on_learning(monkeypatch)
    summary = train(fast_args(total_timesteps=1024, average_reward=True, moving_average=False, rho_step_size=0.5))
    rhos = values(scalars(summary["run_dir"]), "charts/rho")
    assert len(rhos) == 4 and all(-16.3 <= rho <= 0 for rho in rhos) and len(set(rhos)) > 1
    rho = None
    for rollout, logged_rho in zip(rollouts, rhos):
        raw_mean = float(np.mean(rollout["rewards"])) + logged_rho  # the GAE got r - rho
        rho = raw_mean if rho is None else rho + 0.5 * (raw_mean - rho)
        assert logged_rho == pytest.approx(rho, rel=1e-5)


def test_discounted_mode_logs_no_rho(indir):
    summary = train(fast_args(total_timesteps=256))
    assert "charts/rho" not in scalars(summary["run_dir"])
    assert torch.load(summary["run_dir"] / "final.pt", weights_only=True)["counters"]["rho"] is None


def test_average_reward_refuses_a_discount(indir):
    with pytest.raises(TrainError, match=r"--average-reward needs --gamma 1 \(got 0.9\)"):
        train(fast_args(average_reward=True, gamma=0.9))
    assert run_dirs(indir) == []


def test_average_reward_on_a_terminating_env_is_exit_2(indir, capsys):
    code = ppo_continuous.main(["--env-id", "tests.envs:ConstantReward-v0", "--env-kwargs", '{"terminate_after": 5}',
                                "--average-reward", "--num-envs", "2", "--num-steps", "128", "--num-minibatches", "4",
                                "--total-timesteps", "512", "--eval-episodes", "2"])
    assert code == 2
    assert "--average-reward is for continuing tasks" in one_line_error(capsys.readouterr().err)
    assert run_dirs(indir) == []


@pytest.mark.parametrize("env_kwargs, warns", [("{}", True), ('{"terminate_after": 5}', False)])
def test_gamma_one_in_the_discounted_mode_warns_without_terminations(indir, capsys, env_kwargs, warns):
    train(fast_args(**CONSTANT, env_kwargs=env_kwargs, gamma=1.0))
    assert ("gamma = 1 in the discounted mode" in capsys.readouterr().err) == warns
    train(fast_args(**CONSTANT, env_kwargs=env_kwargs, gamma=0.99))
    assert "gamma = 1" not in capsys.readouterr().err


@pytest.mark.parametrize("instance, mode", [("single-server-2class", {}), ("criss-cross", dict(average_reward=True)),
                                            ("connectivity-4buffer", dict(average_reward=True))])
def test_ppo_runs_on_each_queueing_instance(indir, instance, mode):
    summary = train(fast_args(env_id="queueing:QueueNetwork-v0", env_kwargs=f'{{"instance": "{instance}"}}',
                              reset_steps=64, eval_warmup=10, **mode))
    logged = scalars(summary["run_dir"])
    assert all(lta < 0 for lta in values(logged, "charts/avg_LTA_return"))  # holding costs: the reward is negative
    # Two independent measurements of the raw reward agree: each rollout (2 envs x 128 steps) holds exactly two
    # 64-step episodes per env, so its average reward per step is the mean of the two episodic LTA returns logged
    # in it (both envs end together).
    episodic = values(logged, "charts/avg_LTA_return")
    assert len(episodic) == 4 and [step for step, _ in logged["charts/avg_LTA_return"]] == [128, 256, 384, 512]
    assert values(logged, "charts/rollout_average_reward") == pytest.approx(
        [np.mean(episodic[:2]), np.mean(episodic[2:])], rel=1e-5)
    assert summary["protocol"]["kind"] == "continuing" and summary["protocol"]["warmup"] == 10
    assert values(logged, "eval/LTA_return")[0] < 0
    # best.pt re-scored from its file under the same protocol gives exactly its recorded score (common random
    # numbers): the weights, the observation statistics and the problem travel with it.
    best = torch.load(summary["run_dir"] / "best.pt", weights_only=True)
    rescored = ppo_continuous.evaluate_checkpoints(ppo_continuous.cli_args(["--eval-only",
                                                                            str(summary["run_dir"] / "best.pt")]))
    assert rescored["mean"] == best["score"] == summary["best"]["mean"]
    assert summary["instance"].startswith("queueing_QueueNetwork-v0__") and instance in summary["instance"]
    assert read_instance(indir / "runs" / "checkpoints", summary["instance"])["entries"]


def test_queueing_training_episodes_end_at_the_env_time_limit(indir):
    # Without --reset-steps the training envs keep the env's own limit (1000 steps), native vector env or not.
    summary = train(fast_args(env_id="queueing:QueueNetwork-v0", num_steps=512, total_timesteps=2048,
                              eval_warmup=10))
    assert set(values(scalars(summary["run_dir"]), "charts/episodic_length")) == {1000}


def test_a_bad_instance_file_is_a_one_line_error(indir, capsys):
    (indir / "bad.json").write_text('{"name": "bad", "arrival_rates": [0.5], "service_rates": [1.5], '
                                    '"holding_costs": [1], "servers": [[0]]}')
    assert ppo_continuous.main(["--env-id", "queueing:QueueNetwork-v0", "--env-kwargs", '{"instance": "bad.json"}',
                                "--num-envs", "2", "--num-steps", "128", "--num-minibatches", "4"]) == 2
    assert "service_rates" in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("shared_optimizer", [True, False])
def test_actor_starts_holds_the_actor_while_the_critic_learns(indir, monkeypatch, shared_optimizer):
    moved = []  # per minibatch step: (actor moved, critic moved)
    original = ppo_continuous.minibatch_update

    def minibatch_update(agent, optimizers, clip_groups, args, minibatch):
        before = [[param.detach().clone() for param in net.parameters()] for net in (agent.actor_mean, agent.critic)]
        before[0].append(agent.actor_logstd.detach().clone())
        parts = original(agent, optimizers, clip_groups, args, minibatch)
        after = [list(net.parameters()) for net in (agent.actor_mean, agent.critic)]
        after[0].append(agent.actor_logstd)
        moved.append(tuple(any(not torch.equal(a, b) for a, b in zip(old, new)) for old, new in zip(before, after)))
        return parts

    monkeypatch.setattr(ppo_continuous, "minibatch_update", minibatch_update)
    summary = train(fast_args(total_timesteps=1024, actor_starts=512, ent_coef=0.01, shared_optimizer=shared_optimizer))
    per_rollout = len(moved) // 4
    assert per_rollout == 8 and len(moved) == 32
    # Rollouts starting at steps 0 and 256 (< 512) hold the actor; those at 512 and 768 move it.
    assert moved[:2 * per_rollout] == [(False, True)] * (2 * per_rollout)
    assert moved[2 * per_rollout:] == [(True, True)] * (2 * per_rollout)
    actor_lrs = values(scalars(summary["run_dir"]), "charts/actor_learning_rate")
    assert actor_lrs[:2] == [0.0, 0.0] and min(actor_lrs[2:]) > 0
