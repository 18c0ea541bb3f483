import {
  create,
  fromBinary,
  toBinary,
  type DescEnum,
  type DescExtension,
  type DescFile,
  type DescMessage,
  type MessageInitShape,
  type MessageShape,
} from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import { Code, type ServiceImpl } from "@connectrpc/connect";
import * as v1 from "../../../gen/grpc/reflection/v1/reflection_pb.js";
import * as v1alpha from "../../../gen/grpc/reflection/v1alpha/reflection_pb.js";

/** Both versions of the gRPC server reflection service, answering from the same descriptors. */
export interface ReflectionServices {
  /** `grpc.reflection.v1.ServerReflection`, used by current grpcurl, Postman and buf curl. */
  readonly v1: ServiceImpl<typeof v1.ServerReflection>;
  /** `grpc.reflection.v1alpha.ServerReflection`, which older clients still ask for first. */
  readonly v1alpha: ServiceImpl<typeof v1alpha.ServerReflection>;
}

/** What the reflection answers are looked up in, built once from the served files. */
interface DescriptorIndex {
  /** Fully qualified names of the services in the served files, in file order. */
  readonly serviceNames: readonly string[];
  /** Every served file and every file they import, by file name. */
  readonly files: ReadonlyMap<string, DescFile>;
  /** Each symbol (types, members, enum values, extensions) to the file that declares it. */
  readonly symbols: ReadonlyMap<string, DescFile>;
  /** Fully qualified names of all messages, nested ones included: the types that can be extended. */
  readonly messageNames: ReadonlySet<string>;
  /** Extensions by `extendee typeName` then field number. */
  readonly extensions: ReadonlyMap<string, ReadonlyMap<number, DescExtension>>;
  /** Serialized FileDescriptorProto per file name, encoded on first use. */
  readonly encoded: Map<string, Uint8Array>;
}

/**
 * Creates the gRPC server reflection service (v1 and v1alpha) for the services declared in
 * `files`, so grpcurl-style tools can call the server without the .proto sources.
 *
 * Every file descriptor answer carries the requested file followed by all the files it imports,
 * transitively (including google/protobuf well-known types), because clients build their
 * descriptor pool from one answer. A request that names something unknown gets an
 * `error_response` with code NOT_FOUND (5) and the stream stays open for the next request.
 */
export function createReflectionServices(files: DescFile[]): ReflectionServices {
  const index = buildIndex(files);
  const answer = (request: v1.ServerReflectionRequest) => answerRequest(index, request);
  return {
    v1: {
      async *serverReflectionInfo(requests) {
        for await (const request of requests) yield answer(request);
      },
    },
    v1alpha: {
      // v1alpha is the same protocol under an older package name: identical messages and field
      // numbers. Re-decoding the wire bytes converts exactly, so one implementation serves both.
      async *serverReflectionInfo(requests) {
        for await (const request of requests) {
          const asV1 = convert(v1alpha.ServerReflectionRequestSchema, v1.ServerReflectionRequestSchema, request);
          yield convert(v1.ServerReflectionResponseSchema, v1alpha.ServerReflectionResponseSchema, answer(asV1));
        }
      },
    },
  };
}

/** Re-reads a message as the equivalent message of another package with the same wire format. */
function convert<From extends DescMessage, To extends DescMessage>(
  from: From,
  to: To,
  message: MessageShape<From>,
): MessageShape<To> {
  return fromBinary(to, toBinary(from, message));
}

type ResponseInit = MessageInitShape<typeof v1.ServerReflectionResponseSchema>;

function answerRequest(
  index: DescriptorIndex,
  request: v1.ServerReflectionRequest,
): v1.ServerReflectionResponse {
  const respond = (messageResponse: ResponseInit["messageResponse"]) =>
    create(v1.ServerReflectionResponseSchema, { validHost: request.host, originalRequest: request, messageResponse });
  const notFound = (what: string) => respond(errorResponse(Code.NotFound, `${what} not found`));
  const withFile = (file: DescFile | undefined, what: string) =>
    file
      ? respond({
          case: "fileDescriptorResponse",
          value: { fileDescriptorProto: withDependencies(file).map((f) => encode(index, f)) },
        })
      : notFound(what);

  const { messageRequest } = request;
  switch (messageRequest.case) {
    case "listServices":
      return respond({
        case: "listServicesResponse",
        value: { service: index.serviceNames.map((name) => ({ name })) },
      });
    case "fileByFilename":
      return withFile(index.files.get(messageRequest.value), `file "${messageRequest.value}"`);
    case "fileContainingSymbol":
      return withFile(index.symbols.get(stripDot(messageRequest.value)), `symbol "${messageRequest.value}"`);
    case "fileContainingExtension": {
      const { containingType, extensionNumber } = messageRequest.value;
      const extension = index.extensions.get(stripDot(containingType))?.get(extensionNumber);
      return withFile(extension?.file, `extension ${extensionNumber} of "${containingType}"`);
    }
    case "allExtensionNumbersOfType": {
      const typeName = stripDot(messageRequest.value);
      // Only a message can be extended; a known message without extensions gets an empty list.
      if (!index.messageNames.has(typeName)) return notFound(`message type "${messageRequest.value}"`);
      return respond({
        case: "allExtensionNumbersResponse",
        value: {
          baseTypeName: typeName,
          extensionNumber: [...(index.extensions.get(typeName)?.keys() ?? [])],
        },
      });
    }
    default:
      return respond(errorResponse(Code.InvalidArgument, "empty reflection request"));
  }
}

