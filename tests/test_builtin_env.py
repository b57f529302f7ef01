"""The built-in pybullet scene: interface (shapes, dtypes, layouts), determinism, control semantics, the task oracle
on hand-made infos, and the evaluation chains. Needs no ../shared data."""
from __future__ import annotations

import numpy as np
import pytest

from evaluation.builtin_env import scene as sc
from evaluation.builtin_env.env import ACTION_REPEAT, MAX_REL_POS, BuiltinEnv
from evaluation.builtin_env.sequences import (
    CHAIN_LENGTH,
    INITIAL_CONDITIONS,
    Condition,
    apply_task,
    get_sequences,
    is_valid_chain,
    sample_chain,
)
from evaluation.builtin_env.tasks import (
    TASK_NAMES,
    TRAINING_INSTRUCTIONS,
    VALIDATION_INSTRUCTIONS,
    BuiltinTaskOracle,
    validation_annotations,
)


@pytest.fixture(scope="module")
def env() -> BuiltinEnv:
    environment = BuiltinEnv(seed=0)
    yield environment
    environment.close()


@pytest.fixture(scope="module")
def fast_env() -> BuiltinEnv:
    environment = BuiltinEnv(seed=0, render=False)
    yield environment
    environment.close()


def _scene_obs(led: int = 0, columns: tuple[int, int, int] = (0, 0, 0), seed: int = 0) -> np.ndarray:
    from evaluation.builtin_env.sequences import scene_obs_for
    return scene_obs_for(Condition(led, columns), np.random.default_rng(seed))


# ---- interface ----
def test_implements_the_evaluation_interfaces() -> None:
    """Same method names and parameter names as evaluation/interfaces.py's EvalEnv and TaskOracle."""
    import inspect

    from evaluation.interfaces import EvalEnv, TaskOracle

    for protocol, implementation in ((EvalEnv, BuiltinEnv), (TaskOracle, BuiltinTaskOracle)):
        for name, method in inspect.getmembers(protocol, inspect.isfunction):
            if name.startswith("_"):
                continue
            expected = list(inspect.signature(method).parameters)
            assert list(inspect.signature(getattr(implementation, name)).parameters) == expected, name


def test_observation_shapes_and_dtypes(env: BuiltinEnv) -> None:
    obs = env.reset(sc.HOME_ROBOT_OBS, _scene_obs())
    assert obs["rgb_obs"]["rgb_static"].shape == (200, 200, 3) and obs["rgb_obs"]["rgb_static"].dtype == np.uint8
    assert obs["rgb_obs"]["rgb_gripper"].shape == (84, 84, 3) and obs["rgb_obs"]["rgb_gripper"].dtype == np.uint8
    assert obs["depth_obs"]["depth_static"].shape == (200, 200)
    assert obs["depth_obs"]["depth_static"].dtype == np.float32
    assert obs["depth_obs"]["depth_gripper"].shape == (84, 84)
    assert obs["robot_obs"].shape == (15,) and obs["robot_obs"].dtype == np.float64
    assert obs["scene_obs"].shape == (24,) and obs["scene_obs"].dtype == np.float64
    result = env.step(np.zeros(7))
    assert len(result) == 4 and result[1] == 0.0 and result[2] is False
    assert set(result[3]) == {"robot_info", "scene_info"}
    # The static camera sees the scene: the red, blue and pink cubes and the table are all in the picture.
    rgb = obs["rgb_obs"]["rgb_static"].astype(int)
    for colour in sc.BLOCK_COLORS.values():
        target = np.array(colour[:3]) * 255
        assert (np.abs(rgb - target).sum(-1) < 90).sum() >= 20, f"colour {colour} not visible in rgb_static"


def test_reset_reproduces_the_given_state(env: BuiltinEnv) -> None:
    scene_obs = _scene_obs(led=1, columns=(-1, 0, 1), seed=3)
    obs = env.reset(sc.HOME_ROBOT_OBS, scene_obs)
    np.testing.assert_allclose(obs["robot_obs"], sc.HOME_ROBOT_OBS, atol=2e-4)  # one physics step after the reset
    np.testing.assert_allclose(obs["scene_obs"][:6], scene_obs[:6], atol=1e-6)
    for i in range(3):
        np.testing.assert_allclose(obs["scene_obs"][sc.block_slice(i)], scene_obs[sc.block_slice(i)], atol=2e-3)
    info = env.get_info()
    assert info["scene_info"]["lights"]["led"]["logical_state"] == 1
    table = info["scene_info"]["fixed_objects"]["table"]["uid"]
    for block in info["scene_info"]["movable_objects"].values():  # contacts are there from the first info on
        assert table in {c[2] for c in block["contacts"]}


