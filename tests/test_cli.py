"""The trainer end to end through its real command line."""

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ppo_continuous import Args, load_checkpoint
from tests.conftest import FAST, REPO, SCRIPT, run_cli, run_dirs, scalars

REQUIRED_TAGS = [
    "charts/episodic_return", "charts/episodic_length", "charts/learning_rate", "charts/SPS",
    "losses/value_loss", "losses/policy_loss", "losses/entropy", "losses/old_approx_kl", "losses/approx_kl",
    "losses/clipfrac", "losses/explained_variance", "charts/avg_LTA_return", "charts/best_LTA_return",
    "charts/actor_learning_rate", "charts/critic_learning_rate", "values/mean_abs_error",
    "values/returns_variance", "counters/rollouts", "counters/resets", "counters/updates",
    "counters/minibatch_updates", "eval/episodic_return", "eval/LTA_return",
]


def test_help_lists_every_option(workdir):
    result = run_cli("--help", cwd=workdir)
    assert result.returncode == 0
    for name in Args.__dataclass_fields__:
        assert f"--{name.replace('_', '-')}" in result.stdout, name


def test_pendulum_run_logs_every_metric_and_saves_the_agent(workdir):
    result = run_cli("--env-id", "Pendulum-v1", "--total-timesteps", 2048, *FAST, "--reset-steps", 64,
                     "--eval-episodes", 3, cwd=workdir)
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(workdir)
    logged = scalars(run_dir)
    assert set(REQUIRED_TAGS) <= set(logged), set(REQUIRED_TAGS) - set(logged)

    # Both envs end an episode every 64 steps: 2048 / (2 * 64) = 16 measurements.
    returns, lengths, ltas = (logged[tag] for tag in
                              ("charts/episodic_return", "charts/episodic_length", "charts/avg_LTA_return"))
    assert len(ltas) == 16 and all(length == 64 for _, length in lengths)
    for (_, ret), (_, lta) in zip(returns, ltas):
        assert lta == pytest.approx(ret / 64, rel=1e-5)
        assert -16.3 <= lta <= 0  # Pendulum's reward range: raw units, untouched by normalisation
    best = max(value for _, value in ltas)
    assert logged["charts/best_LTA_return"][-1][1] == pytest.approx(best)
    # 8 rollouts of 2 envs x 128 steps, 2 updates (epochs) of 4 minibatches each.
    assert [value for _, value in logged["counters/rollouts"]] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [step for step, _ in logged["counters/rollouts"]] == [256 * i for i in range(1, 9)]
    assert logged["counters/updates"][-1][1] == 8 * 2
    assert logged["counters/minibatch_updates"][-1][1] == 8 * 2 * 4
    assert logged["counters/resets"][-1][1] == 2048 / 64
    lrs = [value for _, value in logged["charts/learning_rate"]]
    assert lrs == pytest.approx([3e-4 * (1 - i / 8) for i in range(8)])  # linear annealing over 8 rollouts
    assert "eval: 3 episodes" in result.stdout

    for name in ("final.pt", "best.pt"):
        checkpoint = torch.load(run_dir / name, weights_only=True)
        assert checkpoint["global_step"] > 0 and checkpoint["args"]["env_id"] == "Pendulum-v1"
    assert torch.load(run_dir / "best.pt", weights_only=True)["score"] == pytest.approx(best)
    agent, normalize_obs = load_checkpoint(run_dir / "final.pt")
    action = agent.get_deterministic_action(normalize_obs([[1.0, 0.0, 0.0]]))
    assert action.shape == (1, 1) and -2.0 <= action.item() <= 2.0


def final_weights(cwd):
    (run_dir,) = run_dirs(cwd)
    return torch.load(run_dir / "final.pt", weights_only=True)["agent"]


def test_same_seed_gives_bit_identical_weights(tmp_path):
    common = ["--env-id", "Pendulum-v1", "--total-timesteps", 1024, *FAST, "--eval-episodes", 0]
    for name, seed in [("a", 7), ("b", 7), ("c", 8)]:
        (tmp_path / name).mkdir()
        assert run_cli(*common, "--seed", seed, cwd=tmp_path / name).returncode == 0
    first, again, other = (final_weights(tmp_path / name) for name in "abc")
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


@pytest.mark.parametrize("flags", [["--time-scaled"], ["--time-scaled", "--moving-average"],
                                   ["--moving-average"], ["--no-moving-average"]])
