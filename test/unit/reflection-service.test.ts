import { createFileRegistry, fromBinary, type MessageInitShape } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema, type FileDescriptorProto } from "@bufbuild/protobuf/wkt";
import { createClient, createRouterTransport } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { file_aaos_v1_agent_service } from "../../gen/aaos/v1/agent_service_pb.js";
import { file_aaos_v1_metrics_service } from "../../gen/aaos/v1/metrics_service_pb.js";
import { file_aaos_v1_task_service } from "../../gen/aaos/v1/task_service_pb.js";
import { file_grpc_health_v1_health } from "../../gen/grpc/health/v1/health_pb.js";
import * as v1 from "../../gen/grpc/reflection/v1/reflection_pb.js";
import * as v1alpha from "../../gen/grpc/reflection/v1alpha/reflection_pb.js";
import { createReflectionServices } from "../../src/transport/connect/reflection-service.js";

type Request = MessageInitShape<typeof v1.ServerReflectionRequestSchema>;

const services = createReflectionServices([
  file_aaos_v1_task_service,
  file_aaos_v1_agent_service,
  file_aaos_v1_metrics_service,
  file_grpc_health_v1_health,
]);
const transport = createRouterTransport((router) => {
  router.service(v1.ServerReflection, services.v1);
  router.service(v1alpha.ServerReflection, services.v1alpha);
});
const client = createClient(v1.ServerReflection, transport);

/** Sends each request on one stream and collects the answers, as grpcurl does. */
async function ask(...requests: Request[]): Promise<v1.ServerReflectionResponse[]> {
  const answers: v1.ServerReflectionResponse[] = [];
  for await (const answer of client.serverReflectionInfo(toStream(requests))) answers.push(answer);
  return answers;
}

async function* toStream<T>(items: T[]): AsyncIterable<T> {
  yield* items;
}

/** The decoded descriptors of a file_descriptor_response; fails the test on any other answer. */
function descriptors(answer: v1.ServerReflectionResponse | undefined): FileDescriptorProto[] {
  expect(answer?.messageResponse.case).toBe("fileDescriptorResponse");
  if (answer?.messageResponse.case !== "fileDescriptorResponse") return [];
  return answer.messageResponse.value.fileDescriptorProto.map((bytes) => fromBinary(FileDescriptorProtoSchema, bytes));
}