function errorResponse(code: Code, message: string): ResponseInit["messageResponse"] {
  // The Connect Code values are the gRPC status numbers that error_code carries.
  return { case: "errorResponse", value: { errorCode: code, errorMessage: message } };
}

/** Clients may send names with the leading dot that descriptors use for fully qualified types. */
function stripDot(name: string): string {
  return name.startsWith(".") ? name.slice(1) : name;
}

/** The file first (clients expect it there), then each file it imports, transitively, once. */
function withDependencies(file: DescFile): DescFile[] {
  const seen = new Map<string, DescFile>();
  const visit = (f: DescFile): void => {
    if (seen.has(f.proto.name)) return;
    seen.set(f.proto.name, f);
    f.dependencies.forEach(visit);
  };
  visit(file);
  return [...seen.values()];
}

function encode(index: DescriptorIndex, file: DescFile): Uint8Array {
  let bytes = index.encoded.get(file.proto.name);
  if (!bytes) {
    bytes = toBinary(FileDescriptorProtoSchema, file.proto);
    index.encoded.set(file.proto.name, bytes);
  }
  return bytes;
}

/**
 * Walks the files and their imports once. A plain walk of the DescFile graph rather than a
 * FileRegistry: protobuf-es registries index types only, while reflection must also resolve
 * methods, fields and enum values to their file.
 */
function buildIndex(served: DescFile[]): DescriptorIndex {
  const files = new Map<string, DescFile>();
  const symbols = new Map<string, DescFile>();
  const messageNames = new Set<string>();
  const extensions = new Map<string, Map<number, DescExtension>>();

  const addSymbol = (name: string, file: DescFile) => {
    if (!symbols.has(name)) symbols.set(name, file);
  };
  const addExtension = (extension: DescExtension) => {
    addSymbol(extension.typeName, extension.file);
    const byNumber = extensions.get(extension.extendee.typeName) ?? new Map<number, DescExtension>();
    byNumber.set(extension.number, extension);
    extensions.set(extension.extendee.typeName, byNumber);
  };
  const addEnum = (desc: DescEnum) => {
    addSymbol(desc.typeName, desc.file);
    // Protobuf scopes enum values beside their enum ("aaos.v1.TASK_TYPE_CODE"); clients also
    // ask for them under the enum ("aaos.v1.TaskType.TASK_TYPE_CODE"). Both resolve.
    const scope = desc.parent?.typeName ?? desc.file.proto.package;
    for (const value of desc.values) {
      addSymbol(`${desc.typeName}.${value.name}`, desc.file);
      addSymbol(scope ? `${scope}.${value.name}` : value.name, desc.file);
    }
  };
  const addMessage = (desc: DescMessage) => {
    addSymbol(desc.typeName, desc.file);
    messageNames.add(desc.typeName);
    for (const field of desc.fields) addSymbol(`${desc.typeName}.${field.name}`, desc.file);
    for (const oneof of desc.oneofs) addSymbol(`${desc.typeName}.${oneof.name}`, desc.file);
    desc.nestedMessages.forEach(addMessage);
    desc.nestedEnums.forEach(addEnum);
    desc.nestedExtensions.forEach(addExtension);
  };
  const addFile = (file: DescFile) => {
    if (files.has(file.proto.name)) return;
    files.set(file.proto.name, file);
    file.messages.forEach(addMessage);
    file.enums.forEach(addEnum);
    file.extensions.forEach(addExtension);
    for (const service of file.services) {
      addSymbol(service.typeName, file);
      for (const method of service.methods) addSymbol(`${service.typeName}.${method.name}`, file);
    }
    file.dependencies.forEach(addFile);
  };
  served.forEach(addFile);

  // Only the served files' services are listed: an imported file's services aren't necessarily served.
  const serviceNames = [...new Set(served.flatMap((file) => file.services.map((s) => s.typeName)))];
  return { serviceNames, files, symbols, messageNames, extensions, encoded: new Map() };
}
