"""Bags -> observations, windows and the episode store, with the aggregator's own code.

Observations come from dp_ros.control (ObservationStreams, TickGrid, WindowBuilder) and
the image decoder of dp_ros.control.image_decode, fed exactly as obs_aggregator feeds
them, and the settings are read from the aggregator's section of the node parameter file.
So a dataset sees what the deployed aggregator sees: same topics, joints, resize, colour
order, tick grid, staleness limits.

Time, as the live aggregator experiences it when the bag is played with /clock
(``ros2 bag play --clock`` / ``dp-ros play --clock``): messages are pushed in bag-time
order (the recorder's receive time), and tick t is evaluated once every message received
up to t + tick_delay has been pushed, before any later one. Within the buffers, samples
are placed by their header stamps, and a tick takes the newest sample stamped at or
before it. A message stamped before t that arrived after t + tick_delay is therefore
missing from tick t, offline as online.

Parameter file (a standard ROS 2 one; sections ``<node>: ros__parameters: {...}``, the
``/**`` section applies to every node):

- ``obs_aggregator``: camera_names, camera_topics, compressed, camera_height,
  camera_width, joint_states_topic, state_joint_names, rate_hz, T_o, camera_staleness,
  state_staleness, stamp_future_tolerance, tick_delay (the node's defaults where absent)
- ``dataset`` (optional; CLI flags override): ``action_topic`` (default /expert/action),
  ``action_joint_names`` (default: policy_node's ``joint_names``, else the state joints),
  ``episode_topic`` (default /episode), ``action_staleness`` (s, default 1.5 dt). Write
  it like a node section so ROS tools still accept the file::

      dataset:
        ros__parameters:
          action_topic: /expert/action
          action_joint_names: [joint_1, joint_2]
          episode_topic: /episode

Actions: sensor_msgs/JointState (joints by name, header stamp) or
std_msgs/Float64MultiArray (values in action_joint_names order, bag time). The action of
tick t is the latest one stamped at or before t (it labels the tick: it is looked up with
the whole bag known, not as it arrived).

Episodes: std_msgs/String JSON on the episode topic, ``{"event": "start"|"end",
"episode": i, "label": ..., "stamp_ns": ...}`` (dp_ros.sim.expert_node writes them); the
ticks start <= t <= end form episode i. A bag without that topic is one episode. Invalid
ticks at an episode's ends are trimmed; invalid ticks inside split it (parts shorter than
T_o are dropped). Every skip is counted with its reason in the summary.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import yaml

from dp_ros.control.aggregator_config import AggregatorConfig
from dp_ros.control.image_decode import compressed_image_to_numpy, raw_image_to_numpy
from dp_ros.control.observation import (STATE_STREAM, Invalid, JointSelector, Observation,
                                        ObservationStreams)
from dp_ros.control.streams import SampleRejected
from dp_ros.control.window import WindowBuilder

from .bags import BagError, BagReader, BagMessage, bag_error, open_bag, stamp_ns
from .store import EpisodeStore, StoreError

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED = "sensor_msgs/msg/CompressedImage"
JOINT_STATE = "sensor_msgs/msg/JointState"
FLOAT_ARRAY = "std_msgs/msg/Float64MultiArray"
STRING = "std_msgs/msg/String"
ACTION_TYPES = (JOINT_STATE, FLOAT_ARRAY)
AGGREGATOR = "obs_aggregator"
DATASET = "dataset"
WILDCARD = "/**"
# rejections that mean the configuration does not fit the bag: an error, not a count
FATAL_CAUSES = ("missing_joint", "unsupported_encoding")


class ParamsError(ValueError):
    """A parameter file that is missing, malformed or has bad values."""


# ----------------------------------------------------------------------------- parameter files

def load_parameter_file(path: Union[str, os.PathLike]) -> dict[str, dict[str, Any]]:
    """Section name (leading "/" stripped, except "/**") -> its parameters."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ParamsError(f"{path}: cannot read parameter file ({err.strerror or err})") \
            from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of node names to 'ros__parameters:'")
    sections = {}
    for name, body in data.items():
        if isinstance(body, dict) and "ros__parameters" in body:
            body = body["ros__parameters"]
        if not isinstance(body, dict):
            raise ParamsError(f"{path}: section {name!r} is not a mapping")
        key = str(name) if name == WILDCARD else str(name).lstrip("/")
        sections[key] = body
    return sections


