"""MuJoCo continuous control: dm_control suite tasks, our own 3-link arm, and their scripted experts.

Every task records proprioception (the suite's observation keys, float32) and a 64x64 RGB frame
rendered headless (``MUJOCO_GL=egl`` unless set; shadows and reflections off, ~4 ms a frame on
one CPU core). Experts use the simulator state, as scripted experts do:

- point mass: PD on the target position.
- reacher, 3-link arm: damped least-squares inverse kinematics of the fingertip + joint damping.
- cartpole balance: LQR on the linearization about upright (finite differences of ``mj_step``).
- cartpole / pendulum swing-up: energy pumping (Astrom-Furuta) until near upright, then LQR.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gato_like.data_pipelines.episodes import Episode
from gato_like.envs.base import Actor, Perturbation
from gato_like.tokenizers.spec import EmbodimentSpec

os.environ.setdefault("MUJOCO_GL", "egl")

IMAGE_SIZE = 64
#: What ``data generate`` uses unless told otherwise: sigma 0.3 recovered cartpole balance from
#: 525 to ~1000 with a ``debug`` model where clean data did not (issue 12's measurements).
DEFAULT_PERTURBATION = Perturbation(noise=0.3, random_prob=0.1)

# --------------------------------------------------------------------------------------------------
# our own body: a planar 3-link arm reaching a random target (kept out of pretraining)

ARM3_XML = """
<mujoco model="arm3">
  <option timestep="0.02" integrator="RK4"/>
  <default>
    <joint type="hinge" axis="0 0 1" damping="0.01" armature="0.002"/>
    <geom type="capsule" size=".012" rgba=".7 .5 .3 1" contype="0" conaffinity="0"/>
    <motor gear="0.05" ctrlrange="-1 1" ctrllimited="true"/>
  </default>
  <visual><global offwidth="256" offheight="256"/></visual>
  <asset>
    <texture name="grid" type="2d" builtin="checker" rgb1=".1 .2 .3" rgb2=".2 .3 .4" width="50" height="50"/>
    <material name="grid" texture="grid" texrepeat="4 4" texuniform="false"/>
  </asset>
  <worldbody>
    <light pos="0 0 1"/>
    <camera name="top" pos="0 0 .75" quat="1 0 0 0"/>
    <geom name="ground" type="plane" pos="0 0 -.02" size=".35 .35 .01" material="grid"/>
    <geom name="root" type="cylinder" fromto="0 0 0 0 0 0.02" size=".02" rgba=".3 .3 .3 1"/>
    <body name="link1" pos="0 0 .01">
      <joint name="j1"/>
      <geom fromto="0 0 0 .09 0 0"/>
      <body name="link2" pos=".09 0 0">
        <joint name="j2" range="-160 160" limited="true"/>
        <geom fromto="0 0 0 .08 0 0" rgba=".5 .6 .3 1"/>
        <body name="link3" pos=".08 0 0">
          <joint name="j3" range="-160 160" limited="true"/>
          <geom fromto="0 0 0 .06 0 0" rgba=".3 .5 .7 1"/>
          <geom name="finger" type="sphere" pos=".06 0 0" size=".016" rgba=".9 .9 .9 1"/>
        </body>
      </body>
    </body>
    <body name="target" mocap="true" pos=".1 .1 .01">
      <geom name="target" type="sphere" size=".025" rgba=".9 .2 .2 .8"/>
    </body>
  </worldbody>
  <actuator>
    <motor name="m1" joint="j1"/>
    <motor name="m2" joint="j2"/>
    <motor name="m3" joint="j3"/>
  </actuator>