def test_logged_returns_stay_in_raw_units(workdir, flags):
    # Reward 2 per step, 10-step episodes: every raw return is 20 and every LTA return 2, whatever the scaling.
    result = run_cli("--env-id", "tests.envs:ConstantReward-v0", "--total-timesteps", 512, *FAST, *flags,
                     "--eval-episodes", 2, cwd=workdir)
    assert result.returncode == 0, result.stderr
    logged = scalars(run_dirs(workdir)[0])
    assert {value for _, value in logged["charts/episodic_return"]} == {20.0}
    assert {value for _, value in logged["charts/avg_LTA_return"]} == {2.0}
    assert logged["eval/LTA_return"][0][1] == 2.0


def test_reset_steps_sets_the_episode_time_limit(workdir):
    result = run_cli("--env-id", "Pendulum-v1", "--total-timesteps", 512, *FAST, "--reset-steps", 32,
                     "--eval-episodes", 0, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert {value for _, value in scalars(run_dirs(workdir)[0])["charts/episodic_length"]} == {32}


def test_continuing_env_without_time_limit_warns_once(workdir):
    result = run_cli("--env-id", "tests.envs:Continuing-v0", "--total-timesteps", 2048, *FAST, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("no LTA return can be measured") == 1
    assert "--reset-steps" in result.stderr
    assert "no evaluation" in result.stdout


def test_env_kwargs_reach_the_env(workdir):
    result = run_cli("--env-id", "tests.envs:ConstantReward-v0", "--env-kwargs", '{"reward": -3.5}',
                     "--total-timesteps", 256, *FAST, "--eval-episodes", 0, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert {value for _, value in scalars(run_dirs(workdir)[0])["charts/avg_LTA_return"]} == {-3.5}


@pytest.mark.parametrize("args, message", [
    (["--env-id", "CartPole-v1"], "Discrete(2): only continuous (Box) action spaces are supported"),
    (["--env-id", "tests.envs:DiscreteAction-v0"], "only continuous (Box) action spaces are supported"),
    (["--env-id", "NoSuchEnv-v0"], "cannot make env 'NoSuchEnv-v0'"),
    (["--env-id", "no_such_module:Env-v0"], "must be an importable module"),
    (["--env-id", "Pendulum-v1", "--env-kwargs", "{bad json"], "--env-kwargs is not valid JSON"),
    (["--env-id", "Pendulum-v1", "--env-kwargs", "[1, 2]"], "--env-kwargs must be a JSON object"),
    (["--env-id", "Pendulum-v1", "--env-kwargs", '{"no_such_arg": 1}'], "cannot make env 'Pendulum-v1' with"),
    (["--num-steps", "100", "--num-minibatches", "32"], "is not divisible by --num-minibatches 32"),
    (["--num-envs", "0"], "--num-envs must be positive"),
    (["--num-steps", "-5"], "--num-steps must be positive"),
    (["--total-timesteps", "0"], "--total-timesteps must be positive"),
    (["--gamma", "1.5"], "--gamma must be in [0, 1]"),
    (["--gamma", "-0.1"], "--gamma must be in [0, 1]"),
    (["--reset-steps", "0"], "--reset-steps must be positive"),
    (["--hidden-sizes", "64", "0"], "--hidden-sizes must be one or more positive sizes"),
    (["--eval-only", "no_such_file.pt"], "cannot read checkpoint 'no_such_file.pt'"),
])
def test_bad_input_is_one_line_and_exit_status_2(workdir, args, message):
    result = run_cli(*args, cwd=workdir)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert not (workdir / "runs").exists() or not run_dirs(workdir)


def test_ctrl_c_stops_cleanly_and_saves_the_agent(workdir):
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--env-id", "Pendulum-v1", "--total-timesteps",
                                "10000000", *FAST], cwd=workdir, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((workdir / "runs").glob("*/best.pt")) and time.time() < deadline:
        time.sleep(0.2)  # the first episode has ended and been saved: training is well under way
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted: step" in stdout
    (run_dir,) = run_dirs(workdir)
    checkpoint = torch.load(run_dir / "final.pt", weights_only=True)
    assert 0 < checkpoint["global_step"] < 10_000_000
    assert scalars(run_dir)["charts/avg_LTA_return"]  # TensorBoard was flushed
    assert math.isfinite(checkpoint["score"])
