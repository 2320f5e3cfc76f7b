"""--compile: the compiled minibatch update does what the eager one does, end to end and on failure."""

import copy
import functools
import sys

import pytest
import torch

import ppo_continuous
import ppo_support
from tests.conftest import FAST, FAST_EVAL, fast_args, run_cli, run_dirs, scalars

PENDULUM = ["--env-id", "Pendulum-v1", "--reset-steps", 32, *FAST, *FAST_EVAL]


def random_minibatches(agent, count, size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    obs_size, action_size = agent.critic[0].in_features, agent.actor_logstd.shape[1]
    minibatches = []
    for _ in range(count):
        obs = torch.randn(size, obs_size, generator=generator)
        actions = torch.randn(size, action_size, generator=generator)
        with torch.no_grad():
            _, log_probs, _, values = agent.get_action_and_value(obs, actions)
        # Old log-probs and values off the current ones, so ratios and value changes reach the clipping range.
        log_probs = log_probs + 0.3 * torch.randn(size, generator=generator)
        values = values + torch.randn(size, generator=generator)
        minibatches.append((obs, actions, log_probs, 3 * torch.randn(size, generator=generator),
                            torch.randn(size, generator=generator), values))
    return minibatches


def compiled_update(agent, optimizers, clip_groups, args, minibatch_size):
    """The compiled update with the trainer's loss and clipping, as `ppo_continuous.Run` builds it."""
    return ppo_support.compiled_minibatch_update(agent, optimizers, clip_groups,
                                                 functools.partial(ppo_continuous.ppo_loss, args=args),
                                                 args.max_grad_norm, minibatch_size)


def halve_learning_rates(optimizers):
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] *= 0.5


def train_on(minibatches, agent, args, compiled):
    """The minibatch updates one after the other, halving the learning rates half-way (as a schedule would)."""
    optimizers, clip_groups = ppo_continuous.make_optimizers(agent, args)
    if compiled:
        update = compiled_update(agent, optimizers, clip_groups, args, len(minibatches[0][0]))
    else:
        update = functools.partial(ppo_continuous.minibatch_update, agent, optimizers, clip_groups, args)
    parts = []
    with torch._dynamo.config.patch(error_on_recompile=True):  # one graph for the whole run
        for step, minibatch in enumerate(minibatches):
            if step == len(minibatches) // 2:
                halve_learning_rates(optimizers)
            parts.append(update(minibatch))
    return parts, optimizers


@pytest.mark.parametrize("options", [
    dict(),  # CleanRL's: one Adam, global grad-norm clipping
    dict(shared_optimizer=False, actor_lr=1e-3, critic_lr=2e-3, max_grad_norm=0.05, ent_coef=0.01),
    dict(actor_lr=1e-3, critic_lr=5e-4, max_grad_norm=None, norm_adv=False, clip_vloss=False),
])
def test_compiled_update_matches_the_eager_update(options):
    """Step by step against the eager update; bit-for-bit repeatable (checked once: compiling is slow)."""
    args, _ = ppo_continuous.resolved_args(ppo_continuous.Args(**options))
    torch.manual_seed(0)
    eager_agent = ppo_continuous.Agent(5, 2)
    compiled_agent, repeat_agent = copy.deepcopy(eager_agent), copy.deepcopy(eager_agent)
    minibatches = random_minibatches(eager_agent, 6)
    want_parts, eager_optimizers = train_on(minibatches, eager_agent, args, compiled=False)
    got_parts, compiled_optimizers = train_on(minibatches, compiled_agent, args, compiled=True)
    for got, want in zip(got_parts, want_parts):
        for got_part, want_part in zip(got, want):
            torch.testing.assert_close(got_part, want_part, rtol=1e-5, atol=1e-6)
    if not options:
        # Deterministic: the same updates again give the same weights to the bit.
        train_on(minibatches, repeat_agent, args, compiled=True)
        for got_param, repeat_param in zip(compiled_agent.parameters(), repeat_agent.parameters()):
            assert torch.equal(got_param, repeat_param)
    # Same weights, and an optimizer state the eager optimizer continues from (checkpoints, --resume).
    for (name, got_param), want_param in zip(compiled_agent.named_parameters(), eager_agent.parameters()):
        torch.testing.assert_close(got_param, want_param, rtol=1e-5, atol=1e-6, msg=name)
    for got_optimizer, want_optimizer in zip(compiled_optimizers, eager_optimizers):
        got_state, want_state = got_optimizer.state_dict()["state"], want_optimizer.state_dict()["state"]
        assert got_state.keys() == want_state.keys()
        for index in want_state:
            assert got_state[index].keys() == want_state[index].keys()
            for key, want_value in want_state[index].items():
                assert got_state[index][key].dtype == want_value.dtype
                torch.testing.assert_close(got_state[index][key], want_value, rtol=1e-4, atol=1e-7)


