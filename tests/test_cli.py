"""The trainer end to end: through its real command line where the command line is the point, else in-process."""

import dataclasses
import multiprocessing
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ppo_continuous
import ppo_support
from checkpoint_saver import read_instance
from ppo_continuous import Args, TrainError, load_checkpoint, train
from tests.conftest import (FAST, FAST_EVAL, REPO, SCRIPT, fast_args, one_line_error, run_cli, run_dirs, scalars,
                            values)

REQUIRED_TAGS = [
    "charts/episodic_return", "charts/episodic_length", "charts/avg_LTA_return", "charts/best_LTA_return",
    "charts/learning_rate", "charts/actor_learning_rate", "charts/critic_learning_rate", "charts/SPS",
    "losses/value_loss", "losses/policy_loss", "losses/entropy", "losses/old_approx_kl", "losses/approx_kl",
    "losses/clipfrac", "losses/explained_variance", "values/mean_abs_error", "values/returns_variance",
    "counters/rollouts", "counters/resets", "counters/updates", "counters/minibatch_updates",
    "counters/evaluations", "perf/rollout_seconds", "perf/update_seconds", "perf/eval_seconds",
    "eval/LTA_return", "eval/LTA_return_ci_low", "eval/LTA_return_ci_high", "eval/LTA_return_half_width",
    "eval/best_LTA_return",
]


def help_blocks(text):
    """{option flags: (group, help text)} from tyro's boxed --help."""
    blocks, group, current = {}, None, None
    for line in text.splitlines():
        header = re.match(r"╭─ (.*) ─", line)
        if header:
            group, current = header.group(1), None
            continue
        body = line.strip("│╰─╯ ")
        if line.startswith("│ --") or line.startswith("│ -h"):
            current = body.split("  ")[0]
            blocks[current] = [group, body]
        elif current is not None and body:
            blocks[current][1] += " " + body
    return blocks


def test_help_is_grouped_with_one_default_per_option(workdir):
    result = run_cli("--help", cwd=workdir, env={"COLUMNS": "100"})
    assert result.returncode == 0, result.stderr
    blocks = help_blocks(result.stdout)
    groups = {}
    for field in dataclasses.fields(Args):
        flag = f"--{field.name.replace('_', '-')}"
        (key,) = [key for key in blocks if re.match(re.escape(flag) + r"(\s|,|$)", key)]
        group, text = blocks[key]
        groups[field.name] = group
        assert text.count("(default:") == 1, (flag, text)
    assert [groups[name] for name in ("seed", "env_kwargs", "gamma", "target_kl", "eval_seed", "resume")] == [
        "run options", "env options", "rollout options", "ppo-update options", "evaluation options",
        "checkpoints options"]
    assert "(default: 10; 128 for continuing tasks)" in blocks["--eval-episodes {None}|INT"][1]
    assert "(default: None)" not in blocks["--gamma {None}|FLOAT"][1]


def test_the_readme_documents_every_option():
    readme = (REPO / "README.md").read_text()
    undocumented = [field.name for field in dataclasses.fields(Args)
                    if f"`--{field.name.replace('_', '-')}" not in readme]
    assert undocumented == []