</mujoco>
"""


def _arm3_environment(seed: int) -> Any:
    """A dm_control Environment for the 3-link arm (reward 1 inside the target, smooth outside)."""
    from dm_control import mujoco as dm_mujoco
    from dm_control.rl import control
    from dm_control.suite import base
    from dm_control.utils import rewards

    class Arm3Reach(base.Task):
        def initialize_episode(self, physics: Any) -> None:
            physics.data.qpos[:] = self.random.uniform([-np.pi, -2.0, -2.0], [np.pi, 2.0, 2.0])
            angle, radius = self.random.uniform(0, 2 * np.pi), self.random.uniform(0.06, 0.21)
            physics.named.data.mocap_pos["target"] = [radius * np.cos(angle), radius * np.sin(angle), 0.01]
            super().initialize_episode(physics)

        def get_observation(self, physics: Any) -> dict[str, np.ndarray]:
            to_target = (
                physics.named.data.geom_xpos["target"][:2] - physics.named.data.geom_xpos["finger"][:2]
            )
            return {
                "position": physics.data.qpos.copy(),
                "to_target": to_target,
                "velocity": physics.data.qvel.copy(),
            }

        def get_reward(self, physics: Any) -> float:
            distance = np.linalg.norm(
                physics.named.data.geom_xpos["target"][:2] - physics.named.data.geom_xpos["finger"][:2]
            )
            return float(rewards.tolerance(distance, bounds=(0, 0.025), margin=0.0))

    physics = dm_mujoco.Physics.from_xml_string(ARM3_XML)
    return control.Environment(physics, Arm3Reach(random=seed), time_limit=20.0)


# --------------------------------------------------------------------------------------------------
# experts


def _wrap(angle: float) -> float:
    return float((angle + np.pi) % (2 * np.pi) - np.pi)


def lqr_gain(physics: Any, qpos0: np.ndarray, q: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Discrete LQR gain K (u = -K [qpos - qpos0, qvel]) from central finite differences of one
    ``mj_step`` about (qpos0, qvel = 0, ctrl = 0); works with any integrator (RK4 included)."""
    import mujoco
    import scipy.linalg

    model = physics.model.ptr
    data = mujoco.MjData(model)
    nv, nu = model.nv, model.nu

    def step(x: np.ndarray, u: np.ndarray) -> np.ndarray:
        data.qpos[:], data.qvel[:], data.ctrl[:], data.time = x[:nv], x[nv:], u, 0.0
        mujoco.mj_step(model, data)
        return np.concatenate([data.qpos, data.qvel])

    x0, u0, eps = np.concatenate([qpos0, np.zeros(nv)]), np.zeros(nu), 1e-6
    a = np.stack(
        [(step(x0 + eps * e, u0) - step(x0 - eps * e, u0)) / (2 * eps) for e in np.eye(2 * nv)], axis=1
    )
    b = np.stack([(step(x0, eps * e) - step(x0, -eps * e)) / (2 * eps) for e in np.eye(nu)], axis=1)
    p = scipy.linalg.solve_discrete_are(a, b, q, r)
    return np.linalg.solve(r + b.T @ p @ b, b.T @ p @ a)


def _pole_energy_terms(physics: Any, body: str, joint: str) -> tuple[float, float]:
    """(inertia about the hinge, m g l of the pole) read from the model."""
    import mujoco

    model = physics.model.ptr
    data = mujoco.MjData(model)
    mujoco.mj_forward(model, data)
    inertia = np.zeros((model.nv, model.nv))
    mujoco.mj_fullM(model, data, inertia)
    dof = model.jnt_dofadr[model.joint(joint).id]
    body_id = model.body(body).id
    height = abs(data.xipos[body_id, 2] - data.xanchor[model.joint(joint).id, 2])
    mgl = float(model.body_mass[body_id] * -model.opt.gravity[2] * height)
    return float(inertia[dof, dof]), mgl