def load_node_parameters(path: Union[str, os.PathLike], node: str,
                         required: bool = True) -> dict[str, Any]:
    """The parameters ``node`` gets from a parameter file (the /** section, then its own)."""
    sections = load_parameter_file(path)
    if required and node not in sections:
        raise ParamsError(f"{path}: no '{node}:' section (has {sorted(sections)})")
    values = dict(sections.get(WILDCARD, {}))
    values.update(sections.get(node, {}))
    return values


# ----------------------------------------------------------------------------- configuration

# what obs_aggregator subscribes to and how it aligns: the node's own settings class
ObsSource = AggregatorConfig


def obs_source(params: Mapping[str, Any], where: str = "obs_aggregator") -> AggregatorConfig:
    """The aggregator's settings from its parameter section; ParamsError naming `where`."""
    try:
        return AggregatorConfig.from_parameters(params)
    except ValueError as err:
        raise ParamsError(f"{where}: {err}") from None


@dataclass(frozen=True)
class ActionSource:
    topic: str = "/expert/action"
    joint_names: tuple[str, ...] = ()
    episode_topic: str = "/episode"
    staleness: Optional[float] = None  # s; None = 1.5 dt


def load_sources(path: Union[str, os.PathLike], action_topic: Optional[str] = None,
                 action_joints: Optional[Sequence[str]] = None,
                 episode_topic: Optional[str] = None, action_staleness: Optional[float] = None,
                 node: str = AGGREGATOR) -> tuple[ObsSource, ActionSource]:
    """(what the aggregator sees, where the actions and episodes are) from a parameter
    file, CLI values overriding its ``dataset`` section."""
    sections = load_parameter_file(path)
    if node not in sections:
        raise ParamsError(f"{path}: no '{node}:' section (has {sorted(sections)}); the "
                          "dataset is built from the aggregator's settings")
    base = dict(sections.get(WILDCARD, {}))
    obs = obs_source({**base, **sections[node]}, where=f"{path}: {node}")
    ds = {**base, **sections.get(DATASET, {})}
    joints = action_joints or ds.get("action_joint_names") \
        or sections.get("policy_node", {}).get("joint_names") or obs.state_joint_names
    staleness = action_staleness if action_staleness is not None \
        else ds.get("action_staleness")
    act = ActionSource(topic=str(action_topic or ds.get("action_topic") or "/expert/action"),
                       joint_names=tuple(str(j) for j in joints),
                       episode_topic=str(episode_topic or ds.get("episode_topic") or "/episode"),
                       staleness=None if staleness is None else float(staleness))
    if len(set(act.joint_names)) != len(act.joint_names):
        raise ParamsError(f"{path}: action joint names have duplicates: {list(act.joint_names)}")
    if act.staleness is not None and not act.staleness > 0:
        raise ParamsError(f"{path}: action_staleness must be > 0, got {act.staleness}")
    return obs, act


# ----------------------------------------------------------------------------- observations