def test_compiled_update_clips_gradients():
    """Clipping is active here, so the eager reference above would catch a compiled update that skipped it."""
    args, _ = ppo_continuous.resolved_args(ppo_continuous.Args(max_grad_norm=1e-3))
    torch.manual_seed(0)
    agent = ppo_continuous.Agent(5, 2)
    optimizers, clip_groups = ppo_continuous.make_optimizers(agent, args)
    minibatch = random_minibatches(agent, 1)[0]
    compiled_update(agent, optimizers, clip_groups, args, len(minibatch[0]))(minibatch)
    # After one step Adam's first moment is (1 - beta1) x the gradient it was given: the clipped gradient.
    moments = torch.cat([optimizers[0].state[param]["exp_avg"].flatten() for param in agent.parameters()])
    assert torch.linalg.vector_norm(moments).item() / 0.1 == pytest.approx(1e-3, rel=1e-4)
    assert all(int(optimizers[0].state[param]["step"]) == 1 for param in agent.parameters())


def test_compiled_update_refuses_an_optimizer_it_does_not_mirror():
    """The check comes before compiling: no compiler needed."""
    args, _ = ppo_continuous.resolved_args(ppo_continuous.Args())
    agent = ppo_continuous.Agent(5, 2)
    _, clip_groups = ppo_continuous.make_optimizers(agent, args)
    for optimizer in ([torch.optim.SGD(agent.parameters(), lr=0.1)], [torch.optim.Adam(agent.parameters(), lr=0.1)]):
        with pytest.raises(TypeError, match="mirrors ppo_support.Adam"):
            compiled_update(agent, optimizer, clip_groups, args, 64)


def test_cli_compile_resumes_an_eager_checkpoint_and_continues_its_adam_state(workdir):
    """One compilation (they are slow): an eager run, resumed with --compile. The compiled optimizer state is
    the eager one (test_compiled_update_matches_the_eager_update), so the other direction needs no run."""
    result = run_cli(*PENDULUM, "--total-timesteps", 512, cwd=workdir)  # --compile by default, too short to pay
    assert result.returncode == 0, result.stderr
    assert "eager update: 512 steps to train, fewer than --compile-min-steps 100,000" in result.stdout
    assert "compiled the minibatch update" not in result.stdout
    eager_run_dir = run_dirs(workdir)[0]
    checkpoint = torch.load(eager_run_dir / "final.pt", weights_only=True)
    assert all(int(state["step"]) == 2 * 2 * 4 for state in checkpoint["optimizers"][0]["state"].values())

    resumed = run_cli("--compile-min-steps", 512, "--total-timesteps", 1024, "--resume", eager_run_dir / "final.pt",
                      cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert "compiled the minibatch update in" in resumed.stdout
    compiled_run_dir = run_dirs(workdir)[1]
    logged = scalars(compiled_run_dir)
    assert logged["counters/minibatch_updates"][-1][1] == 4 * 2 * 4
    assert all(torch.isfinite(torch.tensor(value)) for _, value in logged["losses/value_loss"])
    checkpoint = torch.load(compiled_run_dir / "final.pt", weights_only=True)
    assert checkpoint["args"]["compile"] is True
    assert all(int(state["step"]) == 4 * 2 * 4 for state in checkpoint["optimizers"][0]["state"].values())


def test_compile_without_a_compiler_trains_eager_and_says_why(workdir):
    result = run_cli(*PENDULUM, "--compile-min-steps", 0, "--no-cuda", "--total-timesteps", 256, cwd=workdir,
                     env={"CXX": "/nonexistent/c++"})
    assert result.returncode == 0, result.stderr
    assert ("eager update: --compile needs a C++ compiler and '/nonexistent/c++' was not found (install one or set "
            "CXX); --no-compile silences this") in result.stdout
    assert "compiled the minibatch update" not in result.stdout and (run_dirs(workdir)[0] / "final.pt").exists()
    quiet = run_cli(*PENDULUM, "--no-compile", "--total-timesteps", 256, cwd=workdir, env={"CXX": "/nonexistent/c++"})
    assert quiet.returncode == 0 and "eager update" not in quiet.stdout


def test_a_failed_compilation_trains_eager_with_a_warning(workdir, monkeypatch, capsys):
    def failing_compile(function, **options):
        def compiled(*args):
            raise RuntimeError("no kernels today")
        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    monkeypatch.chdir(workdir)
    summary = ppo_continuous.train(fast_args(compile=True, compile_min_steps=0, total_timesteps=512))
    assert "warning: --compile failed (RuntimeError: no kernels today): training with the eager update" in \
        capsys.readouterr().err
    assert summary["counters"]["global_step"] == 512 and (summary["run_dir"] / "final.pt").exists()


def test_compiling_is_decided_by_the_steps_left_to_train_and_the_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert "fewer than --compile-min-steps 100,000" in ppo_support.why_not_compiled(99_999, 100_000, on_gpu=True)
    assert ppo_support.why_not_compiled(100_000, 100_000, on_gpu=True) is None
    assert "'/nonexistent/c++' was not found" in ppo_support.why_not_compiled(100_000, 100_000, on_gpu=False)
    monkeypatch.setenv("CXX", sys.executable)  # any executable on the path stands for the compiler
    assert ppo_support.why_not_compiled(100_000, 100_000, on_gpu=False) is None