def test_pendulum_run_logs_every_metric_evaluates_and_saves_the_agent(workdir):
    result = run_cli("--env-id", "Pendulum-v1", "--total-timesteps", 2048, *FAST, "--reset-steps", 64,
                     "--eval-episodes", 3, "--eval-horizon", 50, "--eval-every", 512, cwd=workdir)
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(workdir)
    assert re.fullmatch(r"Pendulum-v1__ppo_continuous__1__\d+", run_dir.name)
    logged = scalars(run_dir)
    assert set(REQUIRED_TAGS) <= set(logged), set(REQUIRED_TAGS) - set(logged)

    # Both envs end an episode every 64 steps: 2048 / (2 * 64) = 16 measurements, in raw reward units.
    returns, lengths, ltas = (logged[tag] for tag in
                              ("charts/episodic_return", "charts/episodic_length", "charts/avg_LTA_return"))
    assert len(ltas) == 16 and all(length == 64 for _, length in lengths)
    for (_, ret), (_, lta) in zip(returns, ltas):
        assert lta == pytest.approx(ret / 64, rel=1e-5)
        assert -16.3 <= lta <= 0
    assert logged["charts/best_LTA_return"][-1][1] == pytest.approx(max(value for _, value in ltas))
    # 8 rollouts of 2 envs x 128 steps, 2 updates (epochs) of 4 minibatches each.
    assert logged["counters/rollouts"] == [(256 * i, i) for i in range(1, 9)]
    assert logged["counters/updates"][-1][1] == 8 * 2
    assert logged["counters/minibatch_updates"][-1][1] == 8 * 2 * 4
    assert logged["counters/resets"][-1][1] == 2048 / 64
    assert values(logged, "charts/learning_rate") == pytest.approx([3e-4 * (1 - i / 8) for i in range(8)])

    # Evaluations: at least every 512 steps, and the final agent's at the end.
    evaluations = logged["eval/LTA_return"]
    steps = [step for step, _ in evaluations]
    assert steps[0] <= 512 and all(later - earlier <= 512 for earlier, later in zip(steps, steps[1:]))
    assert steps[-1] == 2048 and steps == sorted(steps)
    half_widths = values(logged, "eval/LTA_return_half_width")
    assert all(width > 0 for width in half_widths)  # Pendulum's copies start apart: a real interval
    for (_, mean), (_, low), (_, high), width in zip(evaluations, logged["eval/LTA_return_ci_low"],
                                                     logged["eval/LTA_return_ci_high"], half_widths):
        assert low == pytest.approx(mean - width, abs=1e-5) and high == pytest.approx(mean + width, abs=1e-5)
    scores = values(logged, "eval/LTA_return")
    assert values(logged, "eval/best_LTA_return")[-1] == max(scores)
    assert logged["counters/evaluations"][-1][1] >= len(steps) - 1  # the last one is the final agent's

    # best.pt carries the best evaluated score, final.pt the final agent's own; both the protocol.
    protocol = {"kind": "episodic", "episodes": 3, "horizon": 50, "warmup": 0, "seed": 1_000_000}
    best, final = (torch.load(run_dir / name, weights_only=True) for name in ("best.pt", "final.pt"))
    assert best["score"] == pytest.approx(max(scores), abs=1e-6)
    assert best["half_width"] == pytest.approx(half_widths[scores.index(max(scores))], abs=1e-6)
    assert final["score"] == pytest.approx(scores[-1], abs=1e-6)
    assert final["half_width"] == pytest.approx(half_widths[-1], abs=1e-6)
    assert best["protocol"] == final["protocol"] == protocol
    assert final["global_step"] == 2048 and final["args"]["env_id"] == "Pendulum-v1"
    assert final["args"]["gamma"] is None and final["args"]["lr_schedule"] is None  # the options as given
    assert f"best.pt: LTA return {best['score']:.6g} +- " in result.stdout
    assert f"final.pt: LTA return {final['score']:.6g} +- " in result.stdout

    # The registry holds evaluated scores only: the best of all evaluations, with their half-widths.
    index = read_instance(workdir / "runs" / "checkpoints", "Pendulum-v1")
    assert index["protocol"] == protocol and index["top_k"] == 5 and index["lower_is_better"] is False
    assert [entry["score"] for entry in index["entries"]] == pytest.approx(sorted(scores, reverse=True)[:5],
                                                                           abs=1e-6)
    for entry in index["entries"]:
        assert entry["half_width"] == pytest.approx(half_widths[scores.index(
            min(scores, key=lambda score: abs(score - entry["score"])))], abs=1e-6)
        assert entry["run_name"] == run_dir.name

    agent, normalize_obs = load_checkpoint(run_dir / "final.pt")
    action = agent.get_deterministic_action(normalize_obs([[1.0, 0.0, 0.0]]))
    assert action.shape == (1, 1) and -2.0 <= action.item() <= 2.0