def test_home_constants_agree(fast_env: BuiltinEnv) -> None:
    """HOME_ROBOT_OBS's TCP entries are the forward kinematics of HOME_JOINTS, and the pose is the documented one."""
    obs = fast_env.reset()
    np.testing.assert_allclose(obs["robot_obs"][:3], sc.HOME_TCP_POS, atol=2e-3)
    np.testing.assert_allclose(obs["robot_obs"][3:6], sc.HOME_TCP_EULER, atol=2e-3)
    assert fast_env.get_robot_obs()[6] == pytest.approx(2 * sc.FINGER_OPEN, abs=1e-4)


def test_bad_arguments_raise(fast_env: BuiltinEnv) -> None:
    with pytest.raises(ValueError, match="7 finite"):
        fast_env.step(np.zeros(6))
    with pytest.raises(ValueError, match="7 finite"):
        fast_env.step(np.array([np.nan, 0, 0, 0, 0, 0, 1]))
    with pytest.raises(ValueError, match="scene_obs"):
        fast_env.reset(scene_obs=np.zeros(18))


def test_relative_action_moves_the_tcp_by_0_02_m_per_unit(fast_env: BuiltinEnv) -> None:
    start = fast_env.reset(sc.HOME_ROBOT_OBS, _scene_obs())["robot_obs"]
    for _ in range(5):
        obs, *_ = fast_env.step(np.array([0.5, 0.0, -0.5, 0.0, 0.0, 0.0, 1.0]))
    for _ in range(5):  # let the arm settle on the target
        obs, *_ = fast_env.step(np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]))
    moved = obs["robot_obs"][:3] - start[:3]
    np.testing.assert_allclose(moved, [5 * 0.5 * MAX_REL_POS, 0.0, -5 * 0.5 * MAX_REL_POS], atol=2e-3)
    np.testing.assert_allclose(obs["robot_obs"][3:6], start[3:6], atol=1e-2)  # orientation held
    # yaw: +1 unit = +0.05 rad about world z
    for _ in range(4):
        obs, *_ = fast_env.step(np.array([0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]))
    for _ in range(5):
        obs, *_ = fast_env.step(np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]))
    assert obs["robot_obs"][5] - start[5] == pytest.approx(0.2, abs=0.01)


def test_gripper_closes_and_opens(fast_env: BuiltinEnv) -> None:
    fast_env.reset(sc.HOME_ROBOT_OBS, _scene_obs())
    for _ in range(10):
        obs, *_ = fast_env.step(np.array([0, 0, 0, 0, 0, 0, -1.0]))
    assert obs["robot_obs"][14] == -1 and obs["robot_obs"][6] < 0.005
    for _ in range(10):
        obs, *_ = fast_env.step(np.array([0, 0, 0, 0, 0, 0, 0.3]))  # > 0 opens
    assert obs["robot_obs"][14] == 1 and obs["robot_obs"][6] > 0.075


def test_same_actions_give_same_states_and_images() -> None:
    """Determinism across instances and across whatever ran before a reset."""
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, size=(12, 7))
    scene_obs = _scene_obs(led=0, columns=(1, -1, 0), seed=5)

    def rollout(environment: BuiltinEnv) -> list[dict]:
        environment.reset(sc.HOME_ROBOT_OBS, scene_obs)
        return [environment.step(a)[0] for a in actions]

    first = BuiltinEnv(seed=1)
    second = BuiltinEnv(seed=2)
    try:
        a = rollout(first)
        second.reset()  # something else first: a random layout and some motion
        for action in rng.uniform(-1, 1, size=(5, 7)):
            second.step(action)
        b = rollout(second)
        c = rollout(first)
    finally:
        first.close()
        second.close()
    for x, y, z in zip(a, b, c):
        for key in ("robot_obs", "scene_obs"):
            np.testing.assert_array_equal(x[key], y[key])
            np.testing.assert_array_equal(x[key], z[key])
        for key in ("rgb_static", "rgb_gripper"):
            np.testing.assert_array_equal(x["rgb_obs"][key], y["rgb_obs"][key])
            np.testing.assert_array_equal(x["rgb_obs"][key], z["rgb_obs"][key])


