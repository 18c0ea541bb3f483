#!/usr/bin/env python3
"""Cross-language check: a Python gRPC client (grpcio, no generated stubs).

Compiles proto/aaos/v1/*.proto with protoc at run time, builds method
callables from the generated message classes, and drives the server over
h2c: CreateTask, GetTask, a rejected CreateTask, and a full
AgentService.Session (register -> registration_ack -> task_assignment ->
task_complete -> completion_ack). Prints one JSON summary line on stdout and
exits non-zero on any mismatch.

Usage: python_client.py --target 127.0.0.1:PORT [--proto-dir DIR]
"""
import argparse
import glob
import json
import os
import queue
import subprocess
import sys
import tempfile
import uuid

import grpc
from google.protobuf import json_format

TIMEOUT_S = 15


class Mismatch(Exception):
    pass


def expect(cond, what, checks):
    if not cond:
        raise Mismatch(what)
    checks.append(what)


def compile_protos(proto_dir, out_dir):
    """protoc --python_out for aaos/v1. The google/protobuf imports are served
    from the descriptors compiled into the protobuf runtime, because a
    distribution's protoc often comes without the well-known .proto files."""
    from google.protobuf import descriptor_pb2, struct_pb2, timestamp_pb2

    files = sorted(glob.glob(os.path.join(proto_dir, "aaos", "v1", "*.proto")))
    if not files:
        raise Mismatch(f"no .proto files under {proto_dir}/aaos/v1")
    wkt = descriptor_pb2.FileDescriptorSet()
    for module in (struct_pb2, timestamp_pb2):
        module.DESCRIPTOR.CopyToProto(wkt.file.add())
    wkt_path = os.path.join(out_dir, "wkt.binpb")
    with open(wkt_path, "wb") as f:
        f.write(wkt.SerializeToString())
    result = subprocess.run(
        ["protoc", "-I", proto_dir, f"--descriptor_set_in={wkt_path}", f"--python_out={out_dir}", *files],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise Mismatch(f"protoc failed: {result.stderr.strip()}")
    sys.path.insert(0, out_dir)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--proto-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "proto"))
    args = parser.parse_args()
    checks = []
    summary = {"ok": False, "checks": checks, "grpcio": grpc.__version__}
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            compile_protos(os.path.abspath(args.proto_dir), out_dir)
            run(args.target, summary, checks)
            summary["ok"] = True
        except Mismatch as e:
            summary["error"] = f"mismatch: {e}"
        except grpc.RpcError as e:
            summary["error"] = f"rpc failed: {e.code().name}: {e.details()}"
        except Exception as e:  # noqa: BLE001 - report anything unexpected in the summary
            summary["error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


def run(target, summary, checks):
    from aaos.v1 import agent_service_pb2 as agent_pb
    from aaos.v1 import task_pb2
    from aaos.v1 import task_service_pb2 as task_svc_pb

    channel = grpc.insecure_channel(target)
    grpc.channel_ready_future(channel).result(timeout=TIMEOUT_S)

    def unary(method, req_cls, res_cls):
        return channel.unary_unary(method, request_serializer=req_cls.SerializeToString, response_deserializer=res_cls.FromString)

    create_task = unary("/aaos.v1.TaskService/CreateTask", task_svc_pb.CreateTaskRequest, task_svc_pb.CreateTaskResponse)
    get_task = unary("/aaos.v1.TaskService/GetTask", task_svc_pb.GetTaskRequest, task_svc_pb.GetTaskResponse)
    session = channel.stream_stream(
        "/aaos.v1.AgentService/Session",
        request_serializer=agent_pb.SessionRequest.SerializeToString,
        response_deserializer=agent_pb.SessionResponse.FromString,
    )

    # CreateTask with metadata and a correlation ID; the ID comes back in the response metadata.
    correlation_id = f"py-interop-{uuid.uuid4()}"
    req = task_svc_pb.CreateTaskRequest(task_type=task_pb2.TASK_TYPE_RESEARCH, description="from python", priority=7)
    req.metadata.update({"lang": "python", "n": 3})
    created, call = create_task.with_call(req, metadata=[("x-correlation-id", correlation_id)], timeout=TIMEOUT_S)
    task = created.task
    summary["task_id"] = task.task_id
    expect(len(task.task_id) == 36, "CreateTask returns a UUID", checks)
    expect(task.status == task_pb2.TASK_STATUS_PENDING, "CreateTask: PENDING", checks)
    expect(task.priority == 7 and task.task_type == task_pb2.TASK_TYPE_RESEARCH, "CreateTask: type and priority kept", checks)
    expect(json_format.MessageToDict(task.metadata) == {"lang": "python", "n": 3}, "CreateTask: metadata Struct round-trips", checks)
    expect(task.correlation_id == correlation_id, "CreateTask: correlation ID stored", checks)
    echoed = dict(call.initial_metadata()).get("x-correlation-id")
    expect(echoed == correlation_id, "CreateTask: correlation ID echoed in metadata", checks)

    # proto3 optional: an explicit 0 is kept, an absent priority is 5.
    zero = create_task(task_svc_pb.CreateTaskRequest(task_type=task_pb2.TASK_TYPE_QA, description="priority zero", priority=0), timeout=TIMEOUT_S).task
    default = create_task(task_svc_pb.CreateTaskRequest(task_type=task_pb2.TASK_TYPE_QA, description="priority default"), timeout=TIMEOUT_S).task
    expect(zero.priority == 0 and default.priority == 5, "CreateTask: explicit 0 kept, absent is 5", checks)

    # A bad request: INVALID_ARGUMENT with a readable message.
    try:
        create_task(task_svc_pb.CreateTaskRequest(task_type=task_pb2.TASK_TYPE_QA, description="no", priority=11), timeout=TIMEOUT_S)
        raise Mismatch("CreateTask with priority 11 succeeded")
    except grpc.RpcError as e:
        expect(e.code() == grpc.StatusCode.INVALID_ARGUMENT, "CreateTask: bad input is INVALID_ARGUMENT", checks)
        expect("priority: must be between 0 and 10" in (e.details() or ""), f"CreateTask: readable error message ({e.details()!r})", checks)

    got = get_task(task_svc_pb.GetTaskRequest(task_id=task.task_id), timeout=TIMEOUT_S).task
    expect(got.task_id == task.task_id and got.description == "from python", "GetTask returns the task", checks)
    try:
        get_task(task_svc_pb.GetTaskRequest(task_id=str(uuid.uuid4())), timeout=TIMEOUT_S)
        raise Mismatch("GetTask of an unknown id succeeded")
    except grpc.RpcError as e:
        expect(e.code() == grpc.StatusCode.NOT_FOUND, "GetTask: unknown id is NOT_FOUND", checks)

    # A full agent session.
    outbox = queue.Queue()

    def requests():
        while True:
            m = outbox.get()
            if m is None:
                return
            yield m

    responses = session(requests(), timeout=TIMEOUT_S * 2)
    outbox.put(agent_pb.SessionRequest(register=agent_pb.Register(agent_name="python-agent", agent_type="interop", capabilities=[task_pb2.TASK_TYPE_RESEARCH], max_concurrency=1)))
    first = next(responses)
    expect(first.WhichOneof("kind") == "registration_ack", "Session: registration_ack first", checks)
    agent_id = first.registration_ack.agent_id
    expect(len(agent_id) > 0 and first.registration_ack.heartbeat_interval_ms > 0, "Session: agent id and heartbeat interval assigned", checks)
    summary["agent_id"] = agent_id

    second = next(responses)
    expect(second.WhichOneof("kind") == "task_assignment", f"Session: task_assignment next (got {second.WhichOneof('kind')})", checks)
    assigned = second.task_assignment.task
    expect(assigned.task_id == task.task_id, "Session: the created task is assigned", checks)
    expect(assigned.status == task_pb2.TASK_STATUS_ASSIGNED and assigned.attempt == 1 and assigned.agent_id == agent_id, "Session: assignment is ASSIGNED, attempt 1, to this agent", checks)
    expect(assigned.correlation_id == correlation_id, "Session: assignment carries the correlation ID", checks)

    done = agent_pb.TaskComplete(task_id=assigned.task_id, attempt=assigned.attempt)
    done.result.update({"answer": 42, "by": "python"})
    outbox.put(agent_pb.SessionRequest(task_complete=done))
    third = next(responses)
    expect(third.WhichOneof("kind") == "completion_ack" and third.completion_ack.task_id == task.task_id, "Session: completion_ack for the task", checks)

    outbox.put(agent_pb.SessionRequest(heartbeat=agent_pb.Heartbeat()))
    fourth = next(responses)
    expect(fourth.WhichOneof("kind") == "heartbeat_ack", "Session: heartbeat_ack", checks)

    outbox.put(None)  # end the stream; the server ends its side
    rest = list(responses)
    expect(all(r.WhichOneof("kind") != "error" for r in rest), "Session: clean end", checks)

    final = get_task(task_svc_pb.GetTaskRequest(task_id=task.task_id), timeout=TIMEOUT_S).task
    result = json_format.MessageToDict(final.result)
    summary["final_status"] = task_pb2.TaskStatus.Name(final.status)
    summary["result"] = result
    expect(final.status == task_pb2.TASK_STATUS_COMPLETED, "GetTask: COMPLETED after the session", checks)
    expect(result == {"answer": 42, "by": "python"} and final.agent_id == agent_id, "GetTask: result and agent recorded", checks)
    expect(final.HasField("complete_time"), "GetTask: complete_time set", checks)
    channel.close()


if __name__ == "__main__":
    sys.exit(main())
