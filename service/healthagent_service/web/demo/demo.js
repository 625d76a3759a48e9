// The HealthAgent demo page: gRPC-Web from the browser, with no build step and no dependency.
//
// - A minimal protobuf codec for exactly the messages this page uses (field numbers from
//   protos/healthagent/v1/health_agent.proto and google/rpc/{status,error_details}.proto).
// - Binary gRPC-Web over XHR, read as grpc-dart reads it: `responseText` with the
//   `x-user-defined` charset, decoded into frames on every progress event, so a server stream
//   is shown as it arrives; the status comes from the trailers frame (flag 0x80) or, for a
//   trailers-only answer, from the response headers.
// - Errors show their code, message, `ErrorInfo.reason`, `BadRequest` field violations and
//   `RetryInfo` delay, decoded from `grpc-status-details-bin`.
//
// The chat status element carries what the browser test reads: `data-state`
// (idle/streaming/done/error), `data-chunk-times` (performance.now() of every chunk, in ms) and
// `data-end-time` (when the stream's status arrived).
"use strict";

(() => {
  const SERVICE = "/healthagent.v1.HealthAgent/";
  const DEVICE_ID = "web-demo";
  const utf8Encoder = new TextEncoder();
  const utf8Decoder = new TextDecoder();

  // ---- protobuf ------------------------------------------------------------------------------
  // A schema maps field numbers to [name, type, options]; a type is "string", "bytes", "int",
  // "bool" or another schema. Options: repeated, explicit (a oneof member or an `optional`
  // field: sent even when it holds the default value).

  const Timestamp = { 1: ["seconds", "int"], 2: ["nanos", "int"] };
  const Duration = { 1: ["seconds", "int"], 2: ["nanos", "int"] };
  const ToolOutput = { 1: ["call_id", "string"], 2: ["output_json", "string"] };
  const ChatRequest = {
    1: ["message", "string", { explicit: true }],
    2: ["user", "string"],
    3: ["device_id", "string"],
    4: ["conversation_id", "string", { explicit: true }],
    5: ["tool_output", ToolOutput, { explicit: true }],
  };
  const ToolCall = {
    1: ["call_id", "string"],
    2: ["name", "string"],
    3: ["arguments_json", "string"],
    4: ["item_id", "string"],
  };
  const Usage = { 1: ["input_tokens", "int"], 2: ["output_tokens", "int"], 3: ["total_tokens", "int"] };
  const ChatResponse = {
    1: ["session", { 1: ["session_id", "string"], 2: ["conversation_id", "string"], 3: ["user", "string"], 4: ["workflow_id", "string"] }],
    2: ["chunk", { 1: ["text", "string"], 2: ["item_id", "string"] }],
    3: ["text_done", { 1: ["text", "string"], 2: ["item_id", "string"] }],
    4: ["tool_call", ToolCall],
    5: ["progress", { 1: ["text", "string"], 2: ["icon", "string"] }],
    6: ["notice", { 1: ["level", "int"], 2: ["title", "string"], 3: ["message", "string"] }],
    7: ["response_done", { 1: ["text", "string"], 2: ["usage", Usage], 3: ["awaiting_tool_output", "bool"] }],
    8: ["passthrough", { 1: ["type", "string"], 2: ["json", "string"] }],
  };
  const CHAT_EVENTS = ["session", "chunk", "text_done", "tool_call", "progress", "notice", "response_done", "passthrough"];
  const ConversationMessage = {
    1: ["id", "string"],
    2: ["role", "int"],
    3: ["text", "string"],
    4: ["status", "int"],
    5: ["tool_calls", ToolCall, { repeated: true }],
    6: ["tool_call_id", "string"],
    7: ["usage", Usage],
    8: ["error_reason", "string"],
    9: ["create_time", Timestamp],
    10: ["update_time", Timestamp],
  };
  const Conversation = {
    1: ["id", "string"],
    2: ["user", "string"],
    3: ["upstream", "string"],
    4: ["upstream_id", "string"],
    5: ["title", "string"],
    6: ["create_time", Timestamp],
    7: ["update_time", Timestamp],
    8: ["messages", ConversationMessage, { repeated: true }],
  };
  const ListConversationsRequest = { 1: ["user", "string"], 2: ["page_size", "int"], 3: ["page_token", "string"] };
  const ListConversationsResponse = { 1: ["conversations", Conversation, { repeated: true }], 2: ["next_page_token", "string"] };
  const ConversationRequest = { 1: ["user", "string"], 2: ["conversation_id", "string"] };
  const GetConversationResponse = { 1: ["conversation", Conversation] };
  const ExportConversationRequest = { 1: ["user", "string"], 2: ["conversation_id", "string"], 3: ["format", "int"] };
  const ExportConversationResponse = { 1: ["content_type", "string"], 2: ["filename", "string"], 3: ["content", "string"] };
  const Empty = {};
  // google.rpc
  const Any = { 1: ["type_url", "string"], 2: ["value", "bytes"] };
  const RpcStatus = { 1: ["code", "int"], 2: ["message", "string"], 3: ["details", Any, { repeated: true }] };
  const ErrorInfo = {
    1: ["reason", "string"],
    2: ["domain", "string"],
    3: ["metadata", { 1: ["key", "string"], 2: ["value", "string"] }, { repeated: true }],
  };
  const BadRequest = {
    1: ["field_violations", { 1: ["field", "string"], 2: ["description", "string"], 3: ["reason", "string"] }, { repeated: true }],
  };
  const RetryInfo = { 1: ["retry_delay", Duration] };

  class Writer {
    constructor() {
      this.bytes = [];
    }
    varint(value) {
      if (!Number.isSafeInteger(value) || value < 0) {
        throw new RangeError(`cannot encode ${value} as a varint here`);
      }
      while (value > 127) {
        this.bytes.push((value % 128) | 128);
        value = Math.floor(value / 128);
      }
      this.bytes.push(value);
    }
    tag(field, wireType) {
      this.varint(field * 8 + wireType);
    }
    lengthDelimited(field, bytes) {
      this.tag(field, 2);
      this.varint(bytes.length);
      for (const byte of bytes) this.bytes.push(byte);
    }
  }

  function encode(schema, message) {
    const writer = new Writer();
    const fields = Object.keys(schema).map(Number).sort((a, b) => a - b);
    for (const field of fields) {
      const [name, type, options = {}] = schema[field];
      const value = message[name];
      if (value === undefined || value === null) continue;
      for (const item of options.repeated ? value : [value]) {
        if (type === "string") {
          if (item === "" && !options.explicit) continue;
          writer.lengthDelimited(field, utf8Encoder.encode(item));
        } else if (type === "bytes") {
          writer.lengthDelimited(field, item);
        } else if (type === "int" || type === "bool") {
          const number = Number(item);
          if (number === 0 && !options.explicit) continue;
          writer.tag(field, 0);
          writer.varint(number);
        } else {
          writer.lengthDelimited(field, encode(type, item));
        }
      }
    }
    return Uint8Array.from(writer.bytes);
  }

  class Reader {
    constructor(bytes) {
      this.bytes = bytes;
      this.pos = 0;
    }
    varint() {
      let value = 0;
      let scale = 1;
      for (;;) {
        if (this.pos >= this.bytes.length) throw new Error("truncated varint");
        const byte = this.bytes[this.pos++];
        value += (byte & 0x7f) * scale;
        if (!(byte & 0x80)) return value;
        scale *= 128;
      }
    }
    take(length) {
      if (this.pos + length > this.bytes.length) throw new Error("truncated field");
      const slice = this.bytes.subarray(this.pos, this.pos + length);
      this.pos += length;
      return slice;
    }
    skip(wireType) {
      if (wireType === 0) this.varint();
      else if (wireType === 1) this.take(8);
      else if (wireType === 2) this.take(this.varint());
      else if (wireType === 5) this.take(4);
      else throw new Error(`unsupported wire type ${wireType}`);
    }
  }

  function defaults(schema) {
    const message = {};
    for (const [name, type, options = {}] of Object.values(schema)) {
      if (options.repeated) message[name] = [];
      else if (type === "string") message[name] = "";
      else if (type === "bytes") message[name] = new Uint8Array(0);
      else if (type === "int") message[name] = 0;
      else if (type === "bool") message[name] = false;
      else message[name] = null; // an unset message (or oneof member)
    }
    return message;
  }

  function decode(schema, bytes) {
    const reader = new Reader(bytes);
    const message = defaults(schema);
    while (reader.pos < bytes.length) {
      const key = reader.varint();
      const field = Math.floor(key / 8);
      const wireType = key % 8;
      const spec = schema[field];
      if (!spec) {
        reader.skip(wireType); // unknown: skipped, as protobuf does
        continue;
      }
      const [name, type, options = {}] = spec;
      let value;
      if (type === "int" || type === "bool") {
        if (wireType === 2) throw new Error(`packed ${name} is not expected`);
        value = reader.varint();
        if (value >= 2 ** 63) value -= 2 ** 64; // a negative int32/int64
        if (type === "bool") value = value !== 0;
      } else {
        if (wireType !== 2) throw new Error(`field ${name} has wire type ${wireType}`);
        const data = reader.take(reader.varint());
        if (type === "string") value = utf8Decoder.decode(data);
        else if (type === "bytes") value = data.slice();
        else value = decode(type, data);
      }
      if (options.repeated) message[name].push(value);
      else message[name] = value;
    }
    return message;
  }

  function timestampToDate(timestamp) {
    return timestamp ? new Date(timestamp.seconds * 1000 + Math.floor(timestamp.nanos / 1e6)) : null;
  }

  // ---- gRPC-Web over XHR ---------------------------------------------------------------------

  const CODES = [
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
    "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
  ];
  // gRPC's mapping of an HTTP status without grpc-status (doc/http-grpc-status-mapping.md)
  const HTTP_CODES = { 400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14 };

  class GrpcError extends Error {
    constructor(code, message, details) {
      super(message);
      this.code = code;
      this.codeName = CODES[code] || `code ${code}`;
      this.details = details || { reason: "", domain: "", metadata: {}, violations: [], retrySeconds: null };
    }
  }

  function base64ToBytes(text) {
    const clean = text.replace(/\s+/g, "").replace(/-/g, "+").replace(/_/g, "/");
    const binary = atob(clean + "=".repeat((4 - (clean.length % 4)) % 4));
    return Uint8Array.from(binary, (char) => char.charCodeAt(0));
  }

  function decodeDetails(value) {
    const details = { reason: "", domain: "", metadata: {}, violations: [], retrySeconds: null };
    if (!value) return details;
    try {
      const status = decode(RpcStatus, base64ToBytes(value));
      for (const any of status.details) {
        const type = any.type_url.slice(any.type_url.lastIndexOf("/") + 1);
        if (type === "google.rpc.ErrorInfo") {
          const info = decode(ErrorInfo, any.value);
          details.reason = info.reason;
          details.domain = info.domain;
          for (const entry of info.metadata) details.metadata[entry.key] = entry.value;
        } else if (type === "google.rpc.BadRequest") {
          for (const violation of decode(BadRequest, any.value).field_violations) {
            details.violations.push({ field: violation.field, description: violation.description });
          }
        } else if (type === "google.rpc.RetryInfo") {
          const delay = decode(RetryInfo, any.value).retry_delay;
          if (delay) details.retrySeconds = delay.seconds + delay.nanos / 1e9;
        }
      }
    } catch (error) {
      console.warn("grpc-status-details-bin does not decode", error);
    }
    return details;
  }

  function parseHeaderBlock(text) {
    const headers = {};
    for (const line of text.split(/\r?\n/)) {
      const colon = line.indexOf(":");
      if (colon > 0) headers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
    }
    return headers;
  }

  function percentDecode(text) {
    try {
      return decodeURIComponent(text);
    } catch {
      return text;
    }
  }

  // Calls `method` with the encoded request; `onMessage(bytes)` runs for every message as it
  // arrives. Returns { promise, abort }: the promise resolves with the messages when the status
  // is OK and rejects with a GrpcError otherwise.
  function grpcWeb(method, requestBytes, { token, timeoutSeconds, onMessage } = {}) {
    const xhr = new XMLHttpRequest();
    const messages = [];
    let received = new Uint8Array(1024);
    let receivedLength = 0; // bytes of `received` in use
    let consumedChars = 0; // characters of responseText already copied into `received`
    let frameStart = 0; // first byte of `received` not yet decoded into a frame
    let trailers = null;
    let failure = null;

    function readFrames() {
      const text = xhr.responseText || "";
      if (text.length > consumedChars) {
        const needed = receivedLength + text.length - consumedChars;
        if (needed > received.length) {
          const grown = new Uint8Array(Math.max(needed, received.length * 2));
          grown.set(received.subarray(0, receivedLength));
          received = grown;
        }
        for (let i = consumedChars; i < text.length; i++) received[receivedLength++] = text.charCodeAt(i) & 0xff;
        consumedChars = text.length;
      }
      while (!failure && receivedLength - frameStart >= 5) {
        const flags = received[frameStart];
        const length =
          ((received[frameStart + 1] << 24) >>> 0) +
          (received[frameStart + 2] << 16) +
          (received[frameStart + 3] << 8) +
          received[frameStart + 4];
        if (receivedLength - frameStart - 5 < length) break;
        const data = received.slice(frameStart + 5, frameStart + 5 + length);
        frameStart += 5 + length;
        if (flags & 0x80) {
          trailers = parseHeaderBlock(utf8Decoder.decode(data));
        } else if (flags & 0x01) {
          failure = new GrpcError(13, "the server sent a compressed message, which this page does not read");
          xhr.abort();
        } else {
          messages.push(data);
          if (onMessage) {
            try {
              onMessage(data);
            } catch (error) {
              failure = new GrpcError(13, `a message did not decode: ${error.message}`);
              xhr.abort();
            }
          }
        }
      }
    }

    const promise = new Promise((resolve, reject) => {
      xhr.open("POST", SERVICE + method);
      xhr.setRequestHeader("content-type", "application/grpc-web+proto");
      xhr.setRequestHeader("x-grpc-web", "1");
      xhr.setRequestHeader("x-user-agent", "healthagent-demo/0.1");
      if (token) xhr.setRequestHeader("authorization", `Bearer ${token}`);
      if (timeoutSeconds) xhr.setRequestHeader("grpc-timeout", `${Math.ceil(timeoutSeconds)}S`);
      xhr.responseType = "text";
      xhr.overrideMimeType("text/plain; charset=x-user-defined");
      xhr.onprogress = readFrames;
      xhr.onload = () => {
        readFrames();
        if (failure) return reject(failure);
        const headers = parseHeaderBlock(xhr.getAllResponseHeaders());
        const status = trailers || ("grpc-status" in headers ? headers : null);
        if (!status) {
          const code = xhr.status === 200 ? 2 : HTTP_CODES[xhr.status] || 2;
          const why = xhr.status === 200 ? "the response ended without a gRPC status" : `HTTP ${xhr.status}`;
          return reject(new GrpcError(code, why));
        }
        const code = Number(status["grpc-status"]);
        if (code === 0) return resolve(messages);
        reject(
          new GrpcError(
            code,
            percentDecode(status["grpc-message"] || ""),
            decodeDetails(status["grpc-status-details-bin"]),
          ),
        );
      };
      xhr.onerror = () => reject(new GrpcError(14, "the connection failed"));
      xhr.onabort = () => reject(failure || new GrpcError(1, "cancelled"));
      const body = new Uint8Array(5 + requestBytes.length);
      const length = requestBytes.length;
      body.set([0, (length >>> 24) & 0xff, (length >>> 16) & 0xff, (length >>> 8) & 0xff, length & 0xff]);
      body.set(requestBytes, 5);
      xhr.send(body);
    });
    return { promise, abort: () => xhr.abort() };
  }

  async function unary(method, requestSchema, request, responseSchema) {
    const call = grpcWeb(method, encode(requestSchema, request), { token: state.token, timeoutSeconds: 30 });
    const messages = await call.promise;
    if (messages.length !== 1) throw new GrpcError(13, `expected one message, got ${messages.length}`);
    return decode(responseSchema, messages[0]);
  }

  // ---- the page ------------------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);
  const state = {
    token: "",
    user: "",
    conversationId: "",
    call: null, // the Chat call in progress
    pendingToolCall: null,
    nextPageToken: "",
  };

  function element(tag, attributes, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (value !== undefined && value !== null) node.setAttribute(name, value);
    }
    for (const child of children) node.append(child);
    return node;
  }

  function showError(error) {
    const box = $("error");
    $("error-violations").replaceChildren();
    if (error instanceof GrpcError) {
      $("error-summary").textContent = `${error.codeName}: ${error.message || "(no message)"}`;
      const details = error.details;
      const parts = [];
      if (details.reason) parts.push(`Reason: ${details.reason}`);
      if (details.retrySeconds !== null) parts.push(`retry after ${details.retrySeconds} s`);
      $("error-reason").textContent = parts.join("; ");
      box.dataset.code = error.codeName;
      box.dataset.reason = details.reason;
      for (const violation of details.violations) {
        $("error-violations").append(
          element("li", { "data-field": violation.field }, `${violation.field}: ${violation.description}`),
        );
      }
    } else {
      $("error-summary").textContent = String(error && error.message ? error.message : error);
      $("error-reason").textContent = "";
      box.dataset.code = "";
      box.dataset.reason = "";
    }
    box.hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
  }

  function setConversation(id) {
    state.conversationId = id;
    $("conversation-id").textContent = id || "new";
  }

  // ---- sign in -------------------------------------------------------------------------------

  async function signIn(event) {
    event.preventDefault();
    clearError();
    const token = $("token").value.trim();
    const user = $("user").value;
    const previous = { token: state.token, user: state.user };
    state.token = token;
    state.user = user;
    try {
      await refreshConversations(); // proves the token and the user id work
    } catch (error) {
      Object.assign(state, previous);
      $("signed-in").textContent = "";
      showError(error);
      return;
    }
    if (user !== previous.user) {
      setConversation("");
      $("transcript").replaceChildren();
      hideToolCall();
    }
    $("signed-in").textContent = `Signed in as ${user}${token ? " with a token" : " without a token"}.`;
    $("sign-out-button").hidden = false;
    $("app").hidden = false;
    $("message").focus();
  }

  function signOut() {
    if (state.call) state.call.abort();
    Object.assign(state, { token: "", user: "", conversationId: "", pendingToolCall: null, nextPageToken: "" });
    $("token").value = "";
    $("app").hidden = true;
    $("sign-out-button").hidden = true;
    $("signed-in").textContent = "Signed out.";
    $("transcript").replaceChildren();
    $("conversations").replaceChildren();
    $("conversation-view").hidden = true;
    $("export-view").hidden = true;
    setConversation("");
    hideToolCall();
    clearError();
  }

  // ---- chat ----------------------------------------------------------------------------------

  function setChatState(name, text) {
    const status = $("chat-status");
    status.dataset.state = name;
    status.textContent = text;
  }

  function hideToolCall() {
    state.pendingToolCall = null;
    $("tool-call").hidden = true;
  }

  // Sample data for `get_health_data`: deterministic, shaped by the call's arguments.
  function sampleHealthData(argumentsJson) {
    let args = {};
    try {
      args = JSON.parse(argumentsJson || "{}") || {};
    } catch {
      args = {};
    }
    const metric = typeof args.metric === "string" ? args.metric : "steps";
    const days = Math.min(Math.max(Math.floor(Number(args.days)) || 7, 1), 31);
    const units = { steps: "count", heart_rate: "bpm", sleep: "hours", weight: "kg" };
    const base = { steps: 8000, heart_rate: 62, sleep: 7, weight: 70 }[metric] ?? 100;
    const spread = Math.max(1, Math.round(base / 5));
    const today = new Date();
    const values = [];
    for (let i = days - 1; i >= 0; i--) {
      const day = new Date(Date.UTC(today.getUTCFullYear(), today.getUTCMonth(), today.getUTCDate() - i));
      values.push({ date: day.toISOString().slice(0, 10), value: base + ((i * 7919) % spread) });
    }
    return { metric, unit: units[metric] || "", values };
  }

  function showToolCall(call) {
    state.pendingToolCall = call;
    $("tool-call-name").textContent = call.name;
    $("tool-call-arguments").textContent = call.arguments_json;
    fillSample();
    $("tool-call").hidden = false;
  }

  function fillSample() {
    const call = state.pendingToolCall;
    const answer = call && call.name === "get_health_data" ? sampleHealthData(call.arguments_json) : {};
    $("tool-output").value = JSON.stringify(answer, null, 2);
  }

  // Runs one Chat turn: `input` is { message } or { tool_output }.
  function chat(input) {
    if (state.call) return;
    clearError();
    const request = { ...input, user: state.user, device_id: DEVICE_ID };
    if (state.conversationId) request.conversation_id = state.conversationId;
    const transcript = $("transcript");
    const sent =
      input.message !== undefined
        ? element("li", { "data-role": "user" }, input.message)
        : element("li", { "data-role": "tool" }, input.tool_output.output_json);
    transcript.append(sent);
    const chunkTimes = [];
    const answers = new Map(); // item_id -> its <li>
    let turnText = "";
    const status = $("chat-status");
    status.dataset.chunkTimes = "";
    status.dataset.endTime = "";
    status.dataset.chunks = "0";
    setChatState("streaming", "Streaming\u2026");
    $("progress").textContent = "";
    $("send").disabled = true;
    $("send-tool-output").disabled = true;
    $("stop").disabled = false;
    hideToolCall();

    function answerFor(itemId) {
      let node = answers.get(itemId);
      if (!node) {
        node = element("li", { "data-role": "assistant", "data-item-id": itemId, "aria-busy": "true" });
        answers.set(itemId, node);
        transcript.append(node);
      }
      return node;
    }

    function onMessage(bytes) {
      const response = decode(ChatResponse, bytes);
      const kind = CHAT_EVENTS.find((name) => response[name] !== null);
      const event = response[kind];
      if (kind === "session") {
        setConversation(event.conversation_id);
      } else if (kind === "chunk") {
        chunkTimes.push(performance.now());
        status.dataset.chunkTimes = chunkTimes.map((t) => t.toFixed(1)).join(",");
        status.dataset.chunks = String(chunkTimes.length);
        answerFor(event.item_id).textContent += event.text;
        turnText += event.text;
      } else if (kind === "text_done") {
        const node = answerFor(event.item_id);
        node.textContent = event.text;
        node.removeAttribute("aria-busy");
      } else if (kind === "tool_call") {
        transcript.append(
          element("li", { "data-role": "notice" }, `The assistant asks for ${event.name}(${event.arguments_json}).`),
        );
        showToolCall(event);
      } else if (kind === "progress") {
        $("progress").textContent = event.text;
      } else if (kind === "notice") {
        const title = event.title ? `${event.title}: ` : "";
        transcript.append(element("li", { "data-role": "notice", "data-level": String(event.level) }, title + event.message));
      } else if (kind === "response_done") {
        if (!turnText && event.text && answers.size === 0) answerFor("").textContent = event.text;
        for (const node of answers.values()) node.removeAttribute("aria-busy");
        status.dataset.awaitingToolOutput = String(event.awaiting_tool_output);
      }
      // passthrough: upstream events this page has no use for
    }

    const call = grpcWeb("Chat", encode(ChatRequest, request), { token: state.token, onMessage });
    state.call = call;
    call.promise
      .then(
        () => {
          status.dataset.endTime = performance.now().toFixed(1);
          setChatState("done", "Done");
          refreshConversations().catch(showError);
        },
        (error) => {
          status.dataset.endTime = performance.now().toFixed(1);
          for (const node of answers.values()) {
            node.removeAttribute("aria-busy");
            node.dataset.status = "incomplete";
          }
          if (error.code === 3) sent.dataset.status = "failed"; // refused: not part of the conversation
          setChatState("error", error.code === 1 ? "Stopped" : "Failed");
          if (error.code !== 1) showError(error);
          if (state.conversationId) refreshConversations().catch(() => {});
        },
      )
      .finally(() => {
        state.call = null;
        $("progress").textContent = "";
        $("send").disabled = false;
        $("send-tool-output").disabled = false;
        $("stop").disabled = true;
      });
  }

  function sendMessage(event) {
    event.preventDefault();
    const text = $("message").value;
    if (!text.trim() || state.call) return;
    $("message").value = "";
    chat({ message: text });
  }

  function sendToolOutput() {
    const call = state.pendingToolCall;
    if (!call || state.call) return;
    const output = $("tool-output").value;
    chat({ tool_output: { call_id: call.call_id, output_json: output } });
    // a refused answer (INVALID_ARGUMENT) leaves the call pending: show it again to correct
    if (state.call) {
      state.call.promise.catch((error) => {
        if (error.code === 3) {
          showToolCall(call);
          $("tool-output").value = output;
        }
      });
    }
  }

  // ---- history -------------------------------------------------------------------------------

  async function refreshConversations(more) {
    const request = { user: state.user, page_size: 20, page_token: more ? state.nextPageToken : "" };
    const page = await unary("ListConversations", ListConversationsRequest, request, ListConversationsResponse);
    const list = $("conversations");
    if (!more) list.replaceChildren();
    for (const conversation of page.conversations) list.append(conversationItem(conversation));
    state.nextPageToken = page.next_page_token;
    $("more-conversations").hidden = !page.next_page_token;
    $("conversations-empty").hidden = list.children.length > 0;
  }

  function conversationItem(conversation) {
    const title = conversation.title || "Untitled conversation";
    const updated = timestampToDate(conversation.update_time);
    const button = (action, label) =>
      element(
        "button",
        {
          type: "button",
          "data-action": action,
          "data-testid": `${action}-conversation`,
          "aria-label": `${label} ${title} (${conversation.id})`,
        },
        label,
      );
    return element(
      "li",
      { "data-conversation-id": conversation.id, "data-testid": "conversation" },
      element("span", { class: "title" }, title),
      " ",
      element("code", {}, conversation.id),
      " ",
      element("span", { class: "muted" }, updated ? `updated ${updated.toLocaleString()}` : ""),
      " ",
      button("open", "Open"),
      button("export", "Export"),
      button("delete", "Delete"),
    );
  }

  const ROLES = { 1: "user", 2: "assistant", 3: "tool" };
  const STATUSES = { 1: "complete", 2: "incomplete", 3: "failed" };

  async function openConversation(id) {
    const reply = await unary("GetConversation", ConversationRequest, { user: state.user, conversation_id: id }, GetConversationResponse);
    const conversation = reply.conversation;
    const list = $("conversation-messages");
    list.replaceChildren();
    for (const message of conversation.messages) {
      const status = STATUSES[message.status] || "unspecified";
      const node = element("li", { "data-role": ROLES[message.role] || "unspecified", "data-status": status }, message.text);
      for (const call of message.tool_calls) node.append(element("div", { class: "muted" }, `Tool call ${call.name}(${call.arguments_json})`));
      if (status !== "complete") node.append(element("div", { class: "muted" }, `(${status}${message.error_reason ? `: ${message.error_reason}` : ""})`));
      list.append(node);
    }
    $("conversation-view-id").textContent = conversation.id;
    $("conversation-view").dataset.conversationId = conversation.id;
    $("conversation-view").hidden = false;
  }

  let downloadUrl = null;

  async function exportConversation(id) {
    const format = Number($("export-format").value);
    const reply = await unary(
      "ExportConversation",
      ExportConversationRequest,
      { user: state.user, conversation_id: id, format },
      ExportConversationResponse,
    );
    if (downloadUrl) URL.revokeObjectURL(downloadUrl);
    downloadUrl = URL.createObjectURL(new Blob([reply.content], { type: reply.content_type }));
    const link = $("export-download");
    link.href = downloadUrl;
    link.download = reply.filename;
    link.textContent = `Download ${reply.filename}`;
    $("export-filename").textContent = reply.filename;
    $("export-content").textContent = reply.content;
    $("export-view").dataset.conversationId = id;
    $("export-view").hidden = false;
  }

  async function deleteConversation(id) {
    await unary("DeleteConversation", ConversationRequest, { user: state.user, conversation_id: id }, Empty);
    for (const view of ["conversation-view", "export-view"]) {
      if ($(view).dataset.conversationId === id) $(view).hidden = true;
    }
    if (state.conversationId === id) {
      setConversation("");
      hideToolCall();
    }
    await refreshConversations();
  }

  async function onConversationAction(event) {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const id = button.closest("li[data-conversation-id]").dataset.conversationId;
    const actions = { open: openConversation, export: exportConversation, delete: deleteConversation };
    clearError();
    button.disabled = true;
    try {
      await actions[button.dataset.action](id);
    } catch (error) {
      showError(error);
    } finally {
      button.disabled = false;
    }
  }

  function guarded(action) {
    return () => {
      clearError();
      action().catch(showError);
    };
  }

  $("sign-in").addEventListener("submit", signIn);
  $("sign-out-button").addEventListener("click", signOut);
  $("chat-form").addEventListener("submit", sendMessage);
  $("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) sendMessage(event); // Shift+Enter: new line
  });
  $("stop").addEventListener("click", () => state.call && state.call.abort());
  $("send-tool-output").addEventListener("click", sendToolOutput);
  $("fill-sample").addEventListener("click", fillSample);
  $("new-conversation").addEventListener("click", () => {
    setConversation("");
    hideToolCall();
    $("transcript").replaceChildren();
    $("message").focus();
  });
  $("continue-conversation").addEventListener("click", () => {
    setConversation($("conversation-view").dataset.conversationId || "");
    hideToolCall();
    $("transcript").replaceChildren();
    $("message").focus();
  });
  $("refresh-conversations").addEventListener("click", guarded(() => refreshConversations(false)));
  $("more-conversations").addEventListener("click", guarded(() => refreshConversations(true)));
  $("conversations").addEventListener("click", onConversationAction);
  document.documentElement.dataset.ready = "true";
})();
