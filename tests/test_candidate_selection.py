"""Candidate selection (which agents are evaluated, the best, patience): steps and scores only, never wall time."""

import hashlib
import math

import pytest
import torch

from ppo_support import CandidateSelection, default_eval_every
from tests.conftest import FAST, REPO, SCRIPT, run_cli, run_dirs, scalars


def evaluation(score):
    return {"mean": score}


def evaluated_steps(selection, steps):
    """The steps (rollout ends) at which `selection` has the agent evaluated; every score ties."""
    return [step for step in steps if selection.due(step) and (selection.evaluated(step, evaluation(0.0)) or True)]


def test_periodic_evaluations_fall_on_the_grid_of_steps():
    selection = CandidateSelection(start_step=1000, every=300, nominated_per_interval=0)
    # Grid points 1300, 1600, 1900, 2200, each evaluated at the first rollout end at or after it.
    assert evaluated_steps(selection, range(1100, 2400, 100)) == [1300, 1600, 1900, 2200]
    # 250-step rollouts meet the grid late (1500 for 1300, ...) and the grid does not drift with them.
    selection = CandidateSelection(start_step=1000, every=300, nominated_per_interval=0)
    assert evaluated_steps(selection, range(1250, 2300, 250)) == [1500, 1750, 2000, 2250]


def test_nominations_are_evaluated_up_to_the_quota_of_each_interval():
    selection = CandidateSelection(start_step=0, every=1000, nominated_per_interval=2)
    assert not selection.due(100)
    evaluated = []
    for step, measurement in [(100, -5.0), (200, -4.0), (300, -6.0), (400, -3.0), (500, -2.0), (600, -1.0),
                              (1000, -7.0), (1100, 0.0)]:
        nominated = selection.measured(measurement)
        assert nominated == (measurement in (-5.0, -4.0, -3.0, -2.0, -1.0, 0.0))  # a new best training measurement
        if selection.due(step):
            selection.evaluated(step, evaluation(measurement))
            evaluated.append(step)
    # 100 and 200 use the quota of [0, 1000); 400-600 are nominated but over it; 1000 is periodic (its agent is not
    # nominated) and resets the quota, so 1100 is evaluated again.
    assert evaluated == [100, 200, 1000, 1100]
    # A measurement that is not finite nominates nothing.
    assert not selection.measured(math.nan) and not selection.measured(math.inf)


def test_zero_quota_evaluates_periodically_only():
    selection = CandidateSelection(start_step=0, every=500, nominated_per_interval=0)
    assert selection.measured(1.0) and not selection.due(256) and selection.due(512)


def test_best_and_patience_follow_the_scores():
    selection = CandidateSelection(start_step=0, every=100, nominated_per_interval=0, patience=2)
    assert selection.evaluated(100, evaluation(-3.0))  # the first is always the best
    assert not selection.evaluated(200, evaluation(-3.0))  # a tie is not an improvement
    assert not selection.out_of_patience
    assert selection.evaluated(300, evaluation(-2.5)) and selection.best == evaluation(-2.5)
    assert not selection.evaluated(400, evaluation(math.nan))  # NaN never improves
    assert not selection.evaluated(500, evaluation(-2.6))
    assert selection.out_of_patience and selection.best == evaluation(-2.5)


def test_lower_is_better_ranks_costs_and_measurements():
    selection = CandidateSelection(start_step=0, every=100, nominated_per_interval=1, lower_is_better=True)
    assert selection.measured(5.0) and selection.measured(4.0) and not selection.measured(4.5)
    assert selection.evaluated(100, evaluation(3.0)) and selection.evaluated(200, evaluation(2.0))
    assert not selection.evaluated(300, evaluation(2.5)) and selection.best == evaluation(2.0)


def test_without_patience_the_run_never_stops_early():
    selection = CandidateSelection(start_step=0, every=100, nominated_per_interval=0, patience=None)
    selection.evaluated(100, evaluation(1.0))
    for step in range(200, 2000, 100):
        selection.evaluated(step, evaluation(0.0))
    assert not selection.out_of_patience


