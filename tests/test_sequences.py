"""evaluation/sequences.py against CALVIN's official evaluation list (../shared/calvin/eval_sequences_1000.json):
sequences, initial states and hashes; the batched sampler against CALVIN's one-draw-at-a-time loop; the rules."""
import collections
import hashlib
import json
import time

import numpy as np
import pytest
import yaml

from conftest import shared_path
from evaluation import sequences as sq

EXPECTED_CATEGORY_SIZES = {1: 12, 2: 2, 3: 2, 4: 3, 5: 3, 6: 3, 7: 2, 8: 4, 9: 1, 10: 1, 11: 1}
# Cold get_sequences(1000) must stay far below the original's (71.6 s with 2 processes); generous for slow CI.
MAX_SECONDS_1000 = 60.0


@pytest.fixture(scope="module")
def official() -> dict:
    with open(shared_path("calvin", "eval_sequences_1000.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def timed_1000() -> tuple[list, float]:
    """get_sequences(1000) from an empty cache, and how long it took."""
    sq._sequence_order.cache_clear()
    start = time.perf_counter()
    sequences = sq.get_sequences(1000)
    return sequences, time.perf_counter() - start


def test_get_sequences_1000_equals_calvin(official, timed_1000):
    sequences, seconds = timed_1000
    expected = [(item["initial_condition"], item["sequence"]) for item in official["sequences"]]
    assert sequences == expected
    as_json = json.dumps([{"initial_condition": c, "sequence": s} for c, s in sequences], sort_keys=True)
    assert hashlib.sha256(as_json.encode()).hexdigest() == official["sha256_of_sequence_list"]
    print(f"get_sequences(1000), cold: {seconds:.2f} s")
    assert seconds < MAX_SECONDS_1000


def test_first_sequence_as_quoted(timed_1000):
    condition, tasks = timed_1000[0][0]
    assert condition == {"led": 1, "lightbulb": 1, "slider": "left", "drawer": "open", "red_block": "slider_left",
                         "blue_block": "table", "pink_block": "slider_right", "grasped": 0}
    assert tasks == ["rotate_blue_block_right", "move_slider_right", "lift_red_block_slider", "place_in_slider",
                     "turn_off_lightbulb"]


def test_task_counts(official, timed_1000):
    sequences = timed_1000[0]
    first = collections.Counter(tasks[0] for _, tasks in sequences)
    overall = collections.Counter(task for _, tasks in sequences for task in tasks)
    assert first == official["first_position_counts"] and overall == official["overall_counts"]
    assert set(overall) == set(sq.TASK_NAMES)
    assert first["open_drawer"] == 115 and first["push_into_drawer"] == 15 and first["move_slider_right"] == 87
    assert overall["place_in_slider"] == 398 and overall["lift_pink_block_drawer"] == 17
    never_first = {t for t in sq.TASK_NAMES if "drawer" in t and t.startswith("lift")} | {
        "place_in_slider", "place_in_drawer", "stack_block", "unstack_block"}
    assert not never_first & set(first) and len(first) == 34 - len(never_first)


def test_every_sequence_is_valid_under_the_rules(timed_1000):
    for condition, tasks in timed_1000[0]:
        assert len(tasks) == sq.CHAIN_LENGTH and sq.is_valid_chain(condition, tasks)


def test_sequences_per_condition(timed_1000):
    counts = collections.Counter(sq.condition_key(condition) for condition, _ in timed_1000[0])
    keys = [sq.condition_key(condition) for condition in sq.initial_conditions()]
    assert [counts[key] for key in keys] == [6] * 40 + [5] * 152 == sq.chains_per_condition(1000)
    assert [len(part) for part in np.array_split(range(250), 192)] == sq.chains_per_condition(250)


def test_initial_states_equal_calvin(official):
    states = official["initial_states"]
    assert len(states) == 192
    for key, entry in states.items():
        condition = entry["initial_condition"]
        assert sq.condition_key(condition) == key
        assert sq.fnv1_32(key) == entry["hash"] == entry["hash_py"]
        robot_obs, scene_obs = sq.initial_state(condition)
        assert robot_obs.shape == (15,) and scene_obs.shape == (24,)
        np.testing.assert_array_equal(robot_obs, entry["robot_obs"])
        np.testing.assert_array_equal(scene_obs, entry["scene_obs"])
    assert {sq.condition_key(c) for c in sq.initial_conditions()} == set(states)


def test_fnv1_32_known_values():
    assert sq.fnv1_32("dict_values([0, 0])") == 2237618234  # CALVIN.md's example (pyhash.fnv1_32)
    assert sq.fnv1_32("") == 0  # pyhash's basis is 0, not FNV's 2166136261
    # UTF-16-LE "a" is 0x61 0x00: (0 * prime) ^ 0x61, then (0x61 * prime) ^ 0.
    assert sq.fnv1_32("a") == (0x61 * sq.FNV1_32_PRIME) & 0xFFFFFFFF


def test_condition_key_is_canonical():
    condition = sq.initial_conditions()[7]
    reordered = dict(reversed(list(condition.items())))
    numpy_values = {k: np.int64(v) if isinstance(v, int) else v for k, v in condition.items()}
    assert sq.condition_key(reordered) == sq.condition_key(numpy_values) == str(condition.values())
    for a, b in zip(sq.initial_state(reordered), sq.initial_state(condition)):
        np.testing.assert_array_equal(a, b)


def test_initial_conditions():
    conditions = sq.initial_conditions()
    assert len(conditions) == 192 and len({str(c.values()) for c in conditions}) == 192
    assert conditions[0] == {"led": 0, "lightbulb": 0, "slider": "right", "drawer": "closed", "red_block": "table",
                             "blue_block": "table", "pink_block": "slider_right", "grasped": 0}
    for condition in conditions:
        blocks = [condition[f"{b}_block"] for b in sq.BLOCKS]
        assert blocks.count("table") in (1, 2) and max(blocks.count("slider_left"), blocks.count("slider_right")) < 2
    conditions[0]["led"] = 1
    assert sq.initial_conditions()[0]["led"] == 0, "callers get fresh dicts"


def _calvin_loop(condition_index: int, count: int) -> list[list[str]]:
    """CALVIN's get_sequences_for_state2, one np.random.choice at a time, checked with the rule-based validity."""
    rng = np.random.RandomState(condition_index)
    condition = sq.initial_conditions()[condition_index]
    names = list(sq.TASK_NAMES)
    found = []
    while len(found) < count:
        chain = [str(t) for t in rng.choice(names, size=sq.CHAIN_LENGTH, replace=False)]
        if sq.is_valid_chain(condition, chain):
            found.append(chain)
    return found


def test_small_num_sequences_equals_calvins_loop():
    # num_sequences=3: conditions 0, 1, 2 get one chain each, then the list is shuffled under seed 0 (as a list).
    expected = [(sq.initial_conditions()[i], _calvin_loop(i, 1)[0]) for i in range(3)]
    np.random.RandomState(sq.SHUFFLE_SEED).shuffle(expected)
    assert sq.get_sequences(3) == expected


def test_smaller_lists_share_each_conditions_first_chains(timed_1000):
    full = collections.defaultdict(list)
    for condition, tasks in timed_1000[0]:
        full[sq.condition_key(condition)].append(tasks)
    for n in (0, 5, 192, 250):
        sequences = sq.get_sequences(n)
        assert len(sequences) == n
        per_condition = collections.defaultdict(list)
        for condition, tasks in sequences:
            per_condition[sq.condition_key(condition)].append(tasks)
        keys = [sq.condition_key(condition) for condition in sq.initial_conditions()]
        assert [len(per_condition[key]) for key in keys] == sq.chains_per_condition(n)
        for key, chains in per_condition.items():  # a condition's first k chains do not depend on num_sequences ...
            assert all(chain in full[key] for chain in chains)
    assert sq.get_sequences(5) != timed_1000[0][:5]  # ... but the shuffle does
    with pytest.raises(ValueError):
        sq.get_sequences(-1)


def test_batched_draws_consume_the_rng_like_choice():
    num_draws = 3000
    reference = np.random.RandomState(11)
    expected = np.array([reference.choice(34, sq.CHAIN_LENGTH, replace=False) for _ in range(num_draws)])
    rng = np.random.RandomState(11)
    swaps = sq._draw_swaps(rng, num_draws)
    got = np.stack([sq._final_value(position, swaps) for position in range(sq.CHAIN_LENGTH)], axis=1)
    np.testing.assert_array_equal(got, expected)
    assert rng.randint(2**31, size=8).tolist() == reference.randint(2**31, size=8).tolist(), "stream left in step"


@pytest.mark.parametrize("condition_index", [0, 4, 101, 191])
def test_vectorised_validity_equals_the_rules(condition_index):
    num_draws = 20000  # holds 2 to 6 valid chains for these conditions
    condition = sq.initial_conditions()[condition_index]
    swaps = sq._draw_swaps(np.random.RandomState(condition_index), num_draws)
    chains = np.stack([sq._final_value(position, swaps) for position in range(sq.CHAIN_LENGTH)], axis=1)
    expected = [d for d in range(num_draws) if sq.is_valid_chain(condition, [sq.TASK_NAMES[t] for t in chains[d]])]
    start_id = int(sq._transition_table().condition_ids[condition_index])
    draws, valid_chains = sq._valid_draws(start_id, swaps)
    assert draws.tolist() == expected and len(expected) >= 2
    np.testing.assert_array_equal(valid_chains, chains[draws])


def test_transition_table_equals_next_state():
    transitions = sq._transition_table()
    rng = np.random.default_rng(0)
    # Walk random task sequences from random conditions, comparing table and rules at every step.
    for _ in range(300):
        index = int(rng.integers(192))
        state, state_id = sq.initial_conditions()[index], int(transitions.condition_ids[index])
        for task_index in rng.integers(34, size=8):
            after = sq.next_state(state, sq.TASK_NAMES[task_index])
            after_id = int(transitions.table[state_id, task_index])
            assert (after is None) == (after_id == transitions.dead)
            if after is None:
                break
            state, state_id = after, after_id


def test_categories_and_rules():
    sizes = collections.Counter(sq.TASK_CATEGORIES.values())
    assert dict(sizes) == EXPECTED_CATEGORY_SIZES and len(sq.TASK_NAMES) == len(set(sq.TASK_NAMES)) == 34
    assert list(sq.TASK_RULES) == list(sq.TASK_CATEGORIES) == list(sq.TASK_NAMES)
    state = sq.initial_conditions()[0]  # red and blue on the table, pink on slider_right, slider right
    assert sq.next_state(state, "lift_pink_block_slider") is None  # the door covers slider_right's block ...
    assert sq.next_state({**state, "slider": "left"}, "lift_pink_block_slider")["pink_block"] == "grasped"
    lifted = sq.next_state(state, "lift_red_block_table")
    assert lifted["grasped"] == 1 and sq.next_state(lifted, "open_drawer") is None  # nothing else while holding
    assert sq.next_state(lifted, "place_in_slider")["red_block"] == "slider_right"  # the side the slider names
    assert sq.next_state(lifted, "stack_block")["blue_block"] == "stacked_bottom"
    two_below = sq.next_state({**state, "pink_block": "table"}, "lift_red_block_table")
    assert sq.next_state(two_below, "stack_block") is None  # two rules apply: not a valid step
    drawer_open = {**state, "drawer": "open"}
    assert sq.next_state(drawer_open, "push_into_drawer") is None  # two blocks on the table
    one_on_table = {**drawer_open, "blue_block": "slider_left"}
    assert sq.next_state(one_on_table, "push_into_drawer")["red_block"] == "drawer"
    assert not sq.is_valid_chain(state, ["turn_on_led", "turn_off_led", "open_drawer", "move_slider_left",
                                         "rotate_red_block_left"])  # two light tasks: same category
    assert sq.is_valid_chain(state, ["turn_on_led", "open_drawer", "move_slider_left", "rotate_red_block_left",
                                     "lift_pink_block_slider"])


def test_official_sequences(official):
    items = sq.official_sequences()
    assert [item["index"] for item in items] == list(range(1000))
    assert [(item["condition"], item["tasks"]) for item in items] == sq.get_sequences(1000)
    for item in items[::97]:
        entry = official["initial_states"][sq.condition_key(item["condition"])]
        np.testing.assert_array_equal(item["robot_obs"], entry["robot_obs"])
        np.testing.assert_array_equal(item["scene_obs"], entry["scene_obs"])
    shard = sq.official_sequences(1000, start=625, count=125)  # GR1-Training's process 5 of 8
    assert [item["index"] for item in shard] == list(range(625, 750))
    assert [item["tasks"] for item in shard] == [item["tasks"] for item in items[625:750]]
    assert [item["index"] for item in sq.official_sequences(1000, start=990)] == list(range(990, 1000))


def test_validation_instructions():
    shipped = sq.load_validation_instructions()
    with open(shared_path("calvin", "new_playtable_validation.yaml")) as f:
        calvin = yaml.safe_load(f)
    assert shipped == {task: sentences[0] for task, sentences in calvin.items()}
    assert sq.load_validation_instructions(shared_path("calvin", "new_playtable_validation.yaml")) == shipped
    assert set(shipped) == set(sq.TASK_NAMES)
    assert shipped["open_drawer"] == "pull the handle to open the drawer"
    assert shipped["lift_red_block_drawer"] == "Take the red block from the drawer"
    assert shipped["push_into_drawer"] == "slide the block that it falls into the drawer"


def test_numpy_global_rng_untouched():
    np.random.seed(123)
    before = np.random.get_state()
    sq.get_sequences(7)
    sq.initial_state(sq.initial_conditions()[3])
    after = np.random.get_state()
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and before[2:] == after[2:]