def test_render_flag_changes_nothing_but_images() -> None:
    actions = np.random.default_rng(1).uniform(-1, 1, size=(6, 7))
    with BuiltinEnv(render=True) as rendered, BuiltinEnv(render=False) as blind:
        for environment in (rendered, blind):
            environment.reset(sc.HOME_ROBOT_OBS, _scene_obs(seed=9))
        for action in actions:
            x, y = rendered.step(action)[0], blind.step(action)[0]
            np.testing.assert_array_equal(x["robot_obs"], y["robot_obs"])
            np.testing.assert_array_equal(x["scene_obs"], y["scene_obs"])
        assert not y["rgb_obs"]["rgb_static"].any()


def test_button_toggles_the_led(fast_env: BuiltinEnv) -> None:
    """Pressing the cap past half its travel toggles the LED once per press (rising edge), as calvin_env."""
    fast_env.reset(sc.HOME_ROBOT_OBS, _scene_obs(led=0))
    start = fast_env.get_info()
    oracle = BuiltinTaskOracle()
    above, press = sc.TABLE_TOP_Z + 0.15, sc.BUTTON_CAP_TOP_Z - 0.01
    states = []
    for target_z in (above, press, above, press, above):
        for _ in range(40):
            tcp = fast_env.get_robot_obs()[:3]
            goal = np.array([*sc.BUTTON_XY, target_z])
            move = np.clip((goal - tcp) / MAX_REL_POS, -0.6, 0.6)
            _, _, _, info = fast_env.step(np.array([*move, 0, 0, 0, -1.0]))
        states.append(info["scene_info"]["lights"]["led"]["logical_state"])
        if len(states) == 2:
            assert oracle.get_task_info(start, info) == {"turn_on_led"}
    assert states == [0, 1, 1, 0, 0]
    assert ACTION_REPEAT == 8


# ---- oracle on hand-made infos ----
ROBOT, TABLE, OTHER = 1, 0, 7


def _info(pos: tuple[float, float, float], contacts: list[tuple[int, int]], led: int = 0) -> dict:
    """A minimal info: block_red at `pos` touching (body, link) pairs; the other cubes resting on the table."""
    def contact_tuples(pairs: list[tuple[int, int]]) -> list[tuple]:
        return [(0, 99, body, -1, link) for body, link in pairs]

    resting = {"current_pos": (0.0, 0.0, sc.BLOCK_REST_Z), "current_orn": (0, 0, 0, 1),
               "contacts": contact_tuples([(TABLE, -1)]), "uid": 11}
    return {
        "robot_info": {"uid": ROBOT, "contacts": []},
        "scene_info": {
            "fixed_objects": {"table": {"uid": TABLE, "links": {"base_link": -1}}},
            "movable_objects": {"block_red": {"current_pos": pos, "current_orn": (0, 0, 0, 1),
                                              "contacts": contact_tuples(contacts), "uid": 10},
                                "block_blue": resting, "block_pink": resting},
            "lights": {"led": {"logical_state": led}},
        },
    }


@pytest.mark.parametrize("dx, on_table_at_end, expected", [
    (0.11, True, {"push_red_block_right"}),
    (-0.11, True, {"push_red_block_left"}),
    (0.09, True, set()),  # not far enough
    (0.11, False, set()),  # lifted off the surface
])
def test_push_oracle(dx: float, on_table_at_end: bool, expected: set[str]) -> None:
    oracle = BuiltinTaskOracle()
    start = _info((0.0, 0.0, sc.BLOCK_REST_Z), [(TABLE, -1)])
    end_contacts = [(TABLE, -1), (ROBOT, 9)] if on_table_at_end else [(ROBOT, 9)]
    end = _info((dx, 0.0, sc.BLOCK_REST_Z), end_contacts)
    assert oracle.get_task_info(start, end) == expected


def test_push_oracle_needs_the_start_surface_kept() -> None:
    """Start contacts (robot excluded) must be a subset of the end contacts: sliding off another body fails."""
    oracle = BuiltinTaskOracle()
    start = _info((0.0, 0.0, sc.BLOCK_REST_Z), [(TABLE, -1), (OTHER, -1)])
    end = _info((0.15, 0.0, sc.BLOCK_REST_Z), [(TABLE, -1)])
    assert oracle.get_task_info(start, end) == set()


