"""The native vector env (queueing/vector_env.py) against gymnasium's SyncVectorEnv of single envs."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

import queueing  # noqa: F401  (registers QueueNetwork-v0)
from queueing.env import Network, QueueNetworkEnv, slot_uniforms
from queueing.vector_env import QueueNetworkVectorEnv

ENV_ID = "queueing:QueueNetwork-v0"
INSTANCES = ["single-server-2class", "criss-cross", "connectivity-4buffer", "criss-cross-bh", "reentrant-line"]


def sync_env(instance, num_envs, max_episode_steps, **kwargs):
    return gym.make_vec(ENV_ID, num_envs=num_envs, vectorization_mode="sync",
                        vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP},
                        instance=instance, max_episode_steps=max_episode_steps, **kwargs)


def native_env(instance, num_envs, max_episode_steps, **kwargs):
    return gym.make_vec(ENV_ID, num_envs=num_envs, vectorization_mode="vector_entry_point",
                        instance=instance, max_episode_steps=max_episode_steps, **kwargs)


def assert_same_infos(expected: dict, actual: dict):
    """Same keys, and every value equal with the same dtype (object arrays element by element)."""
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        if isinstance(value, dict):
            assert_same_infos(value, actual[key])
        elif value.dtype == object:
            assert actual[key].dtype == object and len(actual[key]) == len(value)
            for mine, theirs in zip(actual[key], value):
                if theirs is None:
                    assert mine is None
                else:
                    np.testing.assert_array_equal(mine, theirs)
                    assert mine.dtype == theirs.dtype
        else:
            np.testing.assert_array_equal(actual[key], value)
            assert actual[key].dtype == value.dtype


def assert_steps_match(expected, actual):
    for mine, theirs in zip(actual[:4], expected[:4]):
        np.testing.assert_array_equal(mine, theirs)
        assert mine.dtype == theirs.dtype
    assert_same_infos(expected[4], actual[4])


@pytest.mark.parametrize("instance, allocation", [(name, "proportional") for name in INSTANCES]
                         + [("criss-cross", "priority"), ("connectivity-4buffer", "priority")])
def test_identical_to_sync_vector_env_of_single_envs_across_time_limits(instance, allocation):
    num_envs, limit = 4, 25
    sync = sync_env(instance, num_envs, limit, allocation=allocation)
    native = native_env(instance, num_envs, limit, allocation=allocation)
    assert native.single_action_space == sync.single_action_space
    assert isinstance(native, QueueNetworkVectorEnv)
    expected_obs, _ = sync.reset(seed=5)
    obs, _ = native.reset(seed=5)
    np.testing.assert_array_equal(obs, expected_obs)
    rng = np.random.default_rng(0)
    truncations = 0
    for _ in range(3 * limit + 3):
        actions = rng.random(native.action_space.shape, dtype=np.float32)
        expected = sync.step(actions)
        actual = native.step(actions)
        assert_steps_match(expected, actual)
        truncations += int(actual[3].sum())
    assert truncations == 3 * num_envs


def test_copy_i_follows_the_single_env_seeded_with_seed_plus_i():
    native = QueueNetworkVectorEnv(3, "criss-cross")
    obs, _ = native.reset(seed=40)
    singles = [QueueNetworkEnv("criss-cross") for _ in range(3)]
    single_obs = [env.reset(seed=40 + i)[0] for i, env in enumerate(singles)]
    for step in range(300):
        actions = np.tile(np.array([step % 2, 1.0, 1 - step % 2], dtype=np.float32), (3, 1))
        obs, rewards, *_ = native.step(actions)
        for i, env in enumerate(singles):
            single_obs, single_reward, *_ = env.step(actions[i])
            np.testing.assert_array_equal(obs[i], single_obs)
            assert rewards[i] == single_reward
    # The copies are not all the same trajectory.
    assert len({tuple(row) for row in obs}) > 1


def test_autoreset_reports_the_final_observation_and_restarts_from_empty_queues():
    instance = {"name": "fill", "arrival_rates": [1.0, 1.0], "service_rates": [0.0, 0.0],
                "holding_costs": [1.0, 2.0], "servers": [[0, 1]]}
    envs = QueueNetworkVectorEnv(2, instance, max_episode_steps=3)
    obs, _ = envs.reset(seed=0)
    for step in range(1, 4):
        obs, rewards, terminated, truncated, infos = envs.step(np.ones((2, 2), dtype=np.float32))
        assert not terminated.any()
        if step < 3:
            np.testing.assert_array_equal(obs, np.full((2, 2), step))
            assert not truncated.any() and infos == {}
    # The third step ends both episodes: its reward and final observation are those of queues (3, 3),
    # and the returned observation is already the next episode's first.
    np.testing.assert_array_equal(rewards, [-9.0, -9.0])
    assert truncated.all()
    np.testing.assert_array_equal(np.stack(infos["final_obs"]), np.full((2, 2), 3.0))
    np.testing.assert_array_equal(infos["_final_obs"], [True, True])
    assert infos["final_info"] == {} and infos["_final_info"].all()
    np.testing.assert_array_equal(obs, np.zeros((2, 2)))
    obs, _, _, truncated, _ = envs.step(np.ones((2, 2), dtype=np.float32))
    np.testing.assert_array_equal(obs, np.ones((2, 2)))
    assert not truncated.any()


def test_partial_reset_staggers_the_time_limits_and_final_obs_marks_only_ended_copies():
    envs = QueueNetworkVectorEnv(3, "criss-cross", max_episode_steps=4)
    envs.reset(seed=1)
    actions = np.ones((3, 3), dtype=np.float32)
    envs.step(actions)
    envs.step(actions)
    envs.reset(options={"reset_mask": np.array([False, True, False])})
    _, _, _, truncated, infos = envs.step(actions)
    _, _, _, truncated, infos = envs.step(actions)
    np.testing.assert_array_equal(truncated, [True, False, True])
    np.testing.assert_array_equal(infos["_final_obs"], [True, False, True])
    assert infos["final_obs"][1] is None and infos["final_obs"][0].shape == (3,)
    for _ in range(2):
        _, _, _, truncated, _ = envs.step(actions)
    np.testing.assert_array_equal(truncated, [False, True, False])


def test_without_a_time_limit_episodes_never_end():
    envs = gym.make_vec(ENV_ID, num_envs=2, instance="single-server-2class", max_episode_steps=None)
    envs.reset(seed=0)
    for _ in range(1500):
        _, _, terminated, truncated, infos = envs.step(np.ones((2, 2), dtype=np.float32))
        assert not terminated.any() and not truncated.any() and infos == {}


def test_make_vec_picks_the_native_env_with_the_registered_limit_and_metadata():
    envs = gym.make_vec(ENV_ID, num_envs=3, instance="criss-cross")
    assert isinstance(envs, QueueNetworkVectorEnv)
    assert envs.max_episode_steps == 1000 and envs.num_envs == 3
    assert envs.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP and envs.metadata["continuing"]
    assert QueueNetworkEnv.metadata["continuing"]
    assert envs.single_observation_space == QueueNetworkEnv("criss-cross").observation_space
    assert envs.observation_space.shape == (3, 3) and envs.action_space.shape == (3, 3)


def trainer_stack(envs):
    """The wrappers the trainer puts around its vector env, in its order."""
    envs = gym.wrappers.vector.RecordEpisodeStatistics(envs)
    envs = gym.wrappers.vector.NormalizeReward(envs, gamma=0.99)
    envs = gym.wrappers.vector.ClipReward(envs, -10.0, 10.0)
    return gym.wrappers.vector.ClipAction(envs)


def test_trainer_wrappers_give_the_same_results_as_on_sync_vector_env():
    limit = 30
    sync = trainer_stack(sync_env("criss-cross", 3, limit))
    native = trainer_stack(native_env("criss-cross", 3, limit))
    sync.reset(seed=2)
    native.reset(seed=2)
    rng = np.random.default_rng(1)
    raw_returns = np.zeros(3)
    episodes = 0
    for step in range(1, 2 * limit + 1):
        actions = rng.normal(0.5, 1.0, (3, 3)).astype(np.float32)  # outside the box: ClipAction clips
        expected, actual = sync.step(actions), native.step(actions)
        for mine, theirs in zip(actual[:4], expected[:4]):
            np.testing.assert_array_equal(mine, theirs)
        infos = actual[4]
        # Unit costs: the raw reward is minus the total queue (of the final observation at a truncation).
        last_obs = np.stack(infos["final_obs"]) if step % limit == 0 else actual[0]
        raw_returns -= last_obs.sum(axis=1)
        if step % limit == 0:
            # Truncation: episode statistics on the raw rewards, and the final observations.
            np.testing.assert_array_equal(infos["_episode"], [True] * 3)
            np.testing.assert_array_equal(infos["episode"]["l"], [limit] * 3)
            np.testing.assert_allclose(infos["episode"]["r"], raw_returns)
            np.testing.assert_array_equal(infos["episode"]["r"], expected[4]["episode"]["r"])
            assert_same_infos({k: v for k, v in expected[4].items() if k not in ("episode", "_episode")},
                              {k: v for k, v in infos.items() if k not in ("episode", "_episode")})
            raw_returns[:] = 0
            episodes += 1
        else:
            assert "episode" not in infos
    assert episodes == 2


def test_slot_uniforms_are_uniform_and_independent_of_the_batch():
    keys = np.array([1, 2, 2**63 + 5], dtype=np.uint64)
    slots = np.array([0, 7, 123456789])
    batch = slot_uniforms(keys, slots, 6)
    for i in range(3):
        np.testing.assert_array_equal(slot_uniforms(keys[i : i + 1], slots[i : i + 1], 6)[0], batch[i])
    many = slot_uniforms(np.full(20000, 99, dtype=np.uint64), np.arange(20000), 5).ravel()
    assert many.min() >= 0 and many.max() < 1
    assert abs(many.mean() - 0.5) < 0.005 and abs(many.var() - 1 / 12) < 0.002
    assert abs(np.corrcoef(many[:-1], many[1:])[0, 1]) < 0.01


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="num_envs"):
        QueueNetworkVectorEnv(0, "criss-cross")
    with pytest.raises(ValueError, match="max_episode_steps"):
        QueueNetworkVectorEnv(2, "criss-cross", max_episode_steps=0)
    envs = QueueNetworkVectorEnv(2, "criss-cross")
    envs.reset(seed=0)
    with pytest.raises(ValueError, match="actions must have shape"):
        envs.step(np.ones((3, 3)))
    with pytest.raises(ValueError, match="initial_queues"):
        envs.reset(options={"initial_queues": [1, -1, 0]})
    with pytest.raises(ValueError, match="seed"):
        envs.reset(seed=[1, 2, 3])


# --- continuous-time instances -------------------------------------------------------------------


def test_continuous_time_uniformizes_rates_into_one_event_per_slot():
    network = Network.from_instance("criss-cross-bh")
    assert network.continuous_time and network.uniformization_rate == pytest.approx(0.9 + 0.9 + 2 + 1)
    envs = QueueNetworkVectorEnv(64, network)
    obs, _ = envs.reset(seed=0)
    arrivals = completions = 0
    steps = 2000
    for _ in range(steps):
        new_obs, *_ = envs.step(np.ones((64, 3), dtype=np.float32))
        change = new_obs - obs
        assert np.all(np.abs(change).sum(axis=1) <= 2)  # one event: an arrival, a departure or a move 0 -> 1
        assert np.all(np.abs(change.sum(axis=1)) <= 1)
        arrivals += int((change.sum(axis=1) == 1).sum())
        completions += int(((change[:, 0] == -1) & (change[:, 1] == 1)).sum())
        obs = new_obs
    slots = 64 * steps
    # Arrivals happen at rate 1.8 of 4.8 events per slot, whatever the state.
    assert arrivals / slots == pytest.approx(1.8 / 4.8, abs=0.005)
    assert 0 < completions / slots < 0.9 / 4.8 + 0.01


def test_continuous_time_validation():
    instance = {"name": "ct", "time": "continuous", "arrival_rates": [3.0], "service_rates": [5.0],
                "holding_costs": [1.0], "servers": [[0]]}
    assert Network.from_instance(instance).arrival_probabilities[0] == pytest.approx(3 / 8)
    with pytest.raises(ValueError, match='"time"'):
        Network.from_instance({**instance, "time": "slotted"})
    with pytest.raises(ValueError, match='"arrival_rates"'):
        Network.from_instance({**instance, "time": "discrete"})  # 3.0 is no probability
    with pytest.raises(ValueError, match='"connectivity"'):
        Network.from_instance({**instance, "connectivity": [0.5]})
    with pytest.raises(ValueError, match="positive rate"):
        Network.from_instance({**instance, "arrival_rates": [0.0], "service_rates": [0.0]})
