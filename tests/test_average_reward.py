"""Average-reward PPO and the built-in queueing instances through the trainer's CLI."""

import pytest
import torch

from tests.conftest import FAST, run_cli, run_dirs, scalars


def test_rho_is_the_average_reward_and_gamma_defaults_to_one(workdir):
    result = run_cli("--env-id", "tests.envs:ConstantReward-v0", *FAST, "--total-timesteps", 1024,
                     "--average-reward", "--no-moving-average", "--eval-episodes", 0, cwd=workdir)
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(workdir)
    assert {value for _, value in scalars(run_dir)["charts/rho"]} == {2.0}
    checkpoint = torch.load(run_dir / "final.pt", weights_only=True)
    assert checkpoint["args"]["gamma"] == 1.0 and checkpoint["counters"]["rho"] == 2.0


def test_rho_follows_a_moving_average_of_the_rollout_rewards(workdir):
    # Pendulum's (unscaled) rewards lie in [-16.3, 0]; rho moves toward each rollout's mean by --rho-step-size.
    result = run_cli("--env-id", "Pendulum-v1", *FAST, "--total-timesteps", 1024, "--average-reward",
                     "--no-moving-average", "--rho-step-size", 0.5, "--eval-episodes", 0, cwd=workdir)
    assert result.returncode == 0, result.stderr
    rhos = [value for _, value in scalars(run_dirs(workdir)[0])["charts/rho"]]
    assert len(rhos) == 4 and all(-16.3 <= rho <= 0 for rho in rhos) and len(set(rhos)) > 1


def test_discounted_mode_logs_no_rho(workdir):
    result = run_cli("--env-id", "Pendulum-v1", *FAST, "--total-timesteps", 256, "--eval-episodes", 0, cwd=workdir)
    assert result.returncode == 0
    (run_dir,) = run_dirs(workdir)
    assert "charts/rho" not in scalars(run_dir)
    assert torch.load(run_dir / "final.pt", weights_only=True)["args"]["gamma"] == 0.99


@pytest.mark.parametrize("instance, mode", [("single-server-2class", []), ("criss-cross", ["--average-reward"]),
                                            ("connectivity-4buffer", ["--average-reward"])])
def test_ppo_runs_on_each_queueing_instance(workdir, instance, mode):
    result = run_cli("--env-id", "queueing:QueueNetwork-v0", "--env-kwargs", f'{{"instance": "{instance}"}}',
                     *FAST, "--total-timesteps", 512, "--reset-steps", 64, "--eval-episodes", 2, *mode, cwd=workdir)
    assert result.returncode == 0, result.stderr
    logged = scalars(run_dirs(workdir)[0])
    assert all(lta < 0 for _, lta in logged["charts/avg_LTA_return"])  # holding costs: the reward is negative
    assert logged["eval/LTA_return"][0][1] < 0
    (folder,) = (workdir / "runs" / "checkpoints").iterdir()
    assert folder.name.startswith("queueing_QueueNetwork-v0__") and instance in folder.name


def test_a_bad_instance_file_is_a_one_line_error(workdir):
    (workdir / "bad.json").write_text('{"name": "bad", "arrival_rates": [0.5], "service_rates": [1.5], '
                                      '"holding_costs": [1], "servers": [[0]]}')
    result = run_cli("--env-id", "queueing:QueueNetwork-v0", "--env-kwargs", '{"instance": "bad.json"}', *FAST,
                     cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "service_rates" in result.stderr and len(result.stderr.strip().splitlines()) == 1
