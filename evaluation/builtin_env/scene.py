"""Geometry and construction of the built-in scene: a table, a Franka Panda, three coloured cubes and a button with
a green LED, all from pybullet_data or built from primitive shapes here. No physics stepping, no control: that is
env.py. Every length is in metres, every angle in radians, in pybullet's world frame.

World frame (as in CALVIN): +x is "right" and -x is "left" for someone facing the table from the robot's side, +y
points away from the robot, +z up. The robot stands at the back edge of the table (y = ROBOT_BASE_XY[1]) facing +y.
Each cube has its own lane (a fixed y per colour) and starts in one of three columns (x), so pushing a cube left or
right along its lane never hits another cube. The button sits behind the lanes, to the robot's right.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np
import pybullet as p
import pybullet_data

from facts import CAMERA_SIZES, SCENE_OBS_DIM

# ---- table (pybullet_data/table/table.urdf: a 1.5 x 1.0 m top whose surface is at z = 0.625) ----
TABLE_URDF = "table/table.urdf"
TABLE_TOP_Z = 0.625
TABLE_LINK = "base_link"  # the oracle's name for the table top (pybullet link index -1), as CALVIN's table

# ---- robot (pybullet_data/franka_panda/panda.urdf, loaded with its low-poly collision meshes as visuals) ----
PANDA_URDF = "franka_panda/panda.urdf"
ROBOT_BASE_XY = (0.0, -0.45)
ROBOT_BASE_YAW = np.pi / 2  # the arm's zero pose points along +y, over the table
ARM_JOINTS = (0, 1, 2, 3, 4, 5, 6)
FINGER_JOINTS = (9, 10)  # prismatic, 0 (closed) .. 0.04 (open) each; opening width = their sum
FINGER_OPEN = 0.04
HAND_LINK = 8  # panda_hand: the gripper camera is mounted on it
TCP_LINK = 11  # panda_grasptarget: 0.105 m below the hand, between the fingertips (CALVIN's tcp)
ARM_LOWER = (-2.8973, -1.7628, -2.8973, -3.0718, -2.8973, -0.0175, -2.8973)  # Franka's limits, as calvin_env
ARM_UPPER = (2.8973, 1.7628, 2.8973, -0.0698, 2.8973, 3.7525, 2.8973)
# Home: TCP 0.25 m above the table over the middle lane, gripper pointing down, fingers opening along x. The roll is
# 0.04 rad short of pi so that the observed Euler angle never wraps between +pi and -pi (CALVIN's home roll is 3.09).
HOME_TCP_POS = (0.0, -0.06, TABLE_TOP_Z + 0.25)
HOME_TCP_EULER = (np.pi - 0.04, 0.0, np.pi / 2)
HOME_JOINTS = (-0.007844, -0.373345, 0.021944, -2.674818, -0.042879, 2.300351, 0.826577)  # IK of HOME_TCP (tests)
# robot_obs of the home pose (CALVIN's layout; TCP entries by forward kinematics, checked by the tests), gripper open.
HOME_ROBOT_OBS = np.array((0.000006, -0.059559, 0.875464, 3.101623, 0.000244, 1.570801, 0.080000,
                           *HOME_JOINTS, 1.0))
ARM_COLOR = (0.88, 0.88, 0.9, 1.0)
HAND_COLOR = (0.25, 0.25, 0.28, 1.0)

# ---- cubes (primitive boxes) ----
BLOCK_NAMES = ("block_red", "block_blue", "block_pink")  # CALVIN's names and scene_obs order (scene D)
BLOCK_COLORS = {
    "block_red": (0.85, 0.08, 0.08, 1.0),
    "block_blue": (0.08, 0.25, 0.9, 1.0),
    "block_pink": (1.0, 0.45, 0.8, 1.0),
}
BLOCK_HALF = 0.025  # 5 cm cubes
BLOCK_MASS = 0.1
BLOCK_FRICTION = 0.5  # x the table's 1.0: cubes slide when pushed instead of tipping over
BLOCK_LANE_Y = {"block_red": -0.16, "block_blue": -0.06, "block_pink": 0.04}
BLOCK_COLUMN_X = (-0.13, 0.0, 0.13)  # columns -1, 0, +1 of the symbolic state (sequences.py)
BLOCK_REST_Z = TABLE_TOP_Z + BLOCK_HALF

# ---- button with LED (primitive boxes; the cap is a prismatic link pushed down by the robot) ----
BUTTON_XY = (0.25, 0.15)
BUTTON_BASE_HALF = (0.045, 0.045, 0.02)  # housing, standing on the table
BUTTON_CAP_HALF = (0.025, 0.025, 0.012)
BUTTON_TRAVEL = 0.02  # joint range [0, BUTTON_TRAVEL]; 0 = up, positive = pressed down (CALVIN: 0..0.02)
BUTTON_THRESHOLD = BUTTON_TRAVEL / 2  # pressed when the joint is past half its travel, as calvin_env's Button
BUTTON_SPRING_FORCE = 4.0  # N, the position motor pulling the cap back up (calvin_env's MAX_FORCE)
BUTTON_CAP_TOP_Z = TABLE_TOP_Z + 2 * BUTTON_BASE_HALF[2] + 2 * BUTTON_CAP_HALF[2]  # cap top with the joint at 0
BUTTON_BASE_COLOR = (0.3, 0.3, 0.32, 1.0)
BUTTON_CAP_COLOR = (0.95, 0.75, 0.1, 1.0)
LED_OFFSET = (0.0, 0.075, 0.0)  # LED pad behind the housing (away from the robot), so the hand never hides it
LED_HALF = (0.035, 0.025, 0.01)
LED_ON_COLOR = (0.1, 1.0, 0.1, 1.0)
LED_OFF_COLOR = (0.92, 0.92, 0.92, 1.0)  # white when off, as calvin_env
BUTTON_CAP_LINK = 0  # link indices of the button body
LED_LINK = 1

# ---- scene_obs layout: CALVIN's 24 entries; this scene has no slider, drawer, switch or lightbulb, whose entries are
# always 0 (given values are ignored by reset) ----
SCENE_OBS_SIZE = SCENE_OBS_DIM
SCENE_OBS_SLIDER, SCENE_OBS_DRAWER, SCENE_OBS_BUTTON, SCENE_OBS_SWITCH, SCENE_OBS_LIGHTBULB, SCENE_OBS_LED = range(6)
SCENE_OBS_BLOCKS = 6  # then per block (BLOCK_NAMES order): x, y, z, Euler x, y, z


def block_slice(index: int) -> slice:
    """scene_obs entries (pos 3, Euler 3) of BLOCK_NAMES[index]."""
    start = SCENE_OBS_BLOCKS + 6 * index
    return slice(start, start + 6)


# ---- cameras (CALVIN's sizes and gripper fov; the static camera is placed for this scene) ----
STATIC_SIZE, GRIPPER_SIZE = CAMERA_SIZES["static"], CAMERA_SIZES["gripper"]
STATIC_EYE = (0.07, 0.55, 1.22)
STATIC_TARGET = (0.07, -0.04, TABLE_TOP_Z)
STATIC_UP = (0.0, 0.0, 1.0)
STATIC_FOV = 46.0
STATIC_NEAR, STATIC_FAR = 0.01, 10.0
GRIPPER_FOV = 75.0  # CALVIN's
GRIPPER_NEAR, GRIPPER_FAR = 0.01, 2.0
# Hand frame (home pose: +x = world +y, away from the robot; +y = world +x, the fingers' opening axis; +z = down).
GRIPPER_EYE_IN_HAND = (-0.06, 0.0, 0.02)  # beside the hand on the robot's side
GRIPPER_TARGET_IN_HAND = (0.03, 0.0, 0.2)  # looks down past the fingertips, slightly forwards
LIGHT_DIRECTION = (0.4, 0.6, 1.0)
LIGHT_AMBIENT, LIGHT_DIFFUSE, LIGHT_SPECULAR = 0.6, 0.5, 0.05


@dataclass(frozen=True)
class SceneIds:
    """pybullet body ids of one built scene."""

    table: int
    robot: int
    button: int
    blocks: dict[str, int]  # name -> body id


def _load_low_poly_panda(cid: int) -> int:
    """Loads pybullet_data's panda.urdf with its collision meshes also as visual meshes (3.4k instead of 100k
    triangles), which makes TinyRenderer ~5x faster; the kinematics, dynamics and collision shapes are untouched."""
    path = os.path.join(pybullet_data.getDataPath(), PANDA_URDF)
    panda_dir = os.path.dirname(path)
    with open(path) as f:
        urdf = f.read()
    urdf = urdf.replace("package://meshes/visual/", "package://meshes/collision/")
    urdf = urdf.replace("package://meshes/", os.path.join(panda_dir, "meshes") + "/")
    fd, path = tempfile.mkstemp(suffix=".urdf", prefix="builtin_panda_")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(urdf)
        orn = p.getQuaternionFromEuler((0.0, 0.0, ROBOT_BASE_YAW))
        robot = p.loadURDF(path, (*ROBOT_BASE_XY, TABLE_TOP_Z), orn, useFixedBase=True, physicsClientId=cid)
    finally:
        os.remove(path)
    for link in range(-1, p.getNumJoints(robot, physicsClientId=cid)):
        color = HAND_COLOR if link >= HAND_LINK else ARM_COLOR
        p.changeVisualShape(robot, link, rgbaColor=color, physicsClientId=cid)
    # Keep both fingers symmetric (as calvin_env and pybullet's panda example do).
    gear = p.createConstraint(robot, FINGER_JOINTS[0], robot, FINGER_JOINTS[1], p.JOINT_GEAR, (1, 0, 0),
                              (0, 0, 0), (0, 0, 0), physicsClientId=cid)
    p.changeConstraint(gear, gearRatio=-1, erp=0.1, maxForce=50, physicsClientId=cid)
    return robot


def _box(cid: int, half: tuple[float, ...], color: tuple[float, ...], collide: bool = True) -> tuple[int, int]:
    """(collision shape or -1, visual shape) of a box."""
    visual = p.createVisualShape(p.GEOM_BOX, halfExtents=half, rgbaColor=color, physicsClientId=cid)
    collision = p.createCollisionShape(p.GEOM_BOX, halfExtents=half, physicsClientId=cid) if collide else -1
    return collision, visual


def _make_block(cid: int, name: str) -> int:
    collision, visual = _box(cid, (BLOCK_HALF,) * 3, BLOCK_COLORS[name])
    block = p.createMultiBody(BLOCK_MASS, collision, visual, (0.0, BLOCK_LANE_Y[name], BLOCK_REST_Z),
                              physicsClientId=cid)
    p.changeDynamics(block, -1, lateralFriction=BLOCK_FRICTION, physicsClientId=cid)
    return block


def _make_button(cid: int) -> int:
    """Housing (fixed base) + cap (prismatic link, +q = down) + LED pad (fixed link, visual only)."""
    base_collision, base_visual = _box(cid, BUTTON_BASE_HALF, BUTTON_BASE_COLOR)
    cap_collision, cap_visual = _box(cid, BUTTON_CAP_HALF, BUTTON_CAP_COLOR)
    _, led_visual = _box(cid, LED_HALF, LED_OFF_COLOR, collide=False)
    base_z = TABLE_TOP_Z + BUTTON_BASE_HALF[2]
    cap_z = BUTTON_BASE_HALF[2] + BUTTON_CAP_HALF[2]
    led_z = -BUTTON_BASE_HALF[2] + LED_HALF[2]
    button = p.createMultiBody(
        baseMass=0.0, baseCollisionShapeIndex=base_collision, baseVisualShapeIndex=base_visual,
        basePosition=(*BUTTON_XY, base_z),
        linkMasses=(0.05, 0.0), linkCollisionShapeIndices=(cap_collision, -1),
        linkVisualShapeIndices=(cap_visual, led_visual),
        linkPositions=((0.0, 0.0, cap_z), (LED_OFFSET[0], LED_OFFSET[1], led_z)),
        linkOrientations=((0, 0, 0, 1), (0, 0, 0, 1)),
        linkInertialFramePositions=((0, 0, 0), (0, 0, 0)), linkInertialFrameOrientations=((0, 0, 0, 1),) * 2,
        linkParentIndices=(0, 0), linkJointTypes=(p.JOINT_PRISMATIC, p.JOINT_FIXED),
        linkJointAxis=((0, 0, -1), (0, 0, 1)), physicsClientId=cid)
    p.changeDynamics(button, BUTTON_CAP_LINK, jointLowerLimit=0.0, jointUpperLimit=BUTTON_TRAVEL,
                     physicsClientId=cid)
    p.setJointMotorControl2(button, BUTTON_CAP_LINK, p.POSITION_CONTROL, targetPosition=0.0,
                            force=BUTTON_SPRING_FORCE, physicsClientId=cid)
    return button


def build_scene(cid: int) -> SceneIds:
    """Loads everything into an empty pybullet client (gravity and time step are the caller's)."""
    p.setAdditionalSearchPath(pybullet_data.getDataPath(), physicsClientId=cid)
    table = p.loadURDF(TABLE_URDF, useFixedBase=True, physicsClientId=cid)
    robot = _load_low_poly_panda(cid)
    button = _make_button(cid)
    blocks = {name: _make_block(cid, name) for name in BLOCK_NAMES}
    # A body that falls asleep stops moving until touched; keep everything awake so motion never depends on that.
    for body in (robot, button, *blocks.values()):
        p.changeDynamics(body, -1, activationState=p.ACTIVATION_STATE_DISABLE_SLEEPING, physicsClientId=cid)
    return SceneIds(table=table, robot=robot, button=button, blocks=blocks)


def set_led_color(cid: int, button: int, on: bool) -> None:
    p.changeVisualShape(button, LED_LINK, rgbaColor=LED_ON_COLOR if on else LED_OFF_COLOR, physicsClientId=cid)


def static_camera_matrices() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(view, projection) of the fixed camera."""
    view = p.computeViewMatrix(STATIC_EYE, STATIC_TARGET, STATIC_UP)
    projection = p.computeProjectionMatrixFOV(STATIC_FOV, 1.0, STATIC_NEAR, STATIC_FAR)
    return view, projection


def gripper_camera_matrices(hand_pos: np.ndarray, hand_orn: tuple[float, ...]
                            ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(view, projection) of the camera mounted on the hand, from the hand link's world pose."""
    rot = np.array(p.getMatrixFromQuaternion(hand_orn)).reshape(3, 3)  # hand frame -> world
    eye = hand_pos + rot @ np.array(GRIPPER_EYE_IN_HAND)
    target = hand_pos + rot @ np.array(GRIPPER_TARGET_IN_HAND)
    up = rot @ np.array((1.0, 0.0, 0.0))  # image "up" points away from the robot
    view = p.computeViewMatrix(eye, target, up)
    projection = p.computeProjectionMatrixFOV(GRIPPER_FOV, 1.0, GRIPPER_NEAR, GRIPPER_FAR)
    return view, projection


def linearize_depth(z_buffer: np.ndarray, near: float, far: float) -> np.ndarray:
    """OpenGL z-buffer (0..1) -> distance along the view axis in metres, as calvin_env's cameras."""
    return (far * near / (far - (far - near) * z_buffer)).astype(np.float32)
