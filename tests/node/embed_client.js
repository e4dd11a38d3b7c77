// A Node.js client built from nothing but the project's .proto, as another team would.
// Usage: node embed_client.js TARGET PROTO_FILE '["text", ...]'
// Prints JSON: {"unary": [[...], ...], "stream": [{"request_id": ..., "vectors": [[...]]}, ...]}
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [target, protoFile, textsJson] = process.argv.slice(2);
const texts = JSON.parse(textsJson);
const definition = protoLoader.loadSync(protoFile, {
  keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true,
});
const v1 = grpc.loadPackageDefinition(definition).bertstream.v1;
const client = new v1.Embedder(target, grpc.credentials.createInsecure());

// A float32 Tensor: shape[0] x shape[1] little-endian floats in `data`.
function decode(tensor) {
  if (tensor.dtype !== "DTYPE_FLOAT32") throw new Error(`unexpected dtype ${tensor.dtype}`);
  const [rows, width] = tensor.shape;
  const buf = tensor.data;
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const out = [];
  for (let r = 0; r < rows; r++) {
    const row = [];
    for (let c = 0; c < width; c++) row.push(view.getFloat32((r * width + c) * 4, true));
    out.push(row);
  }
  return out;
}

function unary() {
  return new Promise((resolve, reject) => {
    client.Embed({ request_id: "unary", texts, pooling: "POOLING_MEAN", normalize: true,
                   dtype: "DTYPE_FLOAT32" },
      (err, response) => (err ? reject(err) : resolve(decode(response.embeddings))));
  });
}

function stream() {
  return new Promise((resolve, reject) => {
    const call = client.EmbedStream();
    const results = [];
    call.on("data", (response) => {
      if (response.error) return reject(new Error(response.error.message));
      results.push({ request_id: response.request_id, vectors: decode(response.embeddings) });
    });
    call.on("error", reject);
    call.on("end", () => resolve(results));
    texts.forEach((text, i) => call.write({ request_id: `node-${i}`, texts: [text] }));
    call.end();
  });
}

(async () => {
  try {
    const result = { unary: await unary(), stream: await stream() };
    process.stdout.write(JSON.stringify(result));
    client.close();
  } catch (err) {
    process.stderr.write(`node client failed: ${err.message}\n`);
    process.exit(1);
  }
})();
