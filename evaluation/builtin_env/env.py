"""BuiltinEnv: the built-in pybullet scene behind calvin_env's interface (evaluation/interfaces.py EvalEnv).

    env = BuiltinEnv(seed=0)
    obs = env.reset(robot_obs, scene_obs)          # either may be None: home pose / a random layout
    obs, reward, done, info = env.step(action)     # action: (7,) relative, as calvin_env (see below)
    env.close()

Observation (calvin_env's keys):
    rgb_obs.rgb_static    uint8 (200, 200, 3)   fixed camera in front of the table
    rgb_obs.rgb_gripper   uint8 (84, 84, 3)     camera on the hand, looking along the fingers
    depth_obs.depth_static / depth_gripper  float32 (200, 200) / (84, 84), metres
    robot_obs  float64 (15,)  tcp pos (3), tcp Euler xyz (3), gripper opening width (1), 7 arm joints, gripper action
    scene_obs  float64 (24,)  CALVIN's layout (scene.py): [2] button joint, [5] LED 0/1, [6:24] red, blue, pink cube
                              (x, y, z, Euler xyz); [0] slider, [1] drawer, [3] switch, [4] lightbulb are always 0.
Action (calvin_env's "cartesian_rel"): x, y, z in units of 0.02 m, Euler x, y, z in units of 0.05 rad, both added to
an internal target pose that inverse kinematics follows; gripper > 0 opens, otherwise closes. Each step runs 8
physics steps of 1/240 s (30 Hz control), as CALVIN. Unlike calvin_env, the target position is kept inside a box
around the table (WORKSPACE_*) so that a wild policy cannot wind it up far out of reach.
Rendering uses pybullet's TinyRenderer (CPU, no OpenGL), so images are identical on every machine.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pybullet as p

from evaluation.builtin_env import scene as sc
from facts import ROBOT_OBS_DIM

PHYSICS_HZ = 240
CONTROL_HZ = 30
ACTION_REPEAT = PHYSICS_HZ // CONTROL_HZ  # physics steps per env step
MAX_REL_POS = 0.02  # metres per unit of relative action (calvin_env's max_rel_pos)
MAX_REL_ORN = 0.05  # radians per unit of relative action (calvin_env's max_rel_orn)
ARM_FORCE = 200.0  # N·m, position motors of the arm (calvin_env's max_joint_force)
ARM_MAX_VELOCITY = 2.0  # rad/s (calvin_env's max_velocity)
# pybullet's default position gain (0.1) leaves ~40 % of a step's motion for later steps, so the TCP trails the
# target by ~1 cm; 0.5 makes it follow within a few mm, so recorded TCP displacements replay the same motion.
ARM_POSITION_GAIN = 0.5
GRIPPER_CLOSE_FORCE = 40.0  # N per finger
GRIPPER_OPEN_FORCE = 10.0
GRIPPER_MAX_VELOCITY = 0.2  # m/s per finger (the URDF's limit)
WORKSPACE_LOW = (-0.55, -0.35, sc.TABLE_TOP_Z + 0.005)  # bounds of the target TCP position
WORKSPACE_HIGH = (0.55, 0.4, sc.TABLE_TOP_Z + 0.6)
ACTION_SIZE = 7
ROBOT_OBS_SIZE = ROBOT_OBS_DIM
_IK_LOWER = list(sc.ARM_LOWER) + [0.0, 0.0]  # IK works over the 9 movable joints (arm + fingers)
_IK_UPPER = list(sc.ARM_UPPER) + [sc.FINGER_OPEN, sc.FINGER_OPEN]
_IK_RANGE = [hi - lo for lo, hi in zip(_IK_LOWER, _IK_UPPER)]
_IK_REST = list(sc.HOME_JOINTS) + [sc.FINGER_OPEN, sc.FINGER_OPEN]


class BuiltinEnv:
    """The built-in scene; one pybullet DIRECT client per instance. Deterministic: the same reset arguments and
    actions give the same states and images, whatever ran before, because reset rebuilds the world from nothing
    (~30 ms): bullet keeps contact manifolds and broadphase pairs outside restoreState's snapshots, and a pair that
    survives from earlier steps changes the first contacts after a reset."""

    def __init__(self, seed: int = 0, render: bool = True) -> None:
        """seed: random layouts of reset(scene_obs=None). render=False skips both cameras (images and depth are
        zeros of the right shapes): for the expert's tests and for state-only use; nothing else changes."""
        self.render = render
        self._cid = p.connect(p.DIRECT)
        if self._cid < 0:
            raise RuntimeError("could not start a pybullet DIRECT client")
        self.ids = self._build_world()
        self._rng = np.random.default_rng(seed)  # random layouts for reset(scene_obs=None), as calvin_env's seed
        self._static_view, self._static_projection = sc.static_camera_matrices()
        self._target_pos = np.zeros(3)
        self._target_euler = np.zeros(3)
        self._gripper_action = 1
        self._led_on = False
        self._button_was_pressed = False
        self.reset()

    # ---- lifecycle ----
    def close(self) -> None:
        if self._cid >= 0:
            p.disconnect(physicsClientId=self._cid)
            self._cid = -1

    def __enter__(self) -> BuiltinEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- EvalEnv interface ----
    def reset(self, robot_obs: np.ndarray | None = None, scene_obs: np.ndarray | None = None) -> dict:
        """Puts robot and scene in the given state (calvin_env's semantics: robot joints, gripper width and action
        from robot_obs, the TCP entries are not read; scene from scene_obs) and returns the observation."""
        # Imported here: sequences.py imports this module's constants.
        from evaluation.builtin_env.sequences import random_scene_obs

        robot_obs = sc.HOME_ROBOT_OBS if robot_obs is None else _checked(robot_obs, ROBOT_OBS_SIZE, "robot_obs")
        scene_obs = (random_scene_obs(self._rng) if scene_obs is None
                     else _checked(scene_obs, sc.SCENE_OBS_SIZE, "scene_obs"))
        ids = self._build_world()
        if ids != self.ids:
            raise RuntimeError(f"rebuilding the scene gave other body ids: {ids} != {self.ids}")
        self._reset_robot(robot_obs)
        self._reset_scene(scene_obs)
        p.stepSimulation(physicsClientId=self._cid)  # as calvin_env
        # The step's collision pass ran before the teleported bodies' pairs existed; refresh the contacts so that the
        # first info already shows every cube resting on the table (the push and lift oracles need it).
        p.performCollisionDetection(physicsClientId=self._cid)
        return self.get_obs()

    def step(self, action: Any) -> tuple[dict, float, bool, dict]:
        """Applies one relative action (see the module docstring); returns (obs, 0.0, False, info) as calvin_env."""
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (ACTION_SIZE,) or not np.all(np.isfinite(action)):
            raise ValueError(f"action must be 7 finite numbers (x y z, Euler x y z, gripper), got {action}")
        self._target_pos = np.clip(self._target_pos + action[:3] * MAX_REL_POS, WORKSPACE_LOW, WORKSPACE_HIGH)
        self._target_euler = self._target_euler + action[3:6] * MAX_REL_ORN
        self._gripper_action = 1 if action[6] > 0 else -1
        self._command_arm(self._target_pos, self._target_euler)
        self._command_gripper(self._gripper_action)
        for _ in range(ACTION_REPEAT):
            p.stepSimulation(physicsClientId=self._cid)
        self._update_button()
        return self.get_obs(), 0.0, False, self.get_info()

    def get_obs(self) -> dict:
        if not self.render:
            return {"rgb_obs": {"rgb_static": np.zeros((sc.STATIC_SIZE, sc.STATIC_SIZE, 3), np.uint8),
                                "rgb_gripper": np.zeros((sc.GRIPPER_SIZE, sc.GRIPPER_SIZE, 3), np.uint8)},
                    "depth_obs": {"depth_static": np.zeros((sc.STATIC_SIZE, sc.STATIC_SIZE), np.float32),
                                  "depth_gripper": np.zeros((sc.GRIPPER_SIZE, sc.GRIPPER_SIZE), np.float32)},
                    "robot_obs": self.get_robot_obs(), "scene_obs": self.get_scene_obs()}
        rgb_static, depth_static = self._render(self._static_view, self._static_projection, sc.STATIC_SIZE,
                                                sc.STATIC_NEAR, sc.STATIC_FAR)
        hand_pos, hand_orn = p.getLinkState(self.ids.robot, sc.HAND_LINK, computeForwardKinematics=True,
                                            physicsClientId=self._cid)[4:6]
        view, projection = sc.gripper_camera_matrices(np.array(hand_pos), hand_orn)
        rgb_gripper, depth_gripper = self._render(view, projection, sc.GRIPPER_SIZE, sc.GRIPPER_NEAR,
                                                  sc.GRIPPER_FAR)
        return {
            "rgb_obs": {"rgb_static": rgb_static, "rgb_gripper": rgb_gripper},
            "depth_obs": {"depth_static": depth_static, "depth_gripper": depth_gripper},
            "robot_obs": self.get_robot_obs(),
            "scene_obs": self.get_scene_obs(),
        }

    def get_info(self) -> dict:
        """calvin_env's info layout: {'robot_info': {...}, 'scene_info': {...}}; contacts are pybullet's
        getContactPoints tuples (index 2 = other body, 4 = its link), as the oracle reads them."""
        cid = self._cid
        robot_obs = self.get_robot_obs()
        robot_info = {
            "tcp_pos": tuple(robot_obs[0:3]), "tcp_orn": tuple(robot_obs[3:6]),
            "gripper_opening_width": float(robot_obs[6]), "arm_joint_states": list(robot_obs[7:14]),
            "gripper_action": self._gripper_action, "uid": self.ids.robot,
            "contacts": p.getContactPoints(bodyA=self.ids.robot, physicsClientId=cid),
        }
        movable = {}
        for name, uid in self.ids.blocks.items():
            pos, orn = p.getBasePositionAndOrientation(uid, physicsClientId=cid)
            lin_vel, ang_vel = p.getBaseVelocity(uid, physicsClientId=cid)
            movable[name] = {"current_pos": pos, "current_orn": orn, "current_lin_vel": lin_vel,
                             "current_ang_vel": ang_vel, "uid": uid,
                             "contacts": p.getContactPoints(bodyA=uid, physicsClientId=cid)}
        scene_info = {
            "fixed_objects": {
                "table": {"uid": self.ids.table, "links": {sc.TABLE_LINK: -1}},
                "button": {"uid": self.ids.button, "links": {"base_link": -1, "cap_link": sc.BUTTON_CAP_LINK,
                                                             "led_link": sc.LED_LINK}},
            },
            "movable_objects": movable,
            "doors": {},
            "buttons": {"button": {"joint_state": self._button_joint(), "logical_state": int(self._led_on)}},
            "switches": {},
            "lights": {"led": {"logical_state": int(self._led_on)}},
        }
        return {"robot_info": robot_info, "scene_info": scene_info}

    # ---- state vectors ----
    def get_robot_obs(self) -> np.ndarray:
        """(15,) float64: tcp pos, tcp Euler, gripper opening width, 7 arm joints, gripper action."""
        cid, robot = self._cid, self.ids.robot
        tcp_pos, tcp_orn = p.getLinkState(robot, sc.TCP_LINK, computeForwardKinematics=True,
                                          physicsClientId=cid)[4:6]
        arm = [s[0] for s in p.getJointStates(robot, sc.ARM_JOINTS, physicsClientId=cid)]
        width = sum(s[0] for s in p.getJointStates(robot, sc.FINGER_JOINTS, physicsClientId=cid))
        return np.array([*tcp_pos, *p.getEulerFromQuaternion(tcp_orn), width, *arm, self._gripper_action],
                        dtype=np.float64)

    def get_scene_obs(self) -> np.ndarray:
        """(24,) float64 in CALVIN's layout (scene.py)."""
        scene_obs = np.zeros(sc.SCENE_OBS_SIZE, dtype=np.float64)
        scene_obs[sc.SCENE_OBS_BUTTON] = self._button_joint()
        scene_obs[sc.SCENE_OBS_LED] = float(self._led_on)
        for i, name in enumerate(sc.BLOCK_NAMES):
            pos, orn = p.getBasePositionAndOrientation(self.ids.blocks[name], physicsClientId=self._cid)
            scene_obs[sc.block_slice(i)] = (*pos, *p.getEulerFromQuaternion(orn))
        return scene_obs

    @property
    def target_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """(position, Euler) the controller is driving the TCP to: privileged state for the scripted expert."""
        return self._target_pos.copy(), self._target_euler.copy()

    # ---- internals ----
    def _build_world(self) -> sc.SceneIds:
        cid = self._cid
        p.resetSimulation(physicsClientId=cid)
        p.setPhysicsEngineParameter(deterministicOverlappingPairs=1, physicsClientId=cid)
        p.setTimeStep(1.0 / PHYSICS_HZ, physicsClientId=cid)
        p.setGravity(0.0, 0.0, -9.81, physicsClientId=cid)
        return sc.build_scene(cid)

    def _reset_robot(self, robot_obs: np.ndarray) -> None:
        cid, robot = self._cid, self.ids.robot
        joints = robot_obs[7:14]
        finger = float(np.clip(robot_obs[6] / 2, 0.0, sc.FINGER_OPEN))
        for joint, q in zip(sc.ARM_JOINTS, joints):
            p.resetJointState(robot, joint, q, 0.0, physicsClientId=cid)
        for joint in sc.FINGER_JOINTS:
            p.resetJointState(robot, joint, finger, 0.0, physicsClientId=cid)
        self._gripper_action = 1 if robot_obs[14] > 0 else -1
        tcp_pos, tcp_orn = p.getLinkState(robot, sc.TCP_LINK, computeForwardKinematics=True,
                                          physicsClientId=cid)[4:6]
        self._target_pos = np.array(tcp_pos, dtype=np.float64)
        self._target_euler = np.array(p.getEulerFromQuaternion(tcp_orn), dtype=np.float64)
        for joint, q in zip(sc.ARM_JOINTS, joints):
            p.setJointMotorControl2(robot, joint, p.POSITION_CONTROL, targetPosition=q, force=ARM_FORCE,
                                    maxVelocity=ARM_MAX_VELOCITY, positionGain=ARM_POSITION_GAIN,
                                    physicsClientId=cid)
        self._command_gripper(self._gripper_action)

    def _reset_scene(self, scene_obs: np.ndarray) -> None:
        cid = self._cid
        for i, name in enumerate(sc.BLOCK_NAMES):
            pose = scene_obs[sc.block_slice(i)]
            p.resetBasePositionAndOrientation(self.ids.blocks[name], pose[:3], p.getQuaternionFromEuler(pose[3:]),
                                              physicsClientId=cid)
            p.resetBaseVelocity(self.ids.blocks[name], (0, 0, 0), (0, 0, 0), physicsClientId=cid)
        button_q = float(np.clip(scene_obs[sc.SCENE_OBS_BUTTON], 0.0, sc.BUTTON_TRAVEL))
        p.resetJointState(self.ids.button, sc.BUTTON_CAP_LINK, button_q, 0.0, physicsClientId=cid)
        p.setJointMotorControl2(self.ids.button, sc.BUTTON_CAP_LINK, p.POSITION_CONTROL, targetPosition=0.0,
                                force=sc.BUTTON_SPRING_FORCE, physicsClientId=cid)
        # The button's logical state follows its LED after a reset (calvin_env after the mees/calvin#32 fix).
        self._led_on = bool(scene_obs[sc.SCENE_OBS_LED] > 0.5)
        sc.set_led_color(cid, self.ids.button, self._led_on)
        self._button_was_pressed = self._button_joint() > sc.BUTTON_THRESHOLD

    def _command_arm(self, pos: np.ndarray, euler: np.ndarray) -> None:
        cid, robot = self._cid, self.ids.robot
        joints = p.calculateInverseKinematics(robot, sc.TCP_LINK, pos, p.getQuaternionFromEuler(euler),
                                              lowerLimits=_IK_LOWER, upperLimits=_IK_UPPER,
                                              jointRanges=_IK_RANGE, restPoses=_IK_REST, physicsClientId=cid)
        joints = np.clip(joints[:len(sc.ARM_JOINTS)], sc.ARM_LOWER, sc.ARM_UPPER)
        for joint, q in zip(sc.ARM_JOINTS, joints):
            p.setJointMotorControl2(robot, joint, p.POSITION_CONTROL, targetPosition=q, force=ARM_FORCE,
                                    maxVelocity=ARM_MAX_VELOCITY, positionGain=ARM_POSITION_GAIN,
                                    physicsClientId=cid)

    def _command_gripper(self, gripper_action: int) -> None:
        target, force = (sc.FINGER_OPEN, GRIPPER_OPEN_FORCE) if gripper_action > 0 else (0.0, GRIPPER_CLOSE_FORCE)
        for joint in sc.FINGER_JOINTS:
            p.setJointMotorControl2(self.ids.robot, joint, p.POSITION_CONTROL, targetPosition=target, force=force,
                                    maxVelocity=GRIPPER_MAX_VELOCITY, physicsClientId=self._cid)

    def _button_joint(self) -> float:
        return float(p.getJointState(self.ids.button, sc.BUTTON_CAP_LINK, physicsClientId=self._cid)[0])

    def _update_button(self) -> None:
        """A press (the cap crossing half its travel downwards) toggles the LED, as calvin_env's Button."""
        pressed = self._button_joint() > sc.BUTTON_THRESHOLD
        if pressed and not self._button_was_pressed:
            self._led_on = not self._led_on
            sc.set_led_color(self._cid, self.ids.button, self._led_on)
        self._button_was_pressed = pressed

    def _render(self, view: tuple, projection: tuple, size: int, near: float, far: float
                ) -> tuple[np.ndarray, np.ndarray]:
        """(rgb uint8 (size, size, 3), depth float32 (size, size) in metres) from TinyRenderer."""
        _, _, rgba, z_buffer, _ = p.getCameraImage(
            size, size, view, projection, renderer=p.ER_TINY_RENDERER, flags=p.ER_NO_SEGMENTATION_MASK, shadow=0,
            lightDirection=sc.LIGHT_DIRECTION, lightAmbientCoeff=sc.LIGHT_AMBIENT,
            lightDiffuseCoeff=sc.LIGHT_DIFFUSE, lightSpecularCoeff=sc.LIGHT_SPECULAR, physicsClientId=self._cid)
        rgb = np.ascontiguousarray(np.reshape(rgba, (size, size, 4))[:, :, :3], dtype=np.uint8)
        depth = sc.linearize_depth(np.reshape(z_buffer, (size, size)), near, far)
        return rgb, depth


def _checked(vector: Any, size: int, name: str) -> np.ndarray:
    array = np.asarray(vector, dtype=np.float64).reshape(-1)
    if array.shape != (size,) or not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be {size} finite numbers, got shape {array.shape}")
    return array
