"""CALVIN's official evaluation sequences and initial states, reproduced exactly without calvin_agent.

Sources (mees/calvin, calvin_models/calvin_agent/evaluation): `multistep_sequences.get_sequences` and
`utils.get_env_state_for_initial_condition`. The output equals theirs item for item; only the speed differs.

Symbolic world. A state maps the keys of STATE_SPACE (in that order) to values. Each of the 34 tasks has a list of
condition -> effect rules; a task may follow a state when exactly one of its rules applies there (more than one,
as for stack_block with two blocks on the table, makes the chain invalid, as in CALVIN). Every task has a category
and a chain never repeats one. The initial conditions are the states with grasped=0, one or two blocks on the table
and at most one block per slider side: 192 of them, in itertools.product order.

get_sequences(n). np.array_split(range(n), 192) gives each condition its number of chains (the first n % 192
conditions get one more). For condition i, CALVIN seeds numpy's global legacy RNG with i and repeats
`np.random.choice(34 task names, 5, replace=False)` until the chain is valid, keeping the valid ones. The chains are
concatenated in condition order, paired with their condition and shuffled by `np.random.shuffle` under a temporary
global seed 0.

Speed (same RNG consumption, so same result; CALVIN took 72 s with 2 processes). `choice(names, 5,
replace=False)` picks names[permutation(34)[:5]], and permutation(34) is a Fisher-Yates shuffle drawing
j = random_interval(i) for i = 33 .. 1 (masked rejection sampling, one 32-bit output per try). Legacy
`randint(0, high)` with an array `high` draws each entry by that same masked rejection, so
`randint(0, [34, 33, .., 2] * k)` consumes the stream exactly like k successive choices. Draws are therefore made in
batches of thousands; only the first five entries of each permutation are traced through its swaps, one position at
a time, and a draw is dropped as soon as its chain breaks (a transition table over all reachable symbolic states
replaces the rule matching). Draws past the last needed chain are harmless: the next condition reseeds. This takes
about 10 s for the 1000 official sequences on one core; CALVIN's own loop, one np.random.choice and one rule check per
draw, costs about 60 us per draw here and needs about 7 million draws: about 8 minutes. The list of the last few
num_sequences asked for is kept in the process. This module uses its own RandomState objects and never touches
numpy's global RNG.

Initial state. robot_obs is a fixed pose. scene_obs sets the slider, drawer, switch, lights and blocks from the
condition; a RandomState seeded with FNV-1 32 of `str(condition.values())` orders the two table slots and draws
each block's yaw.
"""
from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from facts import CHAIN_LENGTH

NUM_OFFICIAL_SEQUENCES = 1000
SHUFFLE_SEED = 0  # CALVIN's temp_seed(0) around np.random.shuffle
VALIDATION_INSTRUCTIONS_PATH = Path(__file__).resolve().parent / "data" / "new_playtable_validation.yaml"

# The symbolic state space, in CALVIN's key order: str(condition.values()) seeds the initial state, so it matters.
STATE_SPACE: dict[str, tuple[Any, ...]] = {
    "led": (0, 1),
    "lightbulb": (0, 1),
    "slider": ("right", "left"),
    "drawer": ("closed", "open"),
    "red_block": ("table", "slider_right", "slider_left"),
    "blue_block": ("table", "slider_right", "slider_left"),
    "pink_block": ("table", "slider_right", "slider_left"),
    "grasped": (0,),
}
STATE_KEYS = tuple(STATE_SPACE)
BLOCKS = ("red", "blue", "pink")
SLIDER_SIDES = ("right", "left")

# The 34 tasks in the order of CALVIN's `tasks` dict: np.random.choice picks indices into this list, so the order is
# part of the RNG contract.
TASK_NAMES: tuple[str, ...] = (
    "rotate_red_block_right", "rotate_red_block_left", "rotate_blue_block_right", "rotate_blue_block_left",
    "rotate_pink_block_right", "rotate_pink_block_left",
    "push_red_block_right", "push_red_block_left", "push_blue_block_right", "push_blue_block_left",
    "push_pink_block_right", "push_pink_block_left",
    "move_slider_left", "move_slider_right", "open_drawer", "close_drawer",
    "lift_red_block_table", "lift_red_block_slider", "lift_red_block_drawer",
    "lift_blue_block_table", "lift_blue_block_slider", "lift_blue_block_drawer",
    "lift_pink_block_table", "lift_pink_block_slider", "lift_pink_block_drawer",
    "place_in_slider", "place_in_drawer", "stack_block", "unstack_block",
    "turn_on_lightbulb", "turn_off_lightbulb", "turn_on_led", "turn_off_led", "push_into_drawer",
)