class CartpoleExpert:
    """LQR about upright; energy-pumping swing-up far from it."""

    def __init__(self, physics: Any) -> None:
        self.gain = lqr_gain(physics, np.zeros(2), np.diag([1.0, 10.0, 1.0, 1.0]), np.eye(1) * 0.1)
        self.inertia, self.mgl = _pole_energy_terms(physics, "pole_1", "hinge_1")

    def __call__(self, physics: Any) -> np.ndarray:
        x, theta = physics.data.qpos
        x_dot, theta_dot = physics.data.qvel
        theta = _wrap(theta)
        if np.cos(theta) > 0.85:
            u = -self.gain @ np.array([x, theta, x_dot, theta_dot])
        else:
            energy = 0.5 * self.inertia * theta_dot**2 + self.mgl * (np.cos(theta) - 1.0)
            direction = np.sign(theta_dot * np.cos(theta)) or 1.0
            u = np.array([10.0 * energy * direction - 0.5 * x - 0.5 * x_dot])
        return np.clip(u, -1.0, 1.0)


class PendulumExpert:
    """Energy pumping with the limited torque, LQR near upright."""

    def __init__(self, physics: Any) -> None:
        self.gain = lqr_gain(physics, np.zeros(1), np.diag([10.0, 1.0]), np.eye(1))
        self.inertia, self.mgl = _pole_energy_terms(physics, "pole", "hinge")

    def energy(self, theta: float, theta_dot: float) -> float:
        """The pole's energy relative to upright: 0 at rest there, ``-2 mgl`` at rest below."""
        return 0.5 * self.inertia * theta_dot**2 + self.mgl * (np.cos(theta) - 1.0)

    def __call__(self, physics: Any) -> np.ndarray:
        theta, theta_dot = _wrap(physics.data.qpos[0]), float(physics.data.qvel[0])
        if np.cos(theta) > 0.95:
            return np.clip(-self.gain @ np.array([theta, theta_dot]), -1.0, 1.0)
        energy = self.energy(theta, theta_dot)
        return np.clip(np.array([-5.0 * energy * (np.sign(theta_dot) or 1.0)]), -1.0, 1.0)


class PointMassExpert:
    """PD on the target position."""

    def __init__(self, physics: Any) -> None:
        del physics

    def target(self, physics: Any) -> np.ndarray:
        """Where to drive the point mass (x, y): the task's target."""
        return physics.named.data.geom_xpos["target"][:2]

    def __call__(self, physics: Any) -> np.ndarray:
        position = physics.named.data.geom_xpos["pointmass"][:2]
        return np.clip(50.0 * (self.target(physics) - position) - 5.0 * physics.data.qvel, -1.0, 1.0)


class ReachExpert:
    """Damped least-squares IK step of the fingertip towards the target, as a joint PD command.

    Gains: velocity damping above ~0.5 is unstable at the reacher's control step (the torque's
    sign flipped on 97 % of steps at the target with kp 20, kd 1); kp 5, kd 0.3 reaches as well
    (975 vs 974 mean return) with 1 % sign flips, a target a cloned policy can follow."""

    KP, KD = 5.0, 0.3
    #: Damping of the least-squares step (m^2).
    DAMPING = 1e-4

    def __init__(self, physics: Any) -> None:
        del physics

    def target(self, physics: Any) -> np.ndarray:
        """Where to drive the fingertip (x, y): the task's target."""
        return physics.named.data.geom_xpos["target"][:2]

    def __call__(self, physics: Any) -> np.ndarray:
        import mujoco

        model, data = physics.model.ptr, physics.data.ptr
        error = self.target(physics) - physics.named.data.geom_xpos["finger"][:2]
        jacobian = np.zeros((3, model.nv))
        mujoco.mj_jacGeom(model, data, jacobian, None, model.geom("finger").id)
        j = jacobian[:2]
        dq = j.T @ np.linalg.solve(j @ j.T + self.DAMPING * np.eye(2), error)
        return np.clip(self.KP * dq - self.KD * physics.data.qvel, -1.0, 1.0)


class Arm3ReachExpert(ReachExpert):
    """The reach step with damping 1e-2 for the redundant 3-link arm. With 1e-4 the step blows up
    near singular poses and the expert is bang-bang (23 % of clean actions saturated): a 2-layer
    MLP cloned from 10 of its demos scored 0.04, against 0.31 with 1e-2, which also reaches more
    (time inside the target 0.81 vs 0.75 of the episode, 10 seeds, 250 steps)."""

    DAMPING = 1e-2


