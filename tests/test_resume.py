"""--resume: options from the checkpoint, step counting, the learning-rate schedule, weights and optimizer state."""

import copy

import pytest
import torch

import ppo_continuous
from ppo_continuous import cli_args, train
from tests.conftest import FAST_EVAL, one_line_error, run_cli, run_dirs, scalars, values

# 2 envs x 64 steps = 128 steps per rollout; 8 rollouts; latest.pt every 3 rollouts (so at rollout 6, step 768).
FIRST_RUN = ["--env-id", "Pendulum-v1", "--num-envs", 2, "--num-steps", 64, "--num-minibatches", 4,
             "--update-epochs", 2, "--gamma", 0.95, "--seed", 3, "--total-timesteps", 1024, "--save-latest-every", 3,
             *FAST_EVAL]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """A Pendulum run trained through the CLI with options that differ from the defaults."""
    workdir = tmp_path_factory.mktemp("first")
    result = run_cli(*FIRST_RUN, cwd=workdir)
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(workdir)
    return run_dir.resolve()


def load(path):
    return torch.load(path, weights_only=True)


def test_latest_is_saved_every_n_rollouts(first_run):
    latest = load(first_run / "latest.pt")
    assert latest["global_step"] == 768 and latest["counters"]["rollouts"] == 6
    assert latest["score"] is None  # not evaluated: it is for resuming
    assert load(first_run / "final.pt")["global_step"] == 1024


def test_resume_takes_the_options_from_the_checkpoint(first_run, workdir):
    saved = load(first_run / "final.pt")
    result = run_cli("--resume", first_run / "final.pt", "--total-timesteps", 2048, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert f"resumed from {first_run / 'final.pt'} at step 1024" in result.stdout
    (run_dir,) = run_dirs(workdir)
    assert run_dir.name.startswith("Pendulum-v1__ppo_continuous__3__")  # the env and seed of the checkpoint
    logged = scalars(run_dir)
    # Rollouts of 2 x 64 steps (the checkpoint's --num-steps), numbered on from the checkpoint's.
    assert logged["counters/rollouts"] == [(1024 + 128 * k, 8 + k) for k in range(1, 9)]
    # The linear schedule continues from global_step: 1 - step / total_timesteps at each rollout's start.
    assert values(logged, "charts/learning_rate") == pytest.approx([3e-4 * (1 - (1024 + 128 * k) / 2048)
                                                                   for k in range(8)])
    resumed = load(run_dir / "final.pt")
    assert resumed["global_step"] == 2048 and resumed["counters"]["rollouts"] == 16
    given = resumed["args"]
    assert (given["env_id"], given["num_steps"], given["gamma"], given["seed"], given["total_timesteps"]) == (
        "Pendulum-v1", 64, 0.95, 3, 2048)
    assert given["resume"] == str(first_run / "final.pt")
    assert resumed["protocol"] == saved["protocol"]
    # Adam's step count continues from the checkpoint's (8 more rollouts of 2 epochs x 4 minibatches).
    for before, after in zip(saved["optimizers"][0]["state"].values(), resumed["optimizers"][0]["state"].values()):
        assert int(after["step"]) == int(before["step"]) + 8 * 2 * 4 == 16 * 2 * 4
    # The observation and reward-scale statistics carry over and keep growing.
    assert resumed["obs_rms"]["count"] == pytest.approx(saved["obs_rms"]["count"] + 1024 + 2)
    assert resumed["reward_rms"]["count"] == pytest.approx(saved["reward_rms"]["count"] + 1024)


@pytest.mark.parametrize("flag, name", [(["--hidden-sizes", "32"], "--hidden-sizes"),
                                        (["--no-norm-obs"], "--norm-obs"),
                                        (["--no-shared-optimizer"], "--shared-optimizer"),
                                        (["--squash-actions"], "--squash-actions")])
def test_an_option_that_cannot_change_is_refused(first_run, indir, capsys, flag, name):
    assert ppo_continuous.main(["--resume", str(first_run / "final.pt"), "--total-timesteps", "2048", *flag]) == 2
    assert f"{name} cannot change on resume" in one_line_error(capsys.readouterr().err)
    assert run_dirs(indir) == []


def test_resume_with_more_envs(first_run, indir):
    summary = train(cli_args(["--resume", str(first_run / "final.pt"), "--num-envs", "4",
                              "--total-timesteps", "2048"]))
    logged = scalars(summary["run_dir"])
    assert [step for step, _ in logged["counters/rollouts"]] == [1024 + 256 * k for k in range(1, 5)]
    assert values(logged, "charts/learning_rate")[0] == pytest.approx(3e-4 * 0.5)
    assert summary["counters"]["global_step"] == 2048


def test_resume_never_overshoots_the_total(first_run, indir):
    # latest.pt is at step 768; 3 envs x 64 steps = 192 per rollout: 960 fits under 1100, 1152 would not.
    summary = train(cli_args(["--resume", str(first_run / "latest.pt"), "--num-envs", "3",
                              "--total-timesteps", "1100"]))
    assert summary["counters"]["global_step"] == 960
    assert [step for step, _ in scalars(summary["run_dir"])["counters/rollouts"]] == [960]
    assert load(summary["run_dir"] / "final.pt")["global_step"] == 960


def test_resume_restores_the_weights_and_the_optimizer_state(first_run, indir, monkeypatch):
    """What the first gradient step of the resumed run starts from is exactly what the checkpoint holds."""
    seen = []
    original = ppo_continuous.minibatch_update

    def spy(agent, optimizers, clip_groups, args, minibatch):
        if not seen:
            seen.append(({key: value.clone() for key, value in agent.state_dict().items()},
                         [copy.deepcopy(optimizer.state_dict()) for optimizer in optimizers]))
        return original(agent, optimizers, clip_groups, args, minibatch)

    monkeypatch.setattr(ppo_continuous, "minibatch_update", spy)
    saved = load(first_run / "latest.pt")
    train(cli_args(["--resume", str(first_run / "latest.pt")]))
    (weights, optimizer_states), = seen
    assert weights.keys() == saved["agent"].keys()
    for key, value in saved["agent"].items():
        assert torch.equal(weights[key], value), key
    (state,) = optimizer_states
    assert state["state"].keys() == saved["optimizers"][0]["state"].keys()
    for index, tensors in saved["optimizers"][0]["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state["state"][index][key], tensors[key]), (index, key)
    assert int(state["state"][0]["step"]) == 6 * 2 * 4


def test_nothing_to_train_is_exit_2(first_run, indir, capsys):
    assert ppo_continuous.main(["--resume", str(first_run / "final.pt")]) == 2  # its own total: already reached
    message = one_line_error(capsys.readouterr().err)
    assert "nothing to train: step 1024" in message and "--total-timesteps 1024" in message
    assert run_dirs(indir) == []


def test_resume_rejects_a_checkpoint_of_another_env(first_run, indir, capsys):
    assert ppo_continuous.main(["--env-id", "tests.envs:ConstantReward-v0", "--total-timesteps", "4096",
                                "--resume", str(first_run / "final.pt")]) == 2
    assert "observation/action sizes 3/1" in one_line_error(capsys.readouterr().err)
    assert run_dirs(indir) == []