def test_default_eval_every_is_a_tenth_of_a_run_unless_evaluations_are_long():
    episodic = {"episodes": 10, "warmup": 0, "horizon": 1000}  # HalfCheetah: 10,000 steps, one env per copy
    assert default_eval_every(1_000_000, 2048, episodic, 1, native_vector=False) == 100_000
    assert default_eval_every(4096, 2048, episodic, 0, native_vector=False) == 10_000  # 10,000 x 1/2 / 0.5
    assert default_eval_every(20_000, 2048, episodic, 1, native_vector=False) == 20_000  # 2 x 10,000 x 1/2 / 0.5
    continuing = {"episodes": 128, "warmup": 2_500, "horizon": 20_000}  # 2.88M steps of a native vector env
    assert default_eval_every(20_000_000, 16_384, continuing, 1, native_vector=True) == 2_000_000  # ten periodic
    assert default_eval_every(300_000, 16_384, continuing, 1, native_vector=True) == 576_000  # 2 x 2.88M / 20 / 0.5
    assert default_eval_every(300_000, 16_384, continuing, 0, native_vector=True) == 288_000
    assert default_eval_every(300_000, 16_384, continuing, 0, native_vector=False) == 2_880_000


# ---------------------------------------------------------------------------------------------------------------
# Through the command line: the same seed gives the same best.pt however slow evaluation is
# ---------------------------------------------------------------------------------------------------------------

SLOW_EVALUATION = """\
import runpy, sys, time
import ppo_support

original = ppo_support.evaluate


def slow_evaluate(*args, **kwargs):  # as on a machine where evaluation competes for the cores
    time.sleep({seconds})
    return original(*args, **kwargs)


ppo_support.evaluate = slow_evaluate
sys.argv[0] = {script!r}
runpy.run_path({script!r}, run_name="__main__")
"""

# Episodes of 32 steps end every rollout and nominate agents; an evaluation every 1024 steps.
RUN = ["--env-id", "Pendulum-v1", *FAST, "--seed", 4, "--total-timesteps", 3072, "--reset-steps", 32,
       "--eval-episodes", 3, "--eval-horizon", 50, "--eval-every", 1024]


def test_a_run_selects_the_same_best_checkpoint_however_slow_evaluation_is(tmp_path):
    outcomes = []
    for seconds in (0, 1.5):
        cwd = tmp_path / f"sleep{seconds}"
        cwd.mkdir()
        runner = cwd / "slow_evaluation.py"
        runner.write_text(SLOW_EVALUATION.format(seconds=seconds, script=str(SCRIPT)))
        result = run_cli(*RUN, cwd=cwd, script=runner)
        assert result.returncode == 0, result.stderr
        (run_dir,) = run_dirs(cwd)
        summary = [line for line in result.stdout.splitlines() if line.startswith(("best.pt:", "final.pt:"))]
        outcomes.append({"best": hashlib.sha256((run_dir / "best.pt").read_bytes()).hexdigest(),
                         "final": hashlib.sha256((run_dir / "final.pt").read_bytes()).hexdigest(),
                         "evaluated_at": [step for step, _ in scalars(run_dir)["eval/LTA_return"]],
                         "summary": summary,
                         "best_state": torch.load(run_dir / "best.pt", weights_only=True)["agent"]})
    fast, slow = outcomes
    assert len(fast["summary"]) == 2
    # Nominated agents were evaluated between the periodic ones (at 1024, 2048 and 3072): the slow run skipped none.
    assert len(fast["evaluated_at"]) > 4
    for key in ("best", "final", "evaluated_at", "summary"):
        assert fast[key] == slow[key], key
    assert all(torch.equal(fast["best_state"][name], slow["best_state"][name]) for name in fast["best_state"])