class GoalPointMassExpert(PointMassExpert):
    """The point-mass PD step towards a goal position instead of the task's target."""

    def __init__(self, physics: Any, goal: np.ndarray) -> None:
        super().__init__(physics)
        self.goal = np.asarray(goal, np.float64)

    def target(self, physics: Any) -> np.ndarray:
        return self.goal


class GoalReachExpert(ReachExpert):
    """The reacher's least-squares step towards a goal fingertip position instead of the target."""

    def __init__(self, physics: Any, goal: np.ndarray) -> None:
        super().__init__(physics)
        self.goal = np.asarray(goal, np.float64)

    def target(self, physics: Any) -> np.ndarray:
        return self.goal


@dataclass(frozen=True)
class GoalSpec:
    """A goal-reaching variant of a task: every episode draws a goal position for the body, the
    expert drives the body there (not to the task's target, which the observation may still show),
    and the reward is 1 while the body is within ``radius`` of the goal. Its episodes give the goal
    head goals that are not the task's own target; the final observation is the goal state."""

    body: str
    """Geom whose x-y position must reach the goal."""
    radius: float
    """Success radius (m): the task's own (point mass: the target's size; reacher: target + finger)."""
    low: float
    high: float
    """Point mass: each coordinate uniform in [low, high]; reacher: the goal's distance from the
    shoulder, uniform in [low, high], at a uniform angle (as dm_control draws the target)."""
    polar: bool = False
    expert: Callable[[Any, np.ndarray], Callable[[Any], np.ndarray]] | None = None

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        if self.polar:
            angle, radius = rng.uniform(0.0, 2 * np.pi), rng.uniform(self.low, self.high)
            return np.array([radius * np.cos(angle), radius * np.sin(angle)])
        return rng.uniform(self.low, self.high, 2)

    def reached(self, physics: Any, goal: np.ndarray) -> bool:
        return bool(np.linalg.norm(physics.named.data.geom_xpos[self.body][:2] - goal) <= self.radius)


# --------------------------------------------------------------------------------------------------
# tasks