describe("server reflection", () => {
  it("lists every served service by its fully qualified name", async () => {
    const [answer] = await ask({ host: "localhost:8000", messageRequest: { case: "listServices", value: "*" } });

    expect(answer?.validHost).toBe("localhost:8000");
    expect(answer?.originalRequest?.messageRequest).toEqual({ case: "listServices", value: "*" });
    expect(answer?.messageResponse.case).toBe("listServicesResponse");
    const names = answer?.messageResponse.case === "listServicesResponse" ? answer.messageResponse.value.service.map((s) => s.name) : [];
    expect(names).toEqual(
      expect.arrayContaining(["aaos.v1.TaskService", "aaos.v1.AgentService", "aaos.v1.MetricsService", "grpc.health.v1.Health"]),
    );
    expect(names).toHaveLength(4);
  });

  it.each([
    ["aaos.v1.TaskService", "aaos/v1/task_service.proto"],
    ["aaos.v1.Task", "aaos/v1/task.proto"],
    ["aaos.v1.TaskType", "aaos/v1/task.proto"],
  ])("answers file_containing_symbol %s with its file and every dependency", async (symbol, fileName) => {
    const [answer] = await ask({ messageRequest: { case: "fileContainingSymbol", value: symbol } });
    const files = descriptors(answer);

    expect(files[0]?.name).toBe(fileName);
    expect(files.map((f) => f.name)).toEqual(
      expect.arrayContaining(["google/protobuf/struct.proto", "google/protobuf/timestamp.proto"]),
    );
    // A client can build a complete descriptor pool from this one answer.
    const byName = new Map(files.map((f) => [f.name, f]));
    const registry = createFileRegistry(files[0]!, (name) => byName.get(name));
    expect(registry.get(symbol)).toBeDefined();
  });

  it.each([
    ["a method", "aaos.v1.TaskService.CreateTask", "aaos/v1/task_service.proto"],
    ["a field", "aaos.v1.Task.task_id", "aaos/v1/task.proto"],
    ["an enum value under its enum", "aaos.v1.TaskType.TASK_TYPE_CODE", "aaos/v1/task.proto"],
    ["an enum value in protobuf scope", "aaos.v1.TASK_TYPE_CODE", "aaos/v1/task.proto"],
    ["a nested enum", "grpc.health.v1.HealthCheckResponse.ServingStatus", "grpc/health/v1/health.proto"],
    ["a well-known type", "google.protobuf.Struct", "google/protobuf/struct.proto"],
    ["a name with a leading dot", ".aaos.v1.Task", "aaos/v1/task.proto"],
  ])("resolves %s to its file", async (_what, symbol, fileName) => {
    const [answer] = await ask({ messageRequest: { case: "fileContainingSymbol", value: symbol } });
    expect(descriptors(answer)[0]?.name).toBe(fileName);
  });

  it("answers file_by_filename with the file first", async () => {
    const [answer] = await ask({ messageRequest: { case: "fileByFilename", value: "aaos/v1/agent_service.proto" } });
    expect(descriptors(answer).map((f) => f.name)).toEqual([
      "aaos/v1/agent_service.proto",
      "aaos/v1/task.proto",
      "google/protobuf/struct.proto",
      "google/protobuf/timestamp.proto",
    ]);
  });

  it("answers an unknown symbol with NOT_FOUND and keeps the stream open", async () => {
    let answered!: () => void;
    const firstAnswered = new Promise<void>((resolve) => (answered = resolve));
    async function* requests(): AsyncIterable<Request> {
      yield { messageRequest: { case: "fileContainingSymbol", value: "aaos.v1.NoSuchThing" } };
      await firstAnswered; // the next request is only sent after the error arrived
      yield { messageRequest: { case: "fileContainingSymbol", value: "aaos.v1.Task" } };
    }

    const answers: v1.ServerReflectionResponse[] = [];
    for await (const answer of client.serverReflectionInfo(requests())) {
      answers.push(answer);
      answered();
    }

    expect(answers).toHaveLength(2);
    expect(answers[0]?.messageResponse.case).toBe("errorResponse");
    expect(answers[0]?.messageResponse.value).toMatchObject({ errorCode: 5 });
    expect(descriptors(answers[1])[0]?.name).toBe("aaos/v1/task.proto");
  });

  it("answers extension requests without inventing extensions", async () => {
    const [unknownFile, numbers, unknownType] = await ask(
      { messageRequest: { case: "fileContainingExtension", value: { containingType: "aaos.v1.Task", extensionNumber: 100 } } },
      { messageRequest: { case: "allExtensionNumbersOfType", value: "aaos.v1.Task" } },
      { messageRequest: { case: "allExtensionNumbersOfType", value: "aaos.v1.Nope" } },
    );

    expect(unknownFile?.messageResponse.value).toMatchObject({ errorCode: 5 });
    expect(numbers?.messageResponse.case).toBe("allExtensionNumbersResponse");
    expect(numbers?.messageResponse.value).toMatchObject({ baseTypeName: "aaos.v1.Task", extensionNumber: [] });
    expect(unknownType?.messageResponse.value).toMatchObject({ errorCode: 5 });
  });

  it("serves the same answers over v1alpha", async () => {
    const alpha = createClient(v1alpha.ServerReflection, transport);
    const answers = [];
    for await (const answer of alpha.serverReflectionInfo(
      toStream([
        { host: "h", messageRequest: { case: "listServices", value: "" } },
        { messageRequest: { case: "fileContainingSymbol", value: "aaos.v1.TaskService" } },
      ] satisfies MessageInitShape<typeof v1alpha.ServerReflectionRequestSchema>[]),
    )) {
      answers.push(answer);
    }

    expect(answers[0]?.$typeName).toBe("grpc.reflection.v1alpha.ServerReflectionResponse");
    expect(answers[0]?.validHost).toBe("h");
    expect(answers[0]?.originalRequest?.messageRequest).toEqual({ case: "listServices", value: "" });
    expect(answers[0]?.messageResponse.case).toBe("listServicesResponse");
    expect(answers[1]?.messageResponse.case).toBe("fileDescriptorResponse");
  });
});