def _task_categories() -> dict[str, int]:
    """CALVIN's task categories; a chain may not contain two tasks of one category."""
    categories: dict[str, int] = {}
    for block in BLOCKS:
        for direction in ("right", "left"):
            categories[f"rotate_{block}_block_{direction}"] = 1
            categories[f"push_{block}_block_{direction}"] = 1
        categories[f"lift_{block}_block_table"] = 4
        categories[f"lift_{block}_block_slider"] = 5
        categories[f"lift_{block}_block_drawer"] = 6
    categories.update(move_slider_left=2, move_slider_right=2, open_drawer=3, close_drawer=3, place_in_slider=7,
                      place_in_drawer=7, turn_on_lightbulb=8, turn_off_lightbulb=8, turn_on_led=8, turn_off_led=8,
                      push_into_drawer=9, stack_block=10, unstack_block=11)
    return {name: categories[name] for name in TASK_NAMES}


TASK_CATEGORIES: dict[str, int] = _task_categories()


@dataclass(frozen=True)
class Rule:
    """One condition -> effect rule: it applies where every key of `requires` has one of its allowed values."""

    requires: tuple[tuple[str, tuple[Any, ...]], ...]
    effect: tuple[tuple[str, Any], ...]

    def applies(self, state: Mapping[str, Any]) -> bool:
        return all(state[key] in allowed for key, allowed in self.requires)

    def apply(self, state: Mapping[str, Any]) -> dict[str, Any]:
        return {**state, **dict(self.effect)}


def _rule(requires: dict[str, Any], effect: dict[str, Any]) -> Rule:
    """A Rule from CALVIN's notation: a required value is one value, or a tuple of allowed values."""
    return Rule(tuple((key, value if isinstance(value, tuple) else (value,)) for key, value in requires.items()),
                tuple(effect.items()))


def _block_rules() -> dict[str, list[Rule]]:
    """Rules of the tasks about one block: rotate, push and the three lifts."""
    rules: dict[str, list[Rule]] = {}
    for block in BLOCKS:
        key = f"{block}_block"
        on_table = _rule({key: "table", "grasped": 0}, {key: "table"})
        grasp = {key: "grasped", "grasped": 1}
        for direction in ("right", "left"):
            rules[f"rotate_{key}_{direction}"] = [on_table]
            rules[f"push_{key}_{direction}"] = [on_table]
        rules[f"lift_{key}_table"] = [_rule({key: "table", "grasped": 0}, grasp)]
        # A block on one side of the shelf can be lifted only while the sliding door covers the other side.
        rules[f"lift_{key}_slider"] = [_rule({key: "slider_left", "slider": "right", "grasped": 0}, grasp),
                                       _rule({key: "slider_right", "slider": "left", "grasped": 0}, grasp)]
        rules[f"lift_{key}_drawer"] = [_rule({key: "drawer", "drawer": "open", "grasped": 0}, grasp)]
    return rules


def _two_block_rules() -> dict[str, list[Rule]]:
    """Rules of the tasks that move the grasped block or a pair of blocks."""
    keys = [f"{block}_block" for block in BLOCKS]
    # Faithful to CALVIN: place_in_slider puts the block on the side named by the slider position, as written there.
    place_in_slider = [_rule({key: "grasped", "slider": side, "grasped": 1}, {key: f"slider_{side}", "grasped": 0})
                       for key in keys for side in SLIDER_SIDES]
    place_in_drawer = [_rule({key: "grasped", "drawer": "open", "grasped": 1}, {key: "drawer", "grasped": 0})
                       for key in keys]
    pairs = [(top, bottom) for top in keys for bottom in keys if top != bottom]
    stack = [_rule({top: "grasped", bottom: "table", "grasped": 1},
                   {top: "stacked_top", bottom: "stacked_bottom", "grasped": 0}) for top, bottom in pairs]
    unstack = [_rule({top: "stacked_top", bottom: "stacked_bottom", "grasped": 0}, {top: "table", bottom: "table"})
               for top, bottom in pairs]
    on_shelf = ("slider_right", "slider_left")
    into_drawer = [_rule({key: "table", **{other: on_shelf for other in keys if other != key}, "drawer": "open",
                          "grasped": 0}, {key: "drawer", "grasped": 0}) for key in keys]
    return {"place_in_slider": place_in_slider, "place_in_drawer": place_in_drawer, "stack_block": stack,
            "unstack_block": unstack, "push_into_drawer": into_drawer}