@pytest.mark.parametrize("dz, end_contacts, start_contacts, expected", [
    (0.06, [(ROBOT, 9), (ROBOT, 10)], [(TABLE, -1)], {"lift_red_block_table"}),
    (0.04, [(ROBOT, 9)], [(TABLE, -1)], set()),  # not high enough
    (0.06, [(ROBOT, 9), (TABLE, -1)], [(TABLE, -1)], set()),  # still touching the table
    (0.06, [], [(TABLE, -1)], set()),  # thrown, not held
    (0.06, [(ROBOT, 9)], [(OTHER, -1)], set()),  # did not start on the table
])
def test_lift_oracle(dz: float, end_contacts: list, start_contacts: list, expected: set[str]) -> None:
    oracle = BuiltinTaskOracle()
    start = _info((0.0, 0.0, sc.BLOCK_REST_Z), start_contacts)
    end = _info((0.0, 0.0, sc.BLOCK_REST_Z + dz), end_contacts)
    assert oracle.get_task_info(start, end) == expected


def test_led_oracle_and_task_filter() -> None:
    oracle = BuiltinTaskOracle()
    off = _info((0.0, 0.0, sc.BLOCK_REST_Z), [(TABLE, -1)], led=0)
    on = _info((0.0, 0.0, sc.BLOCK_REST_Z), [(TABLE, -1)], led=1)
    assert oracle.get_task_info(off, on) == {"turn_on_led"}
    assert oracle.get_task_info(on, off) == {"turn_off_led"}
    assert oracle.get_task_info(on, on) == set()
    assert oracle.get_task_info_for_set(off, on, {"turn_off_led", "push_red_block_left"}) == set()
    assert oracle.get_task_info_for_set(off, on, {"turn_on_led", "nonsense"}) == {"turn_on_led"}
    with pytest.raises(ValueError, match="unknown tasks"):
        BuiltinTaskOracle(("open_drawer",))


def test_instructions_cover_every_task() -> None:
    assert set(VALIDATION_INSTRUCTIONS) == set(TRAINING_INSTRUCTIONS) == set(TASK_NAMES)
    assert len(TASK_NAMES) >= 6
    for task in TASK_NAMES:
        assert len(TRAINING_INSTRUCTIONS[task]) >= 3
        assert VALIDATION_INSTRUCTIONS[task] not in TRAINING_INSTRUCTIONS[task]
    assert validation_annotations()["push_red_block_left"] == ["go push the red block left"]


# ---- chains ----
def test_sequences_are_valid_and_deterministic() -> None:
    sequences = get_sequences(40, seed=3)
    again = get_sequences(40, seed=3)
    assert [chain for _, chain in sequences] == [chain for _, chain in again]
    for (state, chain), (state2, _) in zip(sequences, again):
        np.testing.assert_array_equal(state["scene_obs"], state2["scene_obs"])
        np.testing.assert_array_equal(state["robot_obs"], sc.HOME_ROBOT_OBS)
        assert len(chain) == CHAIN_LENGTH and len(set(chain)) == CHAIN_LENGTH
        led = int(state["scene_obs"][sc.SCENE_OBS_LED])
        columns = tuple(int(np.argmin(np.abs(np.array(sc.BLOCK_COLUMN_X) - state["scene_obs"][sc.block_slice(i)][0])))
                        - 1 for i in range(3))
        assert is_valid_chain(Condition(led, columns), chain)
    assert [c for _, c in get_sequences(10, seed=3)] == [c for _, c in sequences[:10]]  # prefix-stable
    assert [c for _, c in get_sequences(10, seed=4)] != [c for _, c in sequences[:10]]
    used = {task for _, chain in get_sequences(200, seed=0) for task in chain}
    assert used == set(TASK_NAMES)


def test_chain_rules() -> None:
    state = Condition(led=1, columns=(-1, 0, 1))
    assert apply_task(state, "push_red_block_left") is None  # already in the leftmost column
    assert apply_task(state, "push_pink_block_right") is None
    assert apply_task(state, "turn_on_led") is None
    assert apply_task(state, "push_red_block_right").columns == (0, 0, 1)
    lifted = apply_task(state, "lift_blue_block_table")
    assert lifted.grasped == "block_blue" and all(apply_task(lifted, t) is None for t in TASK_NAMES)
    assert len(INITIAL_CONDITIONS) == 54
    with pytest.raises(ValueError, match="no chain"):
        sample_chain(np.random.default_rng(0), state, 5, ("turn_on_led", "turn_off_led"))