class BagObservations:
    """The aggregator's view of one bag: observation (or Invalid) per tick."""

    def __init__(self, bag: BagReader, source: ObsSource):
        self.bag = bag
        self.source = source
        self.grid = source.grid
        self.rejected: Counter[tuple[str, str]] = Counter()  # (stream, cause) -> count
        self.received: Counter[str] = Counter()
        self._camera_of = dict(zip(source.camera_topics, source.camera_names))
        self._compressed = dict(zip(source.camera_topics, source.compressed))

    @property
    def topics(self) -> list[str]:
        return list(self.source.camera_topics) + [self.source.joint_states_topic]

    def check(self) -> None:
        """BagError unless every camera and the joint-state topic are in the bag with
        the type the aggregator subscribes with."""
        wanted = {t: (COMPRESSED if c else IMAGE)
                  for t, c in zip(self.source.camera_topics, self.source.compressed)}
        roles = {t: f"camera {n!r}" for t, n in self._camera_of.items()}
        wanted[self.source.joint_states_topic] = JOINT_STATE
        roles[self.source.joint_states_topic] = "joint-state"
        self.bag.require(wanted, roles)

    def _fatal(self, stream: str, topic: str, err: SampleRejected) -> BagError:
        if err.cause == "missing_joint":
            return bag_error(self.bag.path, f"joint names do not match on {topic}: {err} "
                                            f"(configured state_joint_names "
                                            f"{list(self.source.state_joint_names)})")
        return bag_error(self.bag.path, f"{stream} on {topic}: {err}")

    def _push(self, streams: ObservationStreams, msg: BagMessage) -> None:
        data = self.bag.deserialize(msg)
        stamp = stamp_ns(data.header.stamp)
        camera = self._camera_of.get(msg.topic)
        stream = camera if camera is not None else STATE_STREAM
        self.received[stream] += 1
        try:
            if stamp > msg.stamp_ns + int(round(self.source.stamp_future_tolerance * 1e9)):
                raise SampleRejected("stamp_future", f"stamp {stamp * 1e-9:.6f} s is "
                                                     f"{(stamp - msg.stamp_ns) * 1e-9:.3f} s "
                                                     "after its arrival")
            if camera is not None:
                if self._compressed[msg.topic]:
                    pixels, encoding = compressed_image_to_numpy(data.format, data.data)
                else:
                    pixels, encoding = raw_image_to_numpy(data.encoding, data.height,
                                                          data.width, data.step, data.data)
                streams.push_image(camera, stamp * 1e-9, pixels, encoding)
            else:
                streams.push_state(stamp * 1e-9, list(data.name),
                                   np.asarray(data.position, dtype=np.float64))
        except SampleRejected as err:
            if err.cause in FATAL_CAUSES:
                raise self._fatal(stream, msg.topic, err) from None
            self.rejected[(stream, err.cause)] += 1

    def ticks(self, progress=None, start_ns: Optional[int] = None,
              stop_ns: Optional[int] = None) -> Iterator[tuple[int, Union[Observation, Invalid]]]:
        """(tick_ns, Observation | Invalid) for every tick of the grid from the first
        observation message to the last (bag time in [start_ns, stop_ns) when given), in
        order. ``progress``: called with the number of messages consumed since the last
        call."""
        src = self.source
        dt_ns = self.grid.dt_ns
        delay_ns = int(round(src.tick_delay * 1e9))
        streams = ObservationStreams(src.spec(), horizon=src.horizon)
        k: Optional[int] = None
        last_b: Optional[int] = None
        for msg in self.bag.messages(self.topics, start_ns=start_ns, stop_ns=stop_ns):
            b = msg.stamp_ns
            if k is None:
                k = self.grid.index_at_or_before(b - delay_ns)
            # ticks whose evaluation time (t + delay) lies before this message's arrival
            while k * dt_ns + delay_ns < b:
                yield k * dt_ns, streams.observe(self.grid.time(k))
                k += 1
            self._push(streams, msg)
            last_b = b
            if progress is not None:
                progress(1)
        if k is None:
            return
        while k * dt_ns + delay_ns <= last_b:
            yield k * dt_ns, streams.observe(self.grid.time(k))
            k += 1