def _task_rules() -> dict[str, tuple[Rule, ...]]:
    """Every task's rules (CALVIN's `tasks` dict), keyed in TASK_NAMES order."""
    rules = {**_block_rules(), **_two_block_rules(),
             "move_slider_left": [_rule({"slider": "right", "grasped": 0}, {"slider": "left"})],
             "move_slider_right": [_rule({"slider": "left", "grasped": 0}, {"slider": "right"})],
             "open_drawer": [_rule({"drawer": "closed", "grasped": 0}, {"drawer": "open"})],
             "close_drawer": [_rule({"drawer": "open", "grasped": 0}, {"drawer": "closed"})]}
    for light in ("lightbulb", "led"):
        rules[f"turn_on_{light}"] = [_rule({light: 0, "grasped": 0}, {light: 1})]
        rules[f"turn_off_{light}"] = [_rule({light: 1, "grasped": 0}, {light: 0})]
    return {name: tuple(rules[name]) for name in TASK_NAMES}


TASK_RULES: dict[str, tuple[Rule, ...]] = _task_rules()


def _is_initial(values: tuple[Any, ...]) -> bool:
    """CALVIN's filter: one or two blocks on the table and at most one block per slider side."""
    blocks = [values[STATE_KEYS.index(f"{block}_block")] for block in BLOCKS]
    return blocks.count("table") in (1, 2) and blocks.count("slider_right") < 2 and blocks.count("slider_left") < 2


_CONDITION_VALUES: tuple[tuple[Any, ...], ...] = tuple(
    values for values in itertools.product(*STATE_SPACE.values()) if _is_initial(values))


def initial_conditions() -> list[dict[str, Any]]:
    """The 192 initial conditions in CALVIN's order (fresh dicts, keys in STATE_KEYS order)."""
    return [dict(zip(STATE_KEYS, values)) for values in _CONDITION_VALUES]


# ------------------------------------------------------------------------------------------------ chain validity

def next_state(state: Mapping[str, Any], task: str) -> dict[str, Any] | None:
    """The state after `task`, or None where not exactly one of its rules applies (CALVIN's check_sequence)."""
    applicable = [rule for rule in TASK_RULES[task] if rule.applies(state)]
    return applicable[0].apply(state) if len(applicable) == 1 else None


def is_valid_chain(condition: Mapping[str, Any], tasks: list[str] | tuple[str, ...]) -> bool:
    """CALVIN's check_sequence: every task follows the state left by the previous ones and no category repeats."""
    state: dict[str, Any] | None = dict(condition)
    for task in tasks:
        state = next_state(state, task)
        if state is None:
            return False
    categories = [TASK_CATEGORIES[task] for task in tasks]
    return len(set(categories)) == len(categories)


@dataclass(frozen=True)
class _TransitionTable:
    """next_state over every symbolic state reachable from an initial condition, as integer ids.

    table[s, t] is the id of the state after task t from state s, or `dead` (the last id, which maps to itself)
    where the task does not follow; condition_ids[i] is the id of initial condition i.
    """

    table: np.ndarray  # (S + 1, 34) int32
    condition_ids: np.ndarray  # (192,) int32
    category_bits: np.ndarray  # (34,) int64, 1 << category

    @property
    def dead(self) -> int:
        return self.table.shape[0] - 1