@dataclass
class ControlTask:
    """A MuJoCo control task with proprioception, pixels and a scripted expert."""

    name: str
    domain: str
    task: str
    proprio: dict[str, int]
    action_size: int
    expert: Callable[[Any], Callable[[Any], np.ndarray]]
    instruction: str
    control_hz: float
    max_steps: int = 1000
    description: str = ""
    goals: GoalSpec | None = None
    """A goal-reaching variant (see :class:`GoalSpec`); None: the task's own target."""
    _envs: dict[int, Any] = field(default_factory=dict, repr=False)

    @property
    def spec(self) -> EmbodimentSpec:
        observations: dict[str, Any] = {k: {"kind": "proprio", "shape": [n]} for k, n in self.proprio.items()}
        observations["pixels"] = {"kind": "image", "shape": [IMAGE_SIZE, IMAGE_SIZE, 3]}
        return EmbodimentSpec.from_dict(
            {
                "name": self.embodiment,
                "description": self.description,
                "control_hz": self.control_hz,
                "observations": observations,
                "action": {"kind": "continuous", "shape": [self.action_size], "low": -1.0, "high": 1.0},
            }
        )

    @property
    def embodiment(self) -> str:
        return f"{self.domain}" if self.domain != "arm3" else "arm3"

    def _environment(self, seed: int) -> Any:
        # one environment (and one renderer) per process and task: reseed it for every episode
        env = self._envs.get(os.getpid())
        if env is None:
            if self.domain == "arm3":
                env = _arm3_environment(seed)
            else:
                from dm_control import suite

                env = suite.load(self.domain, self.task, task_kwargs={"random": seed})
            self._envs.clear()
            self._envs[os.getpid()] = env
        env.task.random.seed(seed)
        return env

    def goal(self, seed: int) -> np.ndarray:
        """The goal position of episode ``seed`` (goal-reaching variants only)."""
        if self.goals is None:
            raise ValueError(f"{self.name} has no goals; its goal-reaching variants are {GOAL_TASK_NAMES}")
        return self.goals.draw(np.random.default_rng([seed, 5]))

    def rollout(
        self,
        seed: int,
        policy: str | Actor = "expert",
        render: bool = True,
        max_steps: int | None = None,
        perturbation: Perturbation | None = None,
        record: bool = False,
        expert_labels: bool = False,
    ) -> Episode:
        """One episode from ``seed``: ``policy`` is ``expert``, ``random`` (uniform actions) or a
        callable from the observation ``{key: array}`` to the action (e.g. ``Policy.act``).
        ``render`` or ``record``: the camera's 64x64 frames in ``observations["pixels"]``.

        ``perturbation`` (expert only): execute a perturbed action, record the expert's clean one
        (``actions``); the rewards are those of the executed actions.

        ``expert_labels`` (a callable ``policy`` only): the policy acts and the expert labels
        (DAgger): ``actions`` are the expert's at the states the policy visits, ``executed_actions``
        the policy's, the rewards the policy's."""
        env = self._environment(seed)
        timestep = env.reset()
        goal = None if self.goals is None else self.goal(seed)
        if expert_labels and not callable(policy):
            raise ValueError(
                f"expert_labels: the expert labels a callable policy's states, got policy {policy!r}"
            )
        expert = None
        if policy == "expert" or expert_labels:
            expert = self.expert(env.physics) if goal is None else self.goals.expert(env.physics, goal)  # type: ignore[union-attr,misc]
        rng = np.random.default_rng([seed, 1])
        perturb = (
            perturbation
            if (perturbation is not None and perturbation.active and expert is not None)
            else None
        )
        noise_rng = np.random.default_rng([seed, 3])
        held, push = 0, np.zeros(self.action_size)
        render = render or record
        renderer = _renderer(self.name, env.physics) if render else None
        steps = max_steps or self.max_steps
        observations: dict[str, list[np.ndarray]] = {
            k: [] for k in [*self.proprio, *(["pixels"] if render else [])]
        }
        actions, rewards, executed_actions = [], [], []
        for _ in range(steps):
            for key in self.proprio:
                observations[key].append(np.asarray(timestep.observation[key], dtype=np.float32).reshape(-1))
            if renderer is not None:
                renderer.update_scene(env.physics.data.ptr, camera=0)
                observations["pixels"].append(renderer.render().copy())
            if callable(policy):
                action = policy({k: v[-1] for k, v in observations.items()})
            elif expert is not None:
                action = expert(env.physics)
            else:
                action = rng.uniform(-1.0, 1.0, self.action_size)
            action = np.asarray(action, dtype=np.float32).reshape(self.action_size)
            executed: np.ndarray = action
            if expert_labels:  # the policy's action executes, the expert's is the label
                assert expert is not None
                action = np.asarray(expert(env.physics), dtype=np.float32).reshape(self.action_size)
            actions.append(action)
            if perturb is not None:
                if held == 0 and noise_rng.random() < perturb.random_prob:
                    held = int(noise_rng.integers(1, perturb.hold + 1))
                    push = noise_rng.uniform(-1.0, 1.0, self.action_size)
                if held > 0:
                    executed, held = push, held - 1
                else:
                    executed = executed + perturb.noise * noise_rng.standard_normal(self.action_size)
                executed = np.clip(executed, -1.0, 1.0).astype(np.float32)
            executed_actions.append(executed)
            timestep = env.step(executed)
            if goal is not None:
                rewards.append(float(self.goals.reached(env.physics, goal)))  # type: ignore[union-attr]
            else:
                rewards.append(float(timestep.reward or 0.0))
            if timestep.last():
                break
        return Episode(
            task=self.name,
            embodiment=self.embodiment,
            observations={k: np.stack(v) for k, v in observations.items()},
            actions=np.stack(actions),
            rewards=np.asarray(rewards, dtype=np.float32),
            instruction=self.instruction,
            success=bool(rewards[-1] > 0.5),
            source=f"{policy if isinstance(policy, str) else 'learned'} policy in {'dm_control' if self.domain != 'arm3' else 'mujoco'} ({self.domain}/{self.task})"
            + (f", DART noise {perturb.noise} random {perturb.random_prob}" if perturb else ""),
            seed=seed,
            executed_actions=np.stack(executed_actions) if perturb is not None or expert_labels else None,
        )


