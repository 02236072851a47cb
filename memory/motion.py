"""The camera's next pose from its last motion and the actions: where to render the cache *before*
a frame is generated.

In Doom a turn's yaw follows the action and a walk's speed follows the player's momentum: thrust
from the keys, friction every tic. :class:`MotionModel` is the linear model of that, fitted by
least squares to recorded poses and actions: the motion of step t (forward, right, up in the
camera frame of pose t, yaw and pitch change; :func:`~worldgen.memory.camera.relative_pose`)
from the momentum (step t - 1's motion, seen from pose t: :func:`momentum`) and the actions t
and t - 1 (the previous action for key-turn acceleration and the engine's one-tic lag). Walls
stop a walk and the model cannot see them: a model that generates frames can correct the pose
from the frame afterwards.

Actions are plain vectors here (``worldgen.actions.to_vector``: 8 keys then yaw, pitch degrees).

Example:
    >>> pose = torch.tensor([[0.0, 0, 41, 0, 0], [10, 0, 41, 0, 0], [20, 0, 41, 5, 0], [30, 0, 41, 10, 0]])
    >>> acts = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0, 5, 0]]).repeat(4, 1)   # forward + 5 degrees a step
    >>> model = MotionModel.fit([pose], [acts], ridge=1e-3)
    >>> model.predict(pose[2:3], momentum(pose[1:3]), acts[2:3], acts[1:2]).shape
    torch.Size([1, 5])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .camera import Camera, relative_pose

DRIFT_HORIZONS = (1, 16, 64, 256)  # steps after which pose_error reports the drift


def motion(pose: torch.Tensor) -> torch.Tensor:
    """Per-step motions ``(N - 1, 5)`` of a pose sequence ``(N, 5)`` (relative_pose of neighbours)."""
    return relative_pose(pose[:-1].float(), pose[1:].float())


def momentum(pose: torch.Tensor) -> torch.Tensor:
    """The last step's motion ``(N - 1, 5)`` as seen from where it ended: the displacement from
    pose t - 1 to pose t in the camera frame of pose t (the player's momentum keeps its world
    direction while the camera turns), then the yaw and pitch changes."""
    pose = pose.float()
    step = motion(pose)
    eye = pose[1:, None, :3]
    moved = Camera.world_to_camera(eye + (pose[1:, :3] - pose[:-1, :3])[:, None], pose[1:])[:, 0]
    return torch.cat([moved, step[:, 3:]], -1)


def compose(pose: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Pose ``(..., 5)`` moved by a motion ``(..., 5)`` given in its own camera frame."""
    axes = Camera.axes(pose)  # (..., 3, 3) forward, right, up
    xyz = pose[..., :3].float() + (step[..., :3, None] * axes).sum(-2)
    yaw = torch.remainder(pose[..., 3] + step[..., 3], 360.0)
    return torch.cat([xyz, yaw[..., None], (pose[..., 4] + step[..., 4])[..., None]], -1)


@dataclass
class MotionModel:
    """``motion_t = [momentum_t, action_t, action_{t-1}, 1] @ weight``."""

    weight: torch.Tensor  # (5 + 2A + 1, 5)

    @staticmethod
    def features(last_motion: torch.Tensor, action: torch.Tensor, last_action: torch.Tensor) -> torch.Tensor:
        one = torch.ones_like(last_motion[..., :1])
        return torch.cat([last_motion.float(), action.float(), last_action.float(), one], -1)

    @classmethod
    def fit(cls, poses: list[torch.Tensor], actions: list[torch.Tensor], ridge: float = 1e-2) -> MotionModel:
        """Least squares (with a small ridge) over episodes: ``poses[e] (N, 5)``, ``actions[e] (N, A)``
        where ``actions[e][t]`` moved the camera from ``poses[e][t]`` to ``poses[e][t + 1]``."""
        xs, ys = [], []
        for pose, act in zip(poses, actions):
            if len(pose) != len(act) or len(pose) < 3:
                raise ValueError(f"need poses and actions of one length >= 3 per episode, got {len(pose)}, {len(act)}")
            m = motion(pose)  # (N - 1, 5): m[t] from pose t to t + 1
            xs.append(cls.features(momentum(pose)[:-1], act[1:-1], act[:-2]))  # predict m[t] for t >= 1
            ys.append(m[1:])
        x, y = torch.cat(xs).double(), torch.cat(ys).double()
        gram = x.T @ x + ridge * torch.eye(x.shape[1], dtype=x.dtype)
        return cls(torch.linalg.solve(gram, x.T @ y).float())

    def predict_motion(
        self, last_motion: torch.Tensor, action: torch.Tensor, last_action: torch.Tensor
    ) -> torch.Tensor:
        return self.features(last_motion, action, last_action) @ self.weight

    def predict(
        self, pose: torch.Tensor, last_motion: torch.Tensor, action: torch.Tensor, last_action: torch.Tensor
    ) -> torch.Tensor:
        """The next pose ``(..., 5)`` from the pose, its :func:`momentum` and the actions."""
        return compose(pose, self.predict_motion(last_motion, action, last_action))

    def to(self, device: torch.device | str) -> MotionModel:
        """The model on ``device`` (a fit or a loaded one lives on the CPU; sessions may not)."""
        return MotionModel(self.weight.to(device))

    def to_dict(self) -> dict:
        return {"weight": self.weight.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> MotionModel:
        return cls(torch.tensor(d["weight"], dtype=torch.float32))


def pose_error(made: torch.Tensor, true: torch.Tensor, before: torch.Tensor) -> dict:
    """How far a session's camera poses ``made (B, T, 5)`` are from the true ones ``true (B, T, 5)``
    (the game replaying the same actions), both following the true pose ``before (B, 5)``: the
    drift after each of :data:`DRIFT_HORIZONS` steps (mean position error in world units, yaw
    error in degrees) and the per-step error (each step's motion against the true one's)."""
    made, true, before = made.float(), true.float(), before.float()
    pos = (made[..., :3] - true[..., :3]).norm(dim=-1)  # (B, T)
    yaw = (torch.remainder(made[..., 3] - true[..., 3] + 180, 360) - 180).abs()
    step_made = relative_pose(torch.cat([before[:, None], made[:, :-1]], 1), made)
    step_true = relative_pose(torch.cat([before[:, None], true[:, :-1]], 1), true)
    out = {
        f"@{h}": {"position": round(float(pos[:, h - 1].mean()), 2), "yaw_deg": round(float(yaw[:, h - 1].mean()), 3)}
        for h in DRIFT_HORIZONS
        if h <= made.shape[1]
    }
    out["per_step"] = {
        "position": round(float((step_made[..., :3] - step_true[..., :3]).norm(dim=-1).mean()), 3),
        "yaw_deg": round(float((step_made[..., 3] - step_true[..., 3]).abs().mean()), 4),
    }
    return out
