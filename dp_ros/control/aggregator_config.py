"""The observation aggregator's settings, in one place for the node and the bag readers.

obs_aggregator builds it from its ROS parameters; the dataset builder and eval-bag build
it from the same parameter file's ``obs_aggregator`` section, so recorded data is aligned
exactly as the live node aligns it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from dp_ros.control.observation import ObservationSpec, validate_camera_name
from dp_ros.control.window import TickGrid

# defaults of obs_aggregator's parameters (the node declares these)
DEFAULTS: dict[str, Any] = {
    "camera_names": [], "camera_topics": [], "compressed": [], "camera_height": 96,
    "camera_width": 96, "joint_states_topic": "/joint_states", "state_joint_names": [],
    "rate_hz": 10.0, "T_o": 2, "camera_staleness": 0.1, "state_staleness": 0.05,
    "stamp_future_tolerance": 0.5, "tick_delay": 0.0, "diagnostics_period": 1.0,
}


@dataclass(frozen=True)
class AggregatorConfig:
    camera_names: tuple[str, ...]
    camera_topics: tuple[str, ...]
    compressed: tuple[bool, ...]
    camera_height: int
    camera_width: int
    joint_states_topic: str
    state_joint_names: tuple[str, ...]
    rate_hz: float
    T_o: int
    camera_staleness: float
    state_staleness: float
    stamp_future_tolerance: float
    tick_delay: float
    diagnostics_period: float

    @classmethod
    def from_parameters(cls, params: Mapping[str, Any]) -> "AggregatorConfig":
        """Validated config from a parameter mapping (unknown keys ignored, missing ones
        defaulted); ValueError naming the parameter otherwise. An empty ``compressed``
        means: detect by a topic ending in "/compressed"."""
        values = dict(DEFAULTS)
        values.update({k: v for k, v in params.items() if k in DEFAULTS})
        names = tuple(str(n) for n in values["camera_names"] or ())
        topics = tuple(str(t) for t in values["camera_topics"] or ())
        compressed = tuple(bool(c) for c in values["compressed"] or ())
        if len(topics) != len(names):
            raise ValueError(f"camera_topics has {len(topics)} entries, camera_names "
                             f"{len(names)}: give one topic per camera")
        for name in names:
            validate_camera_name(name)
        if len(set(names)) != len(names):
            raise ValueError(f"camera_names has duplicates: {list(names)}")
        if any(not t for t in topics):
            raise ValueError("camera_topics has an empty topic name")
        if not compressed:
            compressed = tuple(t.rstrip("/").endswith("/compressed") for t in topics)
        elif len(compressed) != len(names):
            raise ValueError(f"compressed has {len(compressed)} entries for {len(names)} "
                             "cameras (leave it empty to detect '/compressed' topics)")
        joints = tuple(str(j) for j in values["state_joint_names"] or ())
        if not joints:
            raise ValueError("state_joint_names is empty: name the joints of the state")
        if len(set(joints)) != len(joints):
            raise ValueError(f"state_joint_names has duplicates: {list(joints)}")
        try:
            cfg = cls(camera_names=names, camera_topics=topics, compressed=compressed,
                      camera_height=int(values["camera_height"]),
                      camera_width=int(values["camera_width"]),
                      joint_states_topic=str(values["joint_states_topic"]),
                      state_joint_names=joints, rate_hz=float(values["rate_hz"]),
                      T_o=int(values["T_o"]),
                      camera_staleness=float(values["camera_staleness"]),
                      state_staleness=float(values["state_staleness"]),
                      stamp_future_tolerance=float(values["stamp_future_tolerance"]),
                      tick_delay=float(values["tick_delay"]),
                      diagnostics_period=float(values["diagnostics_period"]))
        except (TypeError, ValueError) as err:
            raise ValueError(f"bad parameter type: {err}") from None
        if not cfg.joint_states_topic:
            raise ValueError("joint_states_topic is empty")
        for key in ("rate_hz", "camera_staleness", "state_staleness", "diagnostics_period"):
            if not getattr(cfg, key) > 0.0:
                raise ValueError(f"{key} must be > 0, got {getattr(cfg, key)}")
        for key in ("stamp_future_tolerance", "tick_delay"):
            if not getattr(cfg, key) >= 0.0:
                raise ValueError(f"{key} must be >= 0, got {getattr(cfg, key)}")
        if cfg.T_o < 1 or cfg.camera_height < 1 or cfg.camera_width < 1:
            raise ValueError("T_o, camera_height and camera_width must be >= 1")
        cfg.spec()  # validates names, sizes, staleness
        return cfg

    def spec(self) -> ObservationSpec:
        return ObservationSpec(self.camera_names, self.state_joint_names, self.camera_height,
                               self.camera_width, self.camera_staleness, self.state_staleness)

    @property
    def grid(self) -> TickGrid:
        return TickGrid.from_rate(self.rate_hz)

    @property
    def dt(self) -> float:
        return self.grid.dt

    @property
    def horizon(self) -> float:
        """How far back the stream buffers reach (s): over the ticks a late timer
        re-evaluates, plus the staleness limits."""
        return ((self.T_o + 2) * self.dt + self.tick_delay
                + max(self.camera_staleness, self.state_staleness) + 0.5)
