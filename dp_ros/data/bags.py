"""rosbag2 reading and writing without a ROS install (the pure-Python ``rosbags`` library).

Bags are directories (metadata.yaml + one or more .mcap or .db3 files) as ``ros2 bag
record`` writes them; a bare .mcap or .db3 file can be read as well. Messages stay CDR
bytes exactly as they travelled on DDS until someone asks for them deserialized, so the
player republishes them untouched and the writer stores what the recorder received.

- ``BagReader`` / ``open_bag``: topics and types, messages in bag-time order (the
  recorder's receive time) with topic selection and remapping, deserialization with the
  ROS 2 Kilted typestore (plus definitions embedded in the bag for other types).
- ``BagWriter``: raw CDR bytes (or messages) into a new bag, MCAP by default or sqlite3,
  metadata version 9 with the standard type names, type hashes and offered QoS profiles,
  so ``ros2 bag info`` / ``ros2 bag play`` on a ROS install open it.

Every problem with a bag raises ``BagError`` whose message starts with the bag path and
says what is wrong in one line: missing, not a bag, corrupt or truncated, empty,
unsupported metadata version or storage, unknown message type, missing topic.
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

from rosbags.interfaces import (MessageDefinitionFormat, Qos, QosDurability, QosHistory,
                                QosLiveliness, QosReliability, QosTime)
from rosbags.rosbag2 import Reader, ReaderError, StoragePlugin, Writer, WriterError
from rosbags.serde import SerdeError
from rosbags.typesys import Stores, get_types_from_idl, get_types_from_msg, get_typestore

PathLike = Union[str, Path]
STORAGES = ("mcap", "sqlite3")
BAG_VERSION = 9  # rosbag2 metadata version written (Jazzy, Kilted)
TYPESTORE = Stores.ROS2_KILTED
INFINITE = QosTime(9223372036, 854775807)  # rmw's "infinite" duration, as ros2 bag writes it


class BagError(RuntimeError):
    """A bag that cannot be used; the message names the bag and the problem."""


def bag_error(path: PathLike, problem: str) -> BagError:
    """BagError "<path>: <problem>" on one line (library messages may span several)."""
    return BagError(f"{path}: {' '.join(str(problem).split())}")


@functools.lru_cache(maxsize=None)
def default_typestore():
    """The ROS 2 Kilted message types (standard packages) for (de)serializing CDR."""
    return get_typestore(TYPESTORE)


# ----------------------------------------------------------------------------- QoS

def make_qos(reliability: str = "reliable", durability: str = "volatile", depth: int = 10,
             history: str = "keep_last") -> Qos:
    """A QoS profile for bag metadata (the publisher's offered QoS), from plain names:
    reliability reliable|best_effort, durability volatile|transient_local, history
    keep_last|keep_all."""
    return Qos(history=QosHistory[history.upper()], depth=int(depth),
               reliability=QosReliability[reliability.upper()],
               durability=QosDurability[durability.upper()],
               deadline=INFINITE, lifespan=INFINITE, liveliness=QosLiveliness.AUTOMATIC,
               liveliness_lease_duration=INFINITE, avoid_ros_namespace_conventions=False)


SENSOR_DATA_QOS = make_qos("best_effort", "volatile", 5)
DEFAULT_QOS = make_qos("reliable", "volatile", 10)
LATCHED_QOS = make_qos("reliable", "transient_local", 1)


# ----------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class TopicInfo:
    topic: str             # as seen by the caller (after remapping)
    source_topic: str      # as recorded
    msgtype: str           # e.g. "sensor_msgs/msg/Image"
    count: int
    qos: tuple[Qos, ...]   # offered QoS profiles recorded for the topic (may be empty)


@dataclass(frozen=True)
class BagMessage:
    topic: str             # after remapping
    msgtype: str
    stamp_ns: int          # bag time: when the recorder received it (its clock)
    raw: bytes             # CDR, exactly as recorded


def parse_remap(items: Iterable[str]) -> dict[str, str]:
    """["/a:=/b", ...] -> {"/a": "/b"}; ValueError for malformed items."""
    remap = {}
    for item in items or ():
        src, sep, dst = item.partition(":=")
        if not sep or not src or not dst:
            raise ValueError(f"remap {item!r} is not of the form FROM:=TO")
        remap[src] = dst
    return remap


class BagReader:
    """Read access to one bag. Use as a context manager or call open()/close().

    ``remap`` renames recorded topics (recorded name -> name seen here); every other
    method talks about the remapped names.
    """

    def __init__(self, path: PathLike, remap: Optional[Mapping[str, str]] = None,
                 typestore=None):
        self.path = Path(path)
        self.remap = dict(remap or {})
        self.typestore = typestore or default_typestore()
        self._reader: Optional[Reader] = None
        self._topics: dict[str, TopicInfo] = {}
        self._connections: dict[str, list] = {}
        self._registered: set[str] = set()

    # -- open / close ---------------------------------------------------------------
    def open(self) -> "BagReader":
        path = self.path
        if not path.exists():
            raise bag_error(path, "no such bag (file or directory)")
        if path.is_dir() and not (path / "metadata.yaml").exists():
            raise bag_error(path, "not a rosbag2 bag (no metadata.yaml in the directory)")
        try:
            reader = Reader(path)
            reader.open()
        except ReaderError as err:
            raise bag_error(path, _reader_problem(str(err))) from None
        except Exception as err:  # rosbags raises assorted types for damaged files
            raise bag_error(path, f"corrupt or unreadable bag ({type(err).__name__}: {err})") \
                from None
        self._reader = reader
        try:
            self._index()
        except BagError:
            self.close()
            raise
        return self

    def _index(self) -> None:
        reader = self._reader
        topics: dict[str, TopicInfo] = {}
        connections: dict[str, list] = {}
        for conn in reader.connections:
            name = self.remap.get(conn.topic, conn.topic)
            connections.setdefault(name, []).append(conn)
        for name, conns in connections.items():
            types = {c.msgtype for c in conns}
            if len(types) > 1:
                raise bag_error(self.path, f"topic {name} holds several types {sorted(types)}")
            qos: list[Qos] = []
            for c in conns:
                qos.extend(getattr(c.ext, "offered_qos_profiles", None) or [])
            topics[name] = TopicInfo(name, conns[0].topic, types.pop(),
                                     sum(c.msgcount for c in conns), tuple(qos))
        self._topics, self._connections = topics, connections
        if reader.message_count == 0 or not topics:
            raise bag_error(self.path, "empty bag (no messages)")

    def close(self) -> None:
        if self._reader is not None:
            try:
                self._reader.close()
            finally:
                self._reader = None

    def __enter__(self) -> "BagReader":
        return self.open() if self._reader is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- metadata -------------------------------------------------------------------
    def _check_open(self) -> Reader:
        if self._reader is None:
            raise RuntimeError(f"{self.path}: bag is not open")
        return self._reader

    @property
    def topics(self) -> dict[str, TopicInfo]:
        self._check_open()
        return dict(self._topics)

    @property
    def start_ns(self) -> int:
        return self._check_open().start_time

    @property
    def end_ns(self) -> int:
        """Bag time of the last message (inclusive)."""
        return self._check_open().end_time - 1

    @property
    def message_count(self) -> int:
        return self._check_open().message_count

    @property
    def storage(self) -> str:
        """mcap or sqlite3."""
        self._check_open()
        files = list(self.path.iterdir()) if self.path.is_dir() else [self.path]
        return "sqlite3" if any(f.suffix == ".db3" for f in files) else "mcap"

    def require(self, wanted: Mapping[str, Union[str, Sequence[str], None]],
                what: Optional[Mapping[str, str]] = None) -> None:
        """Check that each topic in ``wanted`` exists with one of the given types (None:
        any type). ``what`` names the topics' roles for the message (e.g. "camera
        image"). One BagError lists every problem."""
        self._check_open()
        problems = []
        for topic, types in wanted.items():
            role = f"{what[topic]} topic " if what and topic in what else "topic "
            info = self._topics.get(topic)
            if info is None:
                problems.append(f"no {role}{topic}")
                continue
            allowed = [types] if isinstance(types, str) else list(types or [])
            if allowed and info.msgtype not in allowed:
                problems.append(f"{role}{topic} has type {info.msgtype}, expected "
                                f"{' or '.join(allowed)}")
        if problems:
            have = ", ".join(f"{t} ({i.msgtype})" for t, i in sorted(self._topics.items()))
            raise bag_error(self.path, "; ".join(problems) + f" (the bag has: {have})")

    # -- messages -------------------------------------------------------------------
    def messages(self, topics: Optional[Iterable[str]] = None, start_ns: Optional[int] = None,
                 stop_ns: Optional[int] = None) -> Iterator[BagMessage]:
        """Messages of ``topics`` (remapped names; None = all) in bag-time order, with
        start_ns <= stamp < stop_ns. A read error mid-bag raises BagError."""
        reader = self._check_open()
        if topics is None:
            wanted = list(self._topics)
        else:
            wanted = list(topics)
            missing = [t for t in wanted if t not in self._topics]
            if missing:
                raise bag_error(self.path, f"no topic(s) {missing} in the bag "
                                           f"(has {sorted(self._topics)})")
        by_id = {}
        conns = []
        for name in wanted:
            for conn in self._connections[name]:
                by_id[conn.id] = (name, conn.msgtype)
                conns.append(conn)
        if not conns:
            return
        try:
            for conn, stamp, raw in reader.messages(connections=conns, start=start_ns,
                                                    stop=stop_ns):
                name, msgtype = by_id[conn.id]
                yield BagMessage(name, msgtype, int(stamp), bytes(raw))
        except BagError:
            raise
        except ReaderError as err:
            raise bag_error(self.path, _reader_problem(str(err))) from None
        except Exception as err:
            raise bag_error(self.path, f"corrupt or truncated bag: read failed "
                                       f"({type(err).__name__}: {err})") from None

    def deserialize(self, message: BagMessage) -> Any:
        """The message as a rosbags dataclass (fields named as in the .msg; arrays of
        numbers are numpy arrays). BagError for a type this reader does not know or
        bytes that do not decode."""
        self._ensure_type(message.msgtype, message.topic)
        try:
            return self.typestore.deserialize_cdr(message.raw, message.msgtype)
        except SerdeError as err:
            if "size mismatch" not in str(err):
                raise bag_error(self.path, f"cannot decode a {message.msgtype} message on "
                                           f"{message.topic} at {message.stamp_ns} ns "
                                           f"({err})") from None
            # bytes after a complete message (rclpy's serialize_message leaves some):
            # decode the message and ignore them
            return self._decode_prefix(message)
        except Exception as err:
            raise bag_error(self.path, f"cannot decode a {message.msgtype} message on "
                                       f"{message.topic} at {message.stamp_ns} ns "
                                       f"({type(err).__name__}: {err})") from None

    def _decode_prefix(self, message: BagMessage) -> Any:
        raw = message.raw
        msgdef = self.typestore.get_msgdef(message.msgtype)
        func = msgdef.deserialize_cdr_le if raw[1] else msgdef.deserialize_cdr_be
        try:
            value, _ = func(memoryview(raw)[4:], 0, msgdef.cls, self.typestore)
        except Exception as err:
            raise bag_error(self.path, f"cannot decode a {message.msgtype} message on "
                                       f"{message.topic} at {message.stamp_ns} ns "
                                       f"({type(err).__name__}: {err})") from None
        return value

    def _ensure_type(self, msgtype: str, topic: str) -> None:
        if msgtype in self._registered or msgtype in self.typestore.fielddefs:
            return
        # a type outside the standard set: use the definition the bag carries, if any
        defs = [c.msgdef for c in self._connections.get(topic, []) if c.msgtype == msgtype]
        defs = [d for d in defs if d.format != MessageDefinitionFormat.NONE and d.data]
        if not defs:
            raise bag_error(self.path, f"unknown message type {msgtype} on topic {topic} "
                                       "(not a standard ROS 2 type and the bag carries no "
                                       "definition)")
        try:
            types = _types_from_definition(defs[0], msgtype)
            if self.typestore is default_typestore():  # never modify the shared store
                self.typestore = get_typestore(TYPESTORE)
            self.typestore.register(types)
        except Exception as err:
            raise bag_error(self.path, f"message type {msgtype} on topic {topic}: cannot "
                                       f"parse its definition in the bag ({err})") from None
        self._registered.add(msgtype)


def _types_from_definition(msgdef, msgtype: str) -> dict:
    if msgdef.format == MessageDefinitionFormat.MSG:
        return dict(get_types_from_msg(msgdef.data, msgtype))
    sep = "=" * 80 + "\n"
    types: dict = {}
    if msgdef.data.startswith(sep + "IDL: "):
        for part in msgdef.data.split(sep)[1:]:
            _, idl = part.split("\n", 1)
            types.update(get_types_from_idl(idl))
    else:
        types.update(get_types_from_idl(msgdef.data))
    return types


def _reader_problem(text: str) -> str:
    """rosbags' ReaderError text -> our one-line problem description."""
    lowered = text.lower()
    if "version" in lowered and "not supported" in lowered:
        return f"unsupported rosbag2 metadata version ({text.rstrip('.')}; this reader " \
               f"handles versions up to {BAG_VERSION})"
    if "storage plugin" in lowered:
        return f"unsupported storage ({text.rstrip('.')}; readable: {', '.join(STORAGES)})"
    if "serialization format" in lowered:
        return f"unsupported serialization ({text.rstrip('.')}; only CDR is readable)"
    return f"corrupt or unreadable bag ({text.rstrip('.')})"


def open_bag(path: PathLike, remap: Optional[Mapping[str, str]] = None,
             typestore=None) -> BagReader:
    """An open BagReader (close it, or use it in a ``with`` block)."""
    return BagReader(path, remap=remap, typestore=typestore).open()


# ----------------------------------------------------------------------------- writing

class BagWriter:
    """Write a new bag: ``add_topic`` each topic once, then ``write`` raw CDR bytes (or
    ``write_message``). ``close`` (or leaving the ``with`` block) writes metadata.yaml;
    an exception inside the ``with`` block removes the partial bag.

    storage: "mcap" (default, ``ros2 bag record``'s default since Iron) or "sqlite3".
    """

    def __init__(self, path: PathLike, storage: str = "mcap", typestore=None,
                 overwrite: bool = False):
        self.path = Path(path)
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        self.storage = storage
        self.typestore = typestore or default_typestore()
        if self.path.exists():
            if not overwrite:
                raise bag_error(self.path, "already exists (choose another path or overwrite)")
            shutil.rmtree(self.path) if self.path.is_dir() else self.path.unlink()
        plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
        self._writer = Writer(self.path, version=BAG_VERSION, storage_plugin=plugin)
        # never an empty custom_data: rosbag2 reads it as a string map
        self._writer.set_custom_data("dp_ros.writer", "dp_ros.data.bags (rosbags)")
        self._connections: dict[str, Any] = {}
        self._open = False
        self.counts: dict[str, int] = {}

    def open(self) -> "BagWriter":
        try:
            self._writer.open()
        except (WriterError, OSError) as err:
            raise bag_error(self.path, f"cannot create bag ({err})") from None
        self._open = True
        return self

    def __enter__(self) -> "BagWriter":
        return self if self._open else self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def topics(self) -> dict[str, str]:
        return {t: c.msgtype for t, c in self._connections.items()}

    def set_custom_data(self, key: str, value: str) -> None:
        """A key/value pair for metadata.yaml's custom_data (strings)."""
        self._writer.set_custom_data(str(key), str(value))

    def has_topic(self, topic: str) -> bool:
        return topic in self._connections

    def add_topic(self, topic: str, msgtype: str, qos: Sequence[Qos] = (DEFAULT_QOS,),
                  msgdef: Optional[str] = None, type_hash: Optional[str] = None) -> None:
        """Register ``topic`` of ``msgtype`` (e.g. "sensor_msgs/msg/Image") with the
        publishers' offered QoS profiles. A type outside the typestore needs ``msgdef``
        (ros2msg text) and ``type_hash`` (RIHS01)."""
        if not self._open:
            self.open()
        if topic in self._connections:
            raise ValueError(f"topic {topic} added twice")
        if msgdef is None and msgtype not in self.typestore.fielddefs:
            raise bag_error(self.path, f"unknown message type {msgtype} for topic {topic}")
        self._connections[topic] = self._writer.add_connection(
            topic, msgtype, typestore=self.typestore, msgdef=msgdef, rihs01=type_hash,
            offered_qos_profiles=list(qos))
        self.counts[topic] = 0

    def write(self, topic: str, stamp_ns: int, raw: Union[bytes, memoryview]) -> None:
        """Append one message: CDR bytes received at bag time ``stamp_ns``."""
        conn = self._connections.get(topic)
        if conn is None:
            raise KeyError(f"topic {topic} was not added to {self.path}")
        self._writer.write(conn, int(stamp_ns), raw)
        self.counts[topic] += 1

    def write_message(self, topic: str, stamp_ns: int, msg: Any) -> None:
        """Serialize a rosbags message object (typestore class) and append it."""
        conn = self._connections.get(topic)
        if conn is None:
            raise KeyError(f"topic {topic} was not added to {self.path}")
        self.write(topic, stamp_ns, bytes(self.typestore.serialize_cdr(msg, conn.msgtype)))

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        self._writer.close()

    def abort(self) -> None:
        """Stop without metadata and remove the partial bag."""
        if self._open:
            self._open = False
            try:
                self._writer.abort() if hasattr(self._writer, "abort") else self._writer.close()
            except Exception:
                pass
        shutil.rmtree(self.path, ignore_errors=True)


def message_class(msgtype: str, typestore=None):
    """The rosbags dataclass of ``msgtype`` ("pkg/msg/Name") for building messages."""
    store = typestore or default_typestore()
    if msgtype not in store.fielddefs:
        raise KeyError(f"unknown message type {msgtype}")
    return store.types[msgtype]


def time_msg(stamp_ns: int, typestore=None):
    """builtin_interfaces/msg/Time for a stamp in nanoseconds."""
    sec, nanosec = divmod(int(stamp_ns), 1_000_000_000)
    return message_class("builtin_interfaces/msg/Time", typestore)(sec=sec, nanosec=nanosec)


def stamp_ns(stamp) -> int:
    """builtin_interfaces Time (rosbags or rclpy) -> integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)