@functools.cache
def _transition_table() -> _TransitionTable:
    ids: dict[tuple[Any, ...], int] = {}
    edges: list[tuple[tuple[Any, ...], list[tuple[Any, ...] | None]]] = []
    frontier = list(_CONDITION_VALUES)
    for values in frontier:
        ids[values] = len(ids)
    while frontier:
        values = frontier.pop()
        state = dict(zip(STATE_KEYS, values))
        row = []
        for task in TASK_NAMES:
            after = next_state(state, task)
            after_values = None if after is None else tuple(after[key] for key in STATE_KEYS)
            if after_values is not None and after_values not in ids:
                ids[after_values] = len(ids)
                frontier.append(after_values)
            row.append(after_values)
        edges.append((values, row))
    dead = len(ids)
    table = np.full((dead + 1, len(TASK_NAMES)), dead, dtype=np.int32)
    for values, row in edges:
        table[ids[values]] = [dead if after is None else ids[after] for after in row]
    condition_ids = np.array([ids[values] for values in _CONDITION_VALUES], dtype=np.int32)
    category_bits = np.array([1 << TASK_CATEGORIES[task] for task in TASK_NAMES], dtype=np.int64)
    return _TransitionTable(table, condition_ids, category_bits)


# ------------------------------------------------------------------------------------------------ sampling

# Fisher-Yates over the 34 task indices draws j in [0, i] for i = 33 .. 1; randint's exclusive bounds are i + 1.
_SWAP_POSITIONS = np.arange(len(TASK_NAMES) - 1, 0, -1)  # i, in draw order
_MIN_BATCH = 4096  # draws per batch at least; a condition needs 1,000 to 20,000 draws per valid chain
_MAX_BATCH = 1 << 16  # bounds the memory a batch takes (about 17 MB per array)
# Every condition finds a valid chain within about 20,000 draws; a hundred times that without one means broken rules.
_MAX_DRAWS_PER_CHAIN = 2_000_000


def _draw_swaps(rng: np.random.RandomState, num_draws: int) -> np.ndarray:
    """The Fisher-Yates swap targets of `num_draws` successive `rng.choice(34, 5, replace=False)` calls, leaving
    `rng` exactly where those calls would. Row i - 1 holds j for position i (shape (33, num_draws), int8).

    Legacy randint with array bounds (broadcast over `size` in C order, so draw by draw) draws each entry by masked
    rejection like random_interval(i), one 32-bit output at a time. Its dtype must stay 32 or 64 bits: 8- and
    16-bit dtypes split 32-bit outputs and would consume the stream differently.
    """
    swaps = rng.randint(0, _SWAP_POSITIONS + 1, size=(num_draws, len(_SWAP_POSITIONS)), dtype=np.int64)
    return swaps.astype(np.int8)[:, ::-1].T.copy()


def _final_value(position: int, swaps: np.ndarray) -> np.ndarray:
    """The task index that Fisher-Yates leaves at `position` for each draw ((33, N) swaps -> (N,) int8).

    Applying the swaps (i, j_i) to the position in reverse order (i = 1 .. 33) gives the index of the value that
    lands there. Swaps with i < position cannot move it (j_i <= i); the swap i = position moves it to j_i <= i;
    after that it stays below the next i, so a later swap moves it only where j_i equals it, to i.
    """
    if position == 0:
        pos = np.zeros(swaps.shape[1], dtype=np.int8)
    else:
        pos = swaps[position - 1].copy()
    for i in range(position + 1, len(TASK_NAMES)):
        np.putmask(pos, pos == swaps[i - 1], i)
    return pos