def bag_windows(path: Union[str, os.PathLike, BagReader], source: ObsSource,
                remap: Optional[Mapping[str, str]] = None, start_ns: Optional[int] = None,
                stop_ns: Optional[int] = None) -> Iterator[dict]:
    """The observation windows the aggregator publishes when this bag is played:
    window dicts (images, state, stamps; dp_ros.control.window) in tick order."""
    bag = path if isinstance(path, BagReader) else open_bag(path, remap=remap)
    try:
        walker = BagObservations(bag, source)
        walker.check()
        builder = WindowBuilder(source.T_o, source.dt)
        for tick_ns, obs in walker.ticks(start_ns=start_ns, stop_ns=stop_ns):
            window = builder.push(tick_ns * 1e-9, obs)
            if window is not None:
                yield window
    finally:
        if not isinstance(path, BagReader):
            bag.close()


# ----------------------------------------------------------------------------- actions, episodes

class ActionTrack:
    """The recorded actions of one bag, looked up by tick."""

    def __init__(self, stamps_ns: np.ndarray, values: np.ndarray, staleness_ns: int):
        order = np.argsort(stamps_ns, kind="stable")
        self.stamps_ns = np.asarray(stamps_ns, dtype=np.int64)[order]
        self.values = np.asarray(values, dtype=np.float64)[order]
        self.staleness_ns = int(staleness_ns)

    def __len__(self) -> int:
        return len(self.stamps_ns)

    def at(self, tick_ns: int) -> Optional[np.ndarray]:
        """The latest action stamped at or before the tick, None if none or too old."""
        i = int(np.searchsorted(self.stamps_ns, tick_ns, side="right")) - 1
        if i < 0 or tick_ns - self.stamps_ns[i] > self.staleness_ns:
            return None
        return self.values[i]


def read_actions(bag: BagReader, source: ActionSource, dt: float) -> ActionTrack:
    info = bag.topics.get(source.topic)
    if info is None:
        bag.require({source.topic: ACTION_TYPES}, {source.topic: "action"})
    if info.msgtype not in ACTION_TYPES:
        raise bag_error(bag.path, f"action topic {source.topic} has type {info.msgtype}; "
                                  f"supported: {', '.join(ACTION_TYPES)}")
    selector = JointSelector(source.joint_names)
    stamps, values = [], []
    for msg in bag.messages([source.topic]):
        data = bag.deserialize(msg)
        if info.msgtype == JOINT_STATE:
            stamp = stamp_ns(data.header.stamp) or msg.stamp_ns
            try:
                value = selector(list(data.name), np.asarray(data.position, dtype=np.float64))
            except SampleRejected as err:
                if err.cause == "missing_joint":
                    raise bag_error(bag.path, f"joint names do not match on action topic "
                                              f"{source.topic}: {err} (configured action "
                                              f"joints {list(source.joint_names)})") from None
                continue
        else:
            stamp = msg.stamp_ns
            value = np.asarray(data.data, dtype=np.float64)
            if value.shape != (len(source.joint_names),):
                raise bag_error(bag.path, f"action topic {source.topic}: {value.size} values "
                                          f"for {len(source.joint_names)} action joints "
                                          f"{list(source.joint_names)}")
            if not np.all(np.isfinite(value)):
                continue
        stamps.append(stamp)
        values.append(value)
    staleness = source.staleness if source.staleness is not None else 1.5 * dt
    return ActionTrack(np.array(stamps, dtype=np.int64),
                       np.array(values, dtype=np.float64).reshape(-1, len(source.joint_names)),
                       int(round(staleness * 1e9)))


@dataclass
class EpisodeSpan:
    index: int
    label: Optional[str]
    start_ns: int
    end_ns: int
    info: dict = field(default_factory=dict)


