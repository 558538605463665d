"""The ``realtime_priority`` parameter of the nodes on the control path (aggregator, policy
node, executor)."""

from __future__ import annotations

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node

from dp_ros.nodes.params import int_range
from dp_ros.sched import DDS_THREAD_PREFIX, MAX_PRIORITY, raise_threads, request_realtime

# an entry for a node's PARAMETERS table: name -> (default, descriptor)
REALTIME_PARAMETER = {"realtime_priority": (0, ParameterDescriptor(
    description="SCHED_FIFO priority (1-99) of the thread that spins this node; 0 = normal "
                "scheduling. Needs CAP_SYS_NICE or an rtprio limit; without it the node warns "
                "and runs at normal priority. The process's DDS threads (which deliver "
                "messages to it) run one priority below; threads the node starts for heavy "
                "work (inference, loading) run that work at normal priority (the policy "
                "node's worker is raised only to wake for a window and to publish a plan).",
    integer_range=int_range(0, MAX_PRIORITY), read_only=True))}


def apply_realtime_priority(node: Node, priority: int) -> int:
    """When `priority` > 0, run the calling thread (the one that constructs and then spins
    the node) under SCHED_FIFO, and the process's DDS threads one priority below it: a
    message for the node must not wait behind inference to be delivered. Returns the
    priority in effect (0 = normal scheduling); a refusal is logged as a warning, never
    fatal."""
    if priority <= 0:
        return 0
    refused = request_realtime(priority)
    if refused:
        node.get_logger().warning(f"realtime_priority {priority}: {refused}; running at "
                                  "normal priority")
        return 0
    # one below: delivering a message must never hold up the node's own thread
    dds = raise_threads(DDS_THREAD_PREFIX, max(priority - 1, 1))
    node.get_logger().info(f"realtime_priority: SCHED_FIFO at priority {priority}, its "
                           f"{len(dds)} DDS threads one below")
    return priority