def test_exponential_schedule_and_target_kl_through_the_cli(indir):
    assert ppo_continuous.main(["--env-id", "Pendulum-v1", "--total-timesteps", "1024", *FAST, *FAST_EVAL,
                                "--update-epochs", "4", "--lr-schedule", "exponential", "--lr-decay-rate", "0.5",
                                "--target-kl", "1e-9"]) == 0
    logged = scalars(run_dirs(indir)[0])
    assert values(logged, "charts/learning_rate") == pytest.approx([3e-4 * 0.5 ** k for k in range(4)])
    assert values(logged, "charts/actor_learning_rate") == pytest.approx([3e-4 * 0.5 ** k for k in range(4)])
    # The approximate KL exceeds 1e-9 after the first epoch: one of the 4 epochs per rollout, all its minibatches.
    assert values(logged, "counters/updates") == [1, 2, 3, 4]
    assert values(logged, "counters/minibatch_updates") == [4, 8, 12, 16]


def final_weights(summary):
    return torch.load(summary["run_dir"] / "final.pt", weights_only=True)["agent"]


def test_same_seed_gives_bit_identical_weights_with_or_without_async_envs(indir):
    first = final_weights(train(fast_args(seed=7)))
    in_subprocesses = final_weights(train(fast_args(seed=7, async_envs=True)))
    other = final_weights(train(fast_args(seed=8)))
    assert all(torch.equal(first[key], in_subprocesses[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_a_rerun_of_the_same_seed_adds_no_copies_to_the_registry_and_says_so(indir, capsys):
    first = train(fast_args(seed=3))
    entries = read_instance("runs/checkpoints", first["instance"])["entries"]
    capsys.readouterr()
    train(fast_args(seed=3))
    assert read_instance("runs/checkpoints", first["instance"])["entries"] == entries
    assert {entry["run_name"] for entry in entries} == {first["run_dir"].name}
    told = [line for line in capsys.readouterr().out.splitlines() if line.startswith("registry:")]
    assert len(told) == 1 and f"run {first['run_dir'].name} at step" in told[0], told


@pytest.mark.parametrize("options", [dict(time_scaled=True), dict(time_scaled=True, moving_average=True),
                                     dict(moving_average=True), dict(moving_average=False)])
def test_logged_returns_stay_in_raw_units(indir, options):
    # Reward 2 per step, 10-step episodes: every raw return is 20 and every LTA return 2, whatever the scaling.
    summary = train(fast_args(env_id="tests.envs:ConstantReward-v0", eval_horizon=None, **options))
    logged = scalars(summary["run_dir"])
    assert set(values(logged, "charts/episodic_return")) == {20.0}
    assert set(values(logged, "charts/avg_LTA_return")) == {2.0}
    assert set(values(logged, "eval/LTA_return")) == {2.0}
    assert summary["best"]["mean"] == summary["final"]["mean"] == 2.0


def test_reset_steps_sets_the_training_time_limit(indir):
    summary = train(fast_args(reset_steps=32))
    assert set(values(scalars(summary["run_dir"]), "charts/episodic_length")) == {32}


def test_no_episode_warning_only_when_the_env_has_no_time_limit(indir, capsys):
    # Continuing-v0 has no time limit: three rollouts without an episode end warn once; evaluations still run.
    summary = train(fast_args(env_id="tests.envs:Continuing-v0", total_timesteps=1024))
    stderr = capsys.readouterr().err
    assert stderr.count("no episode has ended") == 1 and "--reset-steps" in stderr
    logged = scalars(summary["run_dir"])
    assert "charts/avg_LTA_return" not in logged and logged["eval/LTA_return"]
    # With --reset-steps episodes end: no warning.
    train(fast_args(env_id="tests.envs:Continuing-v0", total_timesteps=1024, reset_steps=16))
    assert "no episode has ended" not in capsys.readouterr().err
    # An env with its own time limit needs no --reset-steps: no warning either.
    train(fast_args(env_id="tests.envs:ConstantReward-v0", total_timesteps=1024, eval_horizon=None))
    assert "no episode has ended" not in capsys.readouterr().err


def test_a_continuing_task_shows_and_logs_the_average_reward_of_each_rollout(workdir):
    # Reward t at step t and no episode ends: rollout k (2 envs x 128 steps) averages 128 k + 64.5, in the env's own
    # units whatever the reward scaling does.
    result = run_cli("--env-id", "tests.envs:StepIndexReward-v0", "--total-timesteps", 1024, *FAST, *FAST_EVAL,
                     cwd=workdir)
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(workdir)
    assert scalars(run_dir)["charts/rollout_average_reward"] == [(256 * (k + 1), 128 * k + 64.5) for k in range(4)]
    progress = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [line.split("rollout LTA ")[1].split()[0] for line in progress] == ["64.5", "192.5", "320.5", "448.5"]


def test_the_headline_mujoco_run_is_quiet_and_leaves_no_log_file(indir):
    import mujoco
    result = run_cli("--env-id", "HalfCheetah-v4", "--total-timesteps", 256, *FAST, *FAST_EVAL, cwd=indir)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no `settotalmass` notices, no advice to move to v5
    assert not (indir / "MUJOCO_LOG.TXT").exists()
    # train() as a library function puts MuJoCo's warning handler back.
    train(fast_args(env_id="HalfCheetah-v4", total_timesteps=256))
    assert mujoco.get_mju_user_warning() is None and not (indir / "MUJOCO_LOG.TXT").exists()


def test_env_kwargs_reach_the_env(indir):
    summary = train(fast_args(env_id="tests.envs:ConstantReward-v0", env_kwargs='{"reward": -3.5}', eval_horizon=None,
                              total_timesteps=256))
    assert set(values(scalars(summary["run_dir"]), "charts/avg_LTA_return")) == {-3.5}
    assert summary["final"]["mean"] == -3.5


PENDULUM = ["--env-id", "Pendulum-v1", *FAST, *FAST_EVAL]


@pytest.mark.parametrize("args, message", [
    (["--env-id", "CartPole-v1"], "Discrete(2): only continuous (Box) action spaces are supported"),
    (["--env-id", "tests.envs:DiscreteAction-v0"], "only continuous (Box) action spaces are supported"),
    (["--env-id", "NoSuchEnv-v0"], "cannot make env 'NoSuchEnv-v0'"),
    (["--env-id", "no_such_module:Env-v0"], "must be an importable module"),
    (["--env-id", "Pendulum-v1", "--env-kwargs", "{bad json"], "--env-kwargs is not valid JSON"),
    (["--env-id", "Pendulum-v1", "--env-kwargs", "[1, 2]"], "--env-kwargs must be a JSON object"),
    (["--env-id", "Pendulum-v1", "--env-kwargs", '{"no_such_arg": 1}'], "cannot make env 'Pendulum-v1' with"),
    (["--env-id", "tests.envs:ConstantReward-v0", "--env-kwargs", '{"fail_at_step": 1}'],
     "fails at its first step (ValueError: broken at step 1)"),
    (["--num-steps", "100", "--num-minibatches", "32"], "is not divisible by --num-minibatches 32"),
    (["--num-envs", "0"], "--num-envs must be positive"),
    (["--num-steps", "-5"], "--num-steps must be positive"),
    (["--total-timesteps", "0"], "--total-timesteps must be positive"),
    ([*PENDULUM, "--total-timesteps", "255"], "nothing to train"),
    (["--gamma", "1.5"], "--gamma must be in [0, 1]"),
    (["--gamma", "-0.1"], "--gamma must be in [0, 1]"),
    (["--lr-decay-rate", "0"], "--lr-decay-rate must be in (0, 1]"),
    (["--reset-steps", "0"], "--reset-steps must be positive"),
    (["--hidden-sizes", "64", "0"], "--hidden-sizes must be one or more positive sizes"),
    (["--average-reward", "--gamma", "0.9"], "--average-reward needs --gamma 1 (got 0.9)"),
    (["--average-reward", "--no-bootstrap-truncation"], "--average-reward needs --bootstrap-truncation"),
    ([*PENDULUM, "--expected-td"], "--expected-td needs a vector env with a next_state_distribution method"),
    (["--env-id", "queueing:QueueNetwork-v0", "--env-kwargs", '{"instance": "criss-cross"}', "--expected-td"],
     "--expected-td: network 'criss-cross': the next-state distribution is available for continuous-time"),
    ([*PENDULUM, "--eval-episodes", "1"], "--eval-episodes must be at least 2"),
    ([*PENDULUM, "--eval-warmup", "10"], "--eval-warmup applies to continuing tasks only"),
    (["--env-id", "tests.envs:Continuing-v0", *FAST], "has no time limit, so evaluation episodes would never end"),
    ([*PENDULUM, "--checkpoint-dir", "a_file/checkpoints"], "cannot write checkpoints under --checkpoint-dir"),
    (["--eval-only", "no_such_file.pt"], "cannot read checkpoint 'no_such_file.pt'"),
    (["--resume", "no_such_file.pt"], "cannot read checkpoint 'no_such_file.pt'"),
])
def test_bad_input_is_one_line_and_exit_status_2(indir, capsys, args, message):
    (indir / "a_file").write_text("a file, not a folder")
    assert ppo_continuous.main(args) == 2
    assert message in one_line_error(capsys.readouterr().err)
    assert run_dirs(indir) == []


def test_a_failure_after_the_envs_exist_leaves_no_env_process_and_no_folder(indir):
    # The run folder cannot be created ('runs' is a file) after the env subprocesses (--async-envs) are started.
    (indir / "runs").write_text("a file, not a folder")
    with pytest.raises(TrainError, match="cannot create the run folder") as failure:
        train(fast_args(async_envs=True, checkpoint_dir="registry"))
    # Even while the error (and with it the half-built run) is still referenced, as by a caller that logs it.
    assert failure.traceback and multiprocessing.active_children() == []
    assert (indir / "runs").read_text() == "a file, not a folder"


def test_a_long_instance_key_is_cut_in_the_run_name_but_kept_whole_in_the_checkpoint(indir):
    summary = train(fast_args(problem_instance="study-" + "x" * 150))
    assert len(summary["instance"]) == 120
    name = summary["run_dir"].name
    assert len(name) <= 80 + len("__ppo_continuous__1__1796080915") and name.startswith("study-xxx")
    assert torch.load(summary["run_dir"] / "final.pt", weights_only=True)["instance"] == summary["instance"]
    other = train(fast_args(problem_instance="study-" + "x" * 149))["run_dir"].name
    assert other.split("__ppo_continuous")[0] != name.split("__ppo_continuous")[0]


def test_runs_started_in_the_same_second_get_their_own_folders(indir, monkeypatch):
    monkeypatch.setattr(ppo_support.time, "time", lambda: 1_000_000_000.0)  # (in the past: no file looks stale)
    first = train(fast_args(total_timesteps=256))["run_dir"]
    assert first.name == "Pendulum-v1__ppo_continuous__1__1000000000"
    # Another run takes the next name between a look and a mkdir: the folder must be claimed by the mkdir itself.
    (indir / "runs" / f"{first.name}-1").mkdir()
    exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda path: False if path.parent.name == "runs" and
                        path.name.startswith(first.name) else exists(path))
    second = train(fast_args(total_timesteps=256))["run_dir"]
    assert second.name == f"{first.name}-2" and (second / "final.pt").exists()
    assert not any((indir / "runs" / f"{first.name}-1").iterdir())  # the other run's folder was left alone


def test_bad_checkpoint_files_and_outputs_are_one_line_before_any_work(indir):
    pendulum = train(fast_args(total_timesteps=256))["run_dir"] / "final.pt"
    cheetah = train(fast_args(env_id="HalfCheetah-v4", total_timesteps=256))["run_dir"] / "final.pt"
    before = run_dirs(indir)
    (indir / "empty.pt").write_bytes(b"")
    (indir / "corrupt.pt").write_bytes(b"\x80\x04garbage that torch.load cannot read")
    (indir / "a_file").write_text("a file, not a folder")
    corrupt = "the file is corrupt or not a checkpoint"
    for args, message in [
        (["--eval-only", "empty.pt"], f"cannot read checkpoint 'empty.pt': {corrupt}"),
        (["--eval-only", "corrupt.pt"], f"cannot read checkpoint 'corrupt.pt': {corrupt}"),
        (["--resume", "corrupt.pt"], f"cannot read checkpoint 'corrupt.pt': {corrupt}"),
        (["--compare", pendulum, "corrupt.pt"], f"cannot read checkpoint 'corrupt.pt': {corrupt}"),
        (["--eval-only", cheetah, "--env-id", "Pendulum-v1"],
         "has observation/action sizes 17/6, but env 'Pendulum-v1' has 3/1: give the --env-id"),
        (["--eval-only", pendulum, "--eval-json", "a_file/score.json"], "'a_file' is not an existing folder"),
        (["--eval-only", pendulum, "--eval-json", "."], "is a folder"),
        ([*PENDULUM, "--eval-json", "score.json"], "--eval-json writes the scores of --eval-only or --compare"),
    ]:
        result = run_cli(*args, cwd=indir)
        assert result.returncode == 2, (args, result.stderr)
        line = one_line_error(result.stderr)
        assert message in line and "weights_only=False" not in line, line
        assert result.stdout == "", args  # refused before anything was evaluated or trained
    assert run_dirs(indir) == before and not (indir / "score.json").exists()


def test_a_checkpoint_that_does_not_fit_the_agent_is_one_line(indir, capsys):
    summary = train(fast_args(total_timesteps=256))
    checkpoint = torch.load(summary["run_dir"] / "final.pt", weights_only=True)
    checkpoint["agent"]["critic.2.weight"] = torch.zeros(1, 32)  # was (1, 64)
    torch.save(checkpoint, indir / "misfit.pt")
    before = run_dirs(indir)
    result = run_cli("--eval-only", "misfit.pt", cwd=indir)
    assert result.returncode == 2
    assert "checkpoint 'misfit.pt' does not fit the agent" in one_line_error(result.stderr)
    assert ppo_continuous.main(["--resume", "misfit.pt", "--total-timesteps", "1024"]) == 2
    assert "checkpoint 'misfit.pt' does not fit the agent" in one_line_error(capsys.readouterr().err)
    assert run_dirs(indir) == before


def test_a_reader_that_goes_away_does_not_stop_the_run(workdir):
    """`python ppo_continuous.py ... | head -1`: no traceback, and the run finishes and saves."""
    process = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, PENDULUM), "--total-timesteps", "2048"],
                               cwd=workdir, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    first_line = process.stdout.readline()
    process.stdout.close()  # as `head -1` does
    stderr = process.stderr.read()
    assert process.wait(timeout=300) == 0, stderr
    assert first_line.startswith("run: ")
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr and "Exception ignored" not in stderr
    (run_dir,) = run_dirs(workdir)
    assert torch.load(run_dir / "final.pt", weights_only=True)["global_step"] == 2048


def test_a_copy_of_the_trainer_elsewhere_runs_with_its_edit(workdir):
    """The README's way to experiment: copy ppo_continuous.py, edit the copy, keep the repository on PYTHONPATH."""
    experiment = workdir / "experiment"
    experiment.mkdir()
    source = SCRIPT.read_text()
    edit = ('    clip_coef: float = 0.2\n    """the surrogate clipping coefficient"""',
            '    clip_coef: float = 0.1\n    """the surrogate clipping coefficient (this experiment: 0.1)"""')
    assert edit[0] in source
    (experiment / "my_ppo.py").write_text(source.replace(*edit))
    result = run_cli("--env-id", "Pendulum-v1", "--total-timesteps", 256, *FAST, *FAST_EVAL, cwd=experiment,
                     script=experiment / "my_ppo.py")
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(experiment)
    assert "__my_ppo__" in run_dir.name
    hyperparameters = torch.load(run_dir / "final.pt", weights_only=True)["args"]
    assert hyperparameters["clip_coef"] == 0.1 and hyperparameters["exp_name"] == "my_ppo"
