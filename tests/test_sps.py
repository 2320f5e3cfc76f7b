"""benchmarks/sps.py: the options both trainers get in --peer, the marginal-speed arithmetic, refused input, and
the env-only stepping of an env with unbounded actions.
No test here times anything."""

import importlib.util
import subprocess
import sys

import pytest

from ppo_continuous import cli_args
from tests.conftest import REPO, one_line_error

spec = importlib.util.spec_from_file_location("sps", REPO / "benchmarks" / "sps.py")
sps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sps)


def run_sps(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "sps.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_our_trainer_reads_the_options_given_to_the_peer_as_the_same_settings():
    settings = dict(env_id="Hopper-v4", total_timesteps=40960, num_envs=8, num_steps=256, num_minibatches=16,
                    update_epochs=4, seed=7)
    command = sps.command_line(["python", "trainer.py"], **settings)
    assert command[:2] == ["python", "trainer.py"]
    args = cli_args(command[2:])
    assert {name: getattr(args, name) for name in settings} == settings


def test_the_suggested_ours_options_leave_only_the_final_one_episode_evaluation():
    args = cli_args(sps.command_line(sps.NO_EVALUATION.split(), env_id="Pendulum-v1", total_timesteps=40960, num_envs=1, num_steps=2048,
                                     num_minibatches=32, update_epochs=10, seed=1))
    assert args.eval_every > args.total_timesteps and args.eval_nominated == 0 and args.eval_episodes == 1


def test_marginal_speed_and_fixed_cost_from_two_run_lengths():
    fixed, speed = 4.5, 2000.0
    marginal, fixed_cost = sps.marginal_and_fixed(2048, fixed + 2048 / speed, 40960, fixed + 40960 / speed)
    assert marginal == pytest.approx(speed)
    assert fixed_cost == pytest.approx(fixed)


@pytest.mark.parametrize("args, expected", [
    (["--peer", "/nonexistent/python trainer.py"], "no command '/nonexistent/python'"),
    (["--peer", "python", "--peer-timesteps", "4096,2048"], "0 < T1 < T2"),
    (["--peer", "python", "--peer-timesteps", "2048,3000"], "multiples of the rollout (2048 steps)"),
    (["--peer", "python", "--env-kwargs", '{"instance": "criss-cross"}'], "--peer runs both trainers with CleanRL's"),
])
def test_refused_peer_options_are_one_line_and_exit_status_2(tmp_path, args, expected):
    result = run_sps("--env-id", "Pendulum-v1", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert expected in one_line_error(result.stderr)
    assert result.stdout == ""


def test_env_only_speed_steps_a_queueing_network_whose_scores_are_unbounded(tmp_path):
    kwargs = '{"instance": "criss-cross-bh", "allocation": "priority"}'
    speed = sps.env_only_sps("queueing:QueueNetwork-v0", 4, 16, 1, tmp_path, env_kwargs=kwargs)
    assert 0 < speed < float("inf")
