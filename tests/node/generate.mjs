// One pearl.v1.Gateway/Generate call made with @grpc/grpc-js, an independent gRPC
// implementation, the .proto files loaded at run time by @grpc/proto-loader.
//
//   node generate.mjs <proto dir> <address> '<GenerateRequest as JSON>'
//
// Prints one JSON line: {metadata, deltas: [{text, token_ids}], final, error}. `metadata` is
// the initial metadata (headers) the gateway sent; `final` is the Final message (null if none
// came); `error` is {code, code_name, details} when the call ended with a non-OK status.
// Exits 0 whenever the call ran (an RPC error is a result, not a crash).
import path from "node:path";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const [protoDir, address, requestJson] = process.argv.slice(2);
if (!protoDir || !address || !requestJson) {
  console.error("usage: node generate.mjs <proto dir> <address> '<GenerateRequest JSON>'");
  process.exit(2);
}

const definition = protoLoader.loadSync(path.join(protoDir, "pearl/v1/gateway.proto"), {
  keepCase: true,          // field names as the .proto spells them (token_ids, max_tokens)
  longs: String,
  enums: String,
  defaults: false,
  oneofs: true,            // which member of a oneof is set: msg.kind === "delta" | "final"
  includeDirs: [protoDir], // so "pearl/v1/common.proto" resolves
});
const pearl = grpc.loadPackageDefinition(definition).pearl.v1;
const client = new pearl.Gateway(address, grpc.credentials.createInsecure());

const codeName = Object.fromEntries(Object.entries(grpc.status).map(([k, v]) => [v, k]));
const out = { metadata: {}, deltas: [], final: null, error: null };
const deadline = new Date(Date.now() + 60_000);
const call = client.Generate(JSON.parse(requestJson), { deadline });

call.on("metadata", (md) => {
  for (const [k, v] of Object.entries(md.getMap())) out.metadata[k] = String(v);
});
call.on("data", (msg) => {
  if (msg.kind === "delta") {
    out.deltas.push({ text: msg.delta.text ?? "", token_ids: (msg.delta.token_ids ?? []).map(Number) });
  } else if (msg.kind === "final") {
    out.final = { ...msg.final, request_id: msg.request_id };
  }
});
call.on("error", (err) => {
  out.error = { code: err.code, code_name: codeName[err.code] ?? String(err.code), details: err.details };
});
call.on("status", () => {
  // "status" comes after "end" / "error": everything has arrived
  process.stdout.write(JSON.stringify(out) + "\n");
  client.close();
});
