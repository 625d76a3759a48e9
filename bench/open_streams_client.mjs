// Load client of the open-streams phase (bench/performance.py): STREAMS `Chat` calls started
// evenly over RAMP seconds, each reading its turn to the end. Prints one JSON line: how many
// were open at once, completed and failed (by status), the chunks received and the latency of
// each chunk from its `[stamp]` (the sender's CLOCK_MONOTONIC, which is also Node's hrtime) to
// its arrival here, and of each call's first event from the moment the call was made (how long
// new calls wait to be taken up).
//
// Why Node: at 10,000 streams this phase measures the machine, and the client shares its 2
// cores with the server and the emulator. A grpc.aio client spends about 100 us of CPU per
// received message, a third of the machine at 10,000 chunks a second; grpc-js about 40.
// Messages are read with a hand-written decoder of the two fields used (no protobuf runtime).
//
//   node bench/open_streams_client.mjs ADDRESS STREAMS RAMP_SECONDS MESSAGE USERS

import { createRequire } from "node:module";

// grpc-js is pinned in tools/package.json and installed there by tests/run
const grpc = createRequire(new URL("../tools/package.json", import.meta.url))("@grpc/grpc-js");

const STREAMS_PER_CHANNEL = 100; // as the Python client (bench/clients.py)
const CHUNK = 2; // ChatResponse.chunk
const RESPONSE_DONE = 7; // ChatResponse.response_done
const TEXT = 1; // Chunk.text, ResponseDone.text

const [address, streamsArg, rampArg, message, usersArg] = process.argv.slice(2);
const streams = Number(streamsArg);
const rampMs = Number(rampArg) * 1000;
const users = Number(usersArg);

function varint(value) {
  const bytes = [];
  while (value > 127) {
    bytes.push((value & 127) | 128);
    value >>>= 7;
  }
  bytes.push(value);
  return bytes;
}

function stringField(number, text) {
  const bytes = Buffer.from(text, "utf8");
  return Buffer.concat([Buffer.from([...varint((number << 3) | 2), ...varint(bytes.length)]), bytes]);
}

// ChatRequest: message = 1, user = 2
const encodeRequest = (request) =>
  Buffer.concat([stringField(1, request.message), stringField(2, request.user)]);

function readVarint(buffer, position) {
  let value = 0;
  let shift = 0;
  let byte;
  do {
    byte = buffer[position++];
    value += (byte & 127) * 2 ** shift;
    shift += 7;
  } while (byte & 128);
  return [value, position];
}

// [start, end) of the first length-delimited field `wanted` in buffer[start, end), or null
function findField(buffer, start, end, wanted) {
  let position = start;
  while (position < end) {
    let key;
    [key, position] = readVarint(buffer, position);
    const wireType = key & 7;
    if (wireType === 2) {
      let length;
      [length, position] = readVarint(buffer, position);
      if (key >>> 3 === wanted) return [position, position + length];
      position += length;
    } else if (wireType === 0) {
      [, position] = readVarint(buffer, position);
    } else if (wireType === 1) {
      position += 8;
    } else if (wireType === 5) {
      position += 4;
    } else {
      throw new Error(`unexpected wire type ${wireType}`);
    }
  }
  return null;
}

// ChatResponse -> {kind, text}: the oneof's field number, and the text of a chunk or the end
function decodeResponse(buffer) {
  if (buffer.length === 0) return { kind: 0, text: "" };
  const [key, start] = readVarint(buffer, 0);
  const kind = key >>> 3;
  if (kind !== CHUNK && kind !== RESPONSE_DONE) return { kind, text: "" };
  const [length, body] = readVarint(buffer, start);
  const text = findField(buffer, body, body + length, TEXT);
  return { kind, text: text ? buffer.toString("utf8", text[0], text[1]) : "" };
}

const channels = [];
for (let index = 0; index < Math.max(1, Math.ceil(streams / STREAMS_PER_CHANNEL)); index++) {
  // a distinct argument per channel, or grpc-js would share one connection among them all
  const options = { "bench.channel": index, "grpc.max_receive_message_length": 4 * 1024 * 1024 };
  channels.push(new grpc.Client(address, grpc.credentials.createInsecure(), options));
}

const latencies = [];
const firstEventLatencies = [];
const errors = {};
let open = 0;
let maxOpen = 0;
let completed = 0;
const fail = (reason) => {
  errors[reason] = (errors[reason] || 0) + 1;
};

function turn(index) {
  return new Promise((resolve) => {
    open += 1;
    maxOpen = Math.max(maxOpen, open);
    const call = channels[index % channels.length].makeServerStreamRequest(
      "/healthagent.v1.HealthAgent/Chat",
      encodeRequest,
      decodeResponse,
      { message, user: `open-${index % users}` },
      new grpc.Metadata(),
      { deadline: Date.now() + 600_000 },
    );
    const texts = [];
    let final = null;
    const began = process.hrtime.bigint();
    let answered = false;
    call.on("data", (event) => {
      if (!answered) {
        answered = true;
        firstEventLatencies.push(Number(process.hrtime.bigint() - began));
      }
      if (event.kind === CHUNK) {
        latencies.push(Number(process.hrtime.bigint() - BigInt(event.text.slice(0, 19))));
        texts.push(event.text);
      } else if (event.kind === RESPONSE_DONE) {
        final = event.text;
      }
    });
    call.on("error", () => {}); // reported with its status below
    call.on("status", (status) => {
      open -= 1;
      if (status.code !== grpc.status.OK) {
        fail(`${grpc.status[status.code]}${status.details ? `: ${status.details}` : ""}`);
      } else if (final === null || final !== texts.join("")) {
        fail("TRUNCATED");
      } else {
        completed += 1;
      }
      resolve();
    });
  });
}

const started = process.hrtime.bigint();
const turns = [];
for (let index = 0; index < streams; index++) {
  const at = (rampMs * index) / streams;
  turns.push(new Promise((resolve) => setTimeout(() => turn(index).then(resolve), at)));
}
await Promise.all(turns);
const seconds = Number(process.hrtime.bigint() - started) / 1e9;
for (const channel of channels) channel.close();

const percentiles = (values) => {
  values.sort((a, b) => a - b);
  const at = (fraction) =>
    values.length
      ? Math.round(values[Math.min(values.length - 1, Math.floor(fraction * values.length))] / 1e3) / 1e3
      : null;
  return { p50_ms: at(0.5), p99_ms: at(0.99), max_ms: at(1), n: values.length };
};
const cpu = process.cpuUsage();
console.log(
  JSON.stringify({
    max_open: maxOpen,
    completed,
    errors,
    chunks: latencies.length,
    chunk_latency: percentiles(latencies),
    first_event_latency: percentiles(firstEventLatencies),
    seconds: Math.round(seconds * 1000) / 1000,
    client_cpu_seconds: (cpu.user + cpu.system) / 1e6,
  }),
);