def read_episodes(bag: BagReader, topic: str) -> tuple[list[EpisodeSpan], int]:
    """Complete episodes from the boundary topic, and the number of incomplete ones.
    A bag without the topic is one episode spanning it."""
    if topic not in bag.topics:
        return [EpisodeSpan(0, None, bag.start_ns, bag.end_ns, {"whole_bag": True})], 0
    if bag.topics[topic].msgtype != STRING:
        raise bag_error(bag.path, f"episode topic {topic} has type "
                                  f"{bag.topics[topic].msgtype}, expected {STRING} (JSON)")
    pending: dict[Any, dict] = {}
    spans, incomplete = [], 0
    for msg in bag.messages([topic]):
        text = bag.deserialize(msg).data
        try:
            event = json.loads(text)
            kind, index, stamp = event["event"], event["episode"], int(event["stamp_ns"])
        except (ValueError, KeyError, TypeError):
            raise bag_error(bag.path, f"episode topic {topic}: not an episode event: "
                                      f"{text[:80]!r}") from None
        if kind == "start":
            if index in pending:
                incomplete += 1  # restarted without an end
            pending[index] = dict(event, stamp_ns=stamp)
        elif kind == "end":
            start = pending.pop(index, None)
            if start is None:
                incomplete += 1
                continue
            info = {k: v for k, v in event.items() if k not in ("event", "stamp_ns")}
            spans.append(EpisodeSpan(len(spans), start.get("label"), start["stamp_ns"],
                                     stamp, info))
    incomplete += len(pending)
    spans.sort(key=lambda e: e.start_ns)
    for i, span in enumerate(spans):
        span.index = i
    return spans, incomplete


# ----------------------------------------------------------------------------- dataset

@dataclass
class DatasetSummary:
    store: Path
    bags: int = 0
    episodes: int = 0
    steps: int = 0
    labels: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)   # reason -> ticks or episodes
    rejected: Counter = field(default_factory=Counter)  # "stream: cause" -> messages

    def lines(self) -> list[str]:
        labels = ", ".join(f"{n} {k}" for k, n in sorted(self.labels.items(), key=str))
        out = [f"{self.store}: {self.episodes} episodes, {self.steps} steps from "
               f"{self.bags} bag(s)" + (f" ({labels})" if labels else "")]
        if self.skipped:
            out.append("  skipped: " + ", ".join(f"{k}: {n}" for k, n in
                                                 sorted(self.skipped.items())))
        if self.rejected:
            out.append("  rejected messages: " + ", ".join(
                f"{k}: {n}" for k, n in sorted(self.rejected.items())))
        return out


def _segments(rows: list, min_len: int) -> list[list]:
    """Split a tick list at None entries (invalid ticks); keep runs of >= min_len."""
    parts, current = [], []
    for row in rows + [None]:
        if row is None:
            if len(current) >= min_len:
                parts.append(current)
            current = []
        else:
            current.append(row)
    return parts


def build_dataset(bags: Sequence[Union[str, os.PathLike]], config: Union[str, os.PathLike],
                  out: Union[str, os.PathLike], overwrite: bool = False,
                  action_topic: Optional[str] = None,
                  action_joints: Optional[Sequence[str]] = None,
                  episode_topic: Optional[str] = None,
                  remap: Optional[Mapping[str, str]] = None,
                  progress: bool = False) -> DatasetSummary:
    """Bags -> a new episode store at ``out`` (written next to it and moved into place
    when every bag is done, so a failure leaves no half store). Raises ParamsError,
    BagError or StoreError naming the problem."""
    obs_src, act_src = load_sources(config, action_topic, action_joints, episode_topic)
    out = Path(out)
    if out.exists() and not overwrite:
        raise StoreError(f"{out}: already exists (pass --overwrite to replace it)")
    if not bags:
        raise BagError("no bags given")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    store = EpisodeStore.create(tmp, {c: (obs_src.camera_height, obs_src.camera_width)
                                      for c in obs_src.camera_names},
                                obs_src.state_joint_names, act_src.joint_names, obs_src.dt,
                                overwrite=True)
    summary = DatasetSummary(store=out)
    try:
        for path in bags:
            _add_bag(store, Path(path), obs_src, act_src, remap, summary, progress)
            summary.bags += 1
        if summary.episodes == 0:
            raise BagError(f"{', '.join(map(str, bags))}: no usable episode (skipped: "
                           + (", ".join(f"{k}: {n}" for k, n in summary.skipped.items())
                              or "none") + ")")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)
    return summary