def _valid_draws(start_id: int, swaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(draw numbers, chains (M, 5) task indices) of the draws whose chain is valid from state `start_id`.

    The chain is built one position at a time and draws are dropped as soon as a task does not follow or repeats
    a category, so most of the tracing is done for few draws.
    """
    transitions = _transition_table()
    draws = np.arange(swaps.shape[1])
    state = np.full(len(draws), start_id, dtype=np.int32)
    used_categories = np.zeros(len(draws), dtype=np.int64)
    chain: list[np.ndarray] = []
    for position in range(CHAIN_LENGTH):
        task = _final_value(position, swaps).astype(np.intp)
        state = transitions.table[state, task]
        bits = transitions.category_bits[task]
        keep = np.flatnonzero((state != transitions.dead) & (used_categories & bits == 0))
        draws, state, swaps = draws[keep], state[keep], swaps[:, keep]
        used_categories = (used_categories | bits)[keep]
        chain = [tasks[keep] for tasks in chain] + [task[keep]]
    return draws, np.stack(chain, axis=1)


def _condition_chains(condition_index: int, count: int) -> list[tuple[int, ...]]:
    """CALVIN's rejection sampling for one condition: its first `count` valid chains (task indices) under
    np.random.seed(condition_index), drawn in batches (the first k chains do not depend on how many are asked for)."""
    rng = np.random.RandomState(condition_index)  # CALVIN: np.random.seed(i) in condition i's worker
    start_id = int(_transition_table().condition_ids[condition_index])
    found: list[tuple[int, ...]] = []
    drawn, batch = 0, _MIN_BATCH
    while len(found) < count:
        _, chains = _valid_draws(start_id, _draw_swaps(rng, batch))
        found.extend(tuple(int(t) for t in chain) for chain in chains)
        drawn += batch
        if drawn > _MAX_DRAWS_PER_CHAIN * (len(found) + 1):
            raise RuntimeError(f"condition {condition_index}: {drawn} draws gave only {len(found)} valid chains "
                               "(broken rules or sampler)")
        # Size the next batch for the chains still missing at the rate seen so far, with a margin.
        rate = (len(found) + 1) / drawn
        batch = int(np.clip(0.5 * (count - len(found)) / rate, _MIN_BATCH, _MAX_BATCH))
    return found[:count]


def chains_per_condition(num_sequences: int) -> list[int]:
    """How many chains each condition contributes: the section sizes of np.array_split(range(n), 192)."""
    per, extra = divmod(num_sequences, len(_CONDITION_VALUES))
    return [per + 1] * extra + [per] * (len(_CONDITION_VALUES) - extra)


@functools.lru_cache(maxsize=8)
def _sequence_order(num_sequences: int) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """(condition index, chain) for each evaluation sequence, in CALVIN's final (shuffled) order."""
    counts = chains_per_condition(num_sequences)
    unshuffled = [(index, chain) for index, count in enumerate(counts) for chain in _condition_chains(index, count)]
    # np.random.shuffle of a list and of arange(n) make the same swaps, so permutation(n) gives the new order.
    order = np.random.RandomState(SHUFFLE_SEED).permutation(len(unshuffled))
    return tuple(unshuffled[i] for i in order)


def get_sequences(num_sequences: int = NUM_OFFICIAL_SEQUENCES) -> list[tuple[dict[str, Any], list[str]]]:
    """CALVIN's get_sequences(num_sequences): (initial condition, 5 task names) pairs, in CALVIN's order.

    The list depends on num_sequences as a whole: get_sequences(5) is not get_sequences(1000)[:5].
    """
    if num_sequences < 0:
        raise ValueError(f"num_sequences must be >= 0, got {num_sequences}")
    return [(dict(zip(STATE_KEYS, _CONDITION_VALUES[index])), [TASK_NAMES[t] for t in chain])
            for index, chain in _sequence_order(num_sequences)]


# ------------------------------------------------------------------------------------------------ initial state

# get_env_state_for_initial_condition's constants (calvin_agent/evaluation/utils.py).
ROBOT_OBS = np.array([0.02586889, -0.2313129, 0.5712808, 3.09045411, -0.02908596, 1.50013585, 0.07999963,
                      -1.21779124, 1.03987629, 2.11978254, -2.34205014, -0.87015899, 1.64119093, 0.55344928, 1.0])
ROBOT_OBS.flags.writeable = False  # shared constant: initial_state returns copies
SLIDER_LEFT_SLOT = (-2.40851662e-01, 9.24044687e-02, 4.60990009e-01)
SLIDER_RIGHT_SLOT = (7.03416330e-02, 9.24044687e-02, 4.60990009e-01)
TABLE_SLOTS = ((5.00000896e-02, -1.20000177e-01, 4.59990009e-01), (2.29995412e-01, -1.19995140e-01, 4.59990010e-01))
BLOCK_YAW_RANGE = (np.pi / 2 - np.pi / 8, np.pi / 2 + np.pi / 8)
SLIDER_OPEN_LEFT = 0.28  # m, slider joint when the door is on the left
DRAWER_OPEN = 0.22  # m, drawer joint when open
SWITCH_ON = 0.088  # switch joint when the light bulb is on
# scene_obs layout: 0 slider, 1 drawer, 2 button, 3 switch, 4 lightbulb, 5 led, then per block (red, blue, pink)
# 6 entries: position xyz, orientation as Euler xyz.
BLOCK_OFFSETS = {"red": 6, "blue": 12, "pink": 18}
SCENE_OBS_DIM = 24
YAW_INDEX = 5  # within a block's 6 entries

FNV1_32_PRIME = 16777619
FNV1_32_OFFSET = 0  # pyhash.fnv1_32's default seed is 0, not FNV's usual offset basis 2166136261


def fnv1_32(text: str) -> int:
    """pyhash.fnv1_32()(text): FNV-1 (multiply, then xor) with basis 0 over the UTF-16-LE bytes of `text`."""
    value = FNV1_32_OFFSET
    for byte in text.encode("utf-16-le"):
        value = ((value * FNV1_32_PRIME) & 0xFFFFFFFF) ^ byte
    return value


def condition_key(condition: Mapping[str, Any]) -> str:
    """str(condition.values()) as CALVIN hashes it, e.g. "dict_values([1, 1, 'left', 'open', ...])".

    Keys are taken in STATE_KEYS order and values as plain int / str, so a reordered dict or numpy scalars give
    the same key as the dicts of get_sequences (CALVIN's own conditions are always in that order).
    """
    canonical = {key: condition[key] if isinstance(condition[key], str) else int(condition[key])
                 for key in STATE_KEYS}
    return str(canonical.values())


def initial_state(condition: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """CALVIN's get_env_state_for_initial_condition: (robot_obs (15,), scene_obs (24,)) for a condition."""
    rng = np.random.RandomState(fnv1_32(condition_key(condition)))
    table_slots = [np.array(slot) for slot in TABLE_SLOTS]
    rng.shuffle(table_slots)
    scene_obs = np.zeros(SCENE_OBS_DIM)
    scene_obs[0] = SLIDER_OPEN_LEFT if condition["slider"] == "left" else 0.0
    scene_obs[1] = DRAWER_OPEN if condition["drawer"] == "open" else 0.0
    scene_obs[3] = SWITCH_ON if condition["lightbulb"] == 1 else 0.0
    scene_obs[4] = condition["lightbulb"]
    scene_obs[5] = condition["led"]
    for block in BLOCKS:  # the yaws are drawn in this order whatever the blocks' places
        offset = BLOCK_OFFSETS[block]
        scene_obs[offset:offset + 3] = _block_position(condition, block, table_slots)
        scene_obs[offset + YAW_INDEX] = rng.uniform(*BLOCK_YAW_RANGE)
    return ROBOT_OBS.copy(), scene_obs


def _block_position(condition: Mapping[str, Any], block: str, table_slots: list[np.ndarray]) -> np.ndarray:
    """A block's position: its slider slot, or a table slot (red takes the first, pink the second, blue the second
    if red is on the table and the first otherwise)."""
    place = condition[f"{block}_block"]
    if place == "slider_right":
        return np.array(SLIDER_RIGHT_SLOT)
    if place == "slider_left":
        return np.array(SLIDER_LEFT_SLOT)
    if block == "red" or (block == "blue" and condition["red_block"] != "table"):
        return table_slots[0]
    return table_slots[1]


# ------------------------------------------------------------------------------------------------ evaluator API

def official_sequences(num_sequences: int = NUM_OFFICIAL_SEQUENCES, start: int = 0,
                       count: int | None = None) -> list[dict[str, Any]]:
    """Items [start, start + count) of get_sequences(num_sequences) (to its end when count is None), each
    {'index', 'condition', 'tasks', 'robot_obs', 'scene_obs'}; 'index' is the position in the whole list.

    GR1-Training's process k of P evaluates official_sequences(1000, k * n, n) with n = 1000 // P.
    """
    sequences = get_sequences(num_sequences)
    stop = len(sequences) if count is None else min(start + count, len(sequences))
    items = []
    for index in range(start, stop):
        condition, tasks = sequences[index]
        robot_obs, scene_obs = initial_state(condition)
        items.append({"index": index, "condition": condition, "tasks": tasks, "robot_obs": robot_obs,
                      "scene_obs": scene_obs})
    return items


def load_validation_instructions(path: str | Path | None = None) -> dict[str, str]:
    """The validation instruction per task (the first sentence of each entry of CALVIN's
    new_playtable_validation.yaml; the shipped copy by default)."""
    with open(VALIDATION_INSTRUCTIONS_PATH if path is None else path) as f:
        annotations = yaml.safe_load(f)
    return {task: sentences[0] for task, sentences in annotations.items()}