_RENDERERS: dict[str, Any] = {}


def _renderer(name: str, physics: Any) -> Any:
    """A 64x64 offscreen renderer per task and process, shadows and reflections off."""
    import mujoco

    renderer = _RENDERERS.get(name)
    if renderer is None or renderer.model is not physics.model.ptr:
        renderer = mujoco.Renderer(physics.model.ptr, IMAGE_SIZE, IMAGE_SIZE)
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        if not _RENDERERS:
            # registered after mujoco's EGL module, so it runs before the display is terminated
            atexit.register(close_renderers)
        _RENDERERS[name] = renderer
    return renderer


def close_renderers() -> None:
    """Free the offscreen GL contexts of this process."""
    for renderer in _RENDERERS.values():
        renderer.close()
    _RENDERERS.clear()


CONTROL_TASKS = [
    ControlTask("dmc-point_mass-easy", "point_mass", "easy", {"position": 2, "velocity": 2}, 2, PointMassExpert,
                "move the point mass to the target", 50.0, description="dm_control point mass: 2-d position and velocity; force in x and y"),
    ControlTask("dmc-reacher-easy", "reacher", "easy", {"position": 2, "to_target": 2, "velocity": 2}, 2, ReachExpert,
                "move the fingertip to the target", 50.0, description="dm_control 2-link reacher: joint angles, fingertip-to-target vector, joint velocities; joint torques"),
    ControlTask("dmc-cartpole-balance", "cartpole", "balance", {"position": 3, "velocity": 2}, 1, CartpoleExpert,
                "balance the pole on the cart", 100.0, description="dm_control cartpole: cart position, pole angle (cos, sin), velocities; force on the cart"),
    ControlTask("dmc-cartpole-swingup", "cartpole", "swingup", {"position": 3, "velocity": 2}, 1, CartpoleExpert,
                "swing up the pole and balance it", 100.0, description="dm_control cartpole: cart position, pole angle (cos, sin), velocities; force on the cart"),
    ControlTask("dmc-pendulum-swingup", "pendulum", "swingup", {"orientation": 2, "velocity": 1}, 1, PendulumExpert,
                "swing the pendulum up and hold it upright", 50.0, description="dm_control pendulum: pole orientation (cos, sin) and angular velocity; limited torque"),
    ControlTask("arm3-reach", "arm3", "reach", {"position": 3, "to_target": 2, "velocity": 3}, 3, Arm3ReachExpert,
                "reach the goal with the three link arm", 50.0, description="planar 3-link arm (our MJCF): joint angles, fingertip-to-target vector, joint velocities; joint torques"),
]  # fmt: skip

#: Goal-reaching variants of point mass and reacher (same bodies and specs; never in a default
#: suite): the goal is a random position, not the task's target.
GOAL_TASKS = [
    ControlTask("dmc-point_mass-goals", "point_mass", "easy", {"position": 2, "velocity": 2}, 2, PointMassExpert,
                "move the point mass to the goal", 50.0, max_steps=250, description=CONTROL_TASKS[0].description,
                goals=GoalSpec("pointmass", 0.015, -0.2, 0.2, expert=GoalPointMassExpert)),
    ControlTask("dmc-reacher-goals", "reacher", "easy", {"position": 2, "to_target": 2, "velocity": 2}, 2, ReachExpert,
                "move the fingertip to the goal", 50.0, max_steps=150, description=CONTROL_TASKS[1].description,
                goals=GoalSpec("finger", 0.06, 0.05, 0.2, polar=True, expert=GoalReachExpert)),
]  # fmt: skip
GOAL_TASK_NAMES = tuple(t.name for t in GOAL_TASKS)