def _add_bag(store: EpisodeStore, path: Path, obs_src: ObsSource, act_src: ActionSource,
             remap, summary: DatasetSummary, progress: bool) -> None:
    with open_bag(path, remap=remap) as bag:
        walker = BagObservations(bag, obs_src)
        walker.check()
        bag.require({act_src.topic: ACTION_TYPES}, {act_src.topic: "action"})
        episodes, incomplete = read_episodes(bag, act_src.episode_topic)
        if incomplete:
            summary.skipped["incomplete episodes (no end event)"] += incomplete
        if not episodes:
            raise bag_error(path, f"no complete episode on {act_src.episode_topic}")
        actions = read_actions(bag, act_src, obs_src.dt)
        if len(actions) == 0:
            raise bag_error(path, f"no usable action on {act_src.topic}")
        bar = None
        if progress:
            try:
                from tqdm import tqdm
                total = sum(bag.topics[t].count for t in walker.topics)
                bar = tqdm(total=total, unit="msg", desc=path.name, file=sys.stderr,
                           leave=False)
            except ImportError:
                bar = None
        ep_iter = iter(episodes)
        current = next(ep_iter, None)
        rows: list = []
        for tick_ns, obs in walker.ticks(progress=bar.update if bar else None):
            while current is not None and tick_ns > current.end_ns:
                _commit(store, current, rows, obs_src, summary)
                rows = []
                current = next(ep_iter, None)
            if current is None:
                break
            if tick_ns < current.start_ns:
                continue
            if isinstance(obs, Invalid):
                summary.skipped[f"ticks: {obs.stream} {obs.cause}"] += 1
                rows.append(None)
                continue
            action = actions.at(tick_ns)
            if action is None:
                summary.skipped["ticks: no action"] += 1
                rows.append(None)
                continue
            rows.append((tick_ns, obs, action))
        if current is not None:
            _commit(store, current, rows, obs_src, summary)
            for _ in ep_iter:
                summary.skipped["episodes past the bag's end"] += 1
        if bar is not None:
            bar.close()
        for (stream, cause), n in walker.rejected.items():
            summary.rejected[f"{stream}: {cause}"] += n


def _commit(store: EpisodeStore, span: EpisodeSpan, rows: list, obs_src: ObsSource,
            summary: DatasetSummary) -> None:
    parts = _segments(rows, max(obs_src.T_o, 2))
    if not parts:
        summary.skipped["episodes without enough valid ticks"] += 1
        return
    interior_gaps = len(parts) - 1
    if interior_gaps:
        summary.skipped["episodes split at invalid ticks"] += 1
    for part in parts:
        ticks = np.array([r[0] for r in part], dtype=np.int64)
        images = {c: np.stack([r[1].images[c] for r in part]) for c in obs_src.camera_names}
        state = np.stack([r[1].state for r in part]).astype(np.float32)
        action = np.stack([r[2] for r in part]).astype(np.float32)
        timestamp = np.array([t * 1e-9 for t in ticks.tolist()], dtype=np.float64)
        store.add_episode(images, state, action, timestamp, label=span.label)
        summary.episodes += 1
        summary.steps += len(part)
        summary.labels[span.label if span.label is not None else "unlabelled"] += 1


def main(args) -> int:
    """CLI entry for ``dp-ros dataset BAG... --config FILE --out STORE``."""
    from .bags import parse_remap
    try:
        remap = parse_remap(args.remap or [])
        summary = build_dataset(args.bags, args.config, args.out, overwrite=args.overwrite,
                                action_topic=args.action_topic,
                                action_joints=args.action_joints,
                                episode_topic=args.episode_topic, remap=remap,
                                progress=not getattr(args, "quiet", False))
    except (BagError, ParamsError, StoreError, ValueError) as err:
        print(f"dp-ros dataset: {err}", file=sys.stderr)
        return 1
    for line in summary.lines():
        print(line)
    return 0
