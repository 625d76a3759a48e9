/// A small client for the HealthAgent gRPC service (healthagent.v1), shaped like the seed app's
/// `RealtimeHealthAgentService`: listen to [HealthAgentService.messages] and
/// [HealthAgentService.status], then `start`, `sendMessage` and `stop`.
library;

import 'dart:async';
import 'dart:convert';

import 'package:grpc/grpc.dart';

import 'src/generated/healthagent/v1/health_agent.pbgrpc.dart';

export 'src/generated/healthagent/v1/health_agent.pb.dart'
    show MintSessionResponse, Session, SessionKind, ToolCall;

/// Who a [ChatMessage] is from. [notice] carries upstream notices that are not part of the answer.
enum ChatRole { user, assistant, notice }

/// One chat message. Assistant text arrives as several partial messages with the same [itemId]
/// (each holding all text so far) followed by one complete message.
class ChatMessage {
  const ChatMessage(
      {required this.role, required this.content, this.itemId = '', this.isPartial = false});

  final ChatRole role;
  final String content;
  final String itemId;
  final bool isPartial;

  @override
  String toString() => '${role.name}: $content';
}

enum ConnectionPhase { disconnected, ready, responding, awaitingToolOutput, error }

/// The service's state; [detail] is progress text while responding, or a readable error.
class ConnectionStatus {
  const ConnectionStatus(this.phase, {this.detail, this.grpcCode});

  final ConnectionPhase phase;
  final String? detail;
  final int? grpcCode;

  bool get isError => phase == ConnectionPhase.error;

  @override
  String toString() => detail == null ? phase.name : '${phase.name}: $detail';
}

/// Talks to HealthAgent over gRPC. Turns run one at a time, in the order they were sent, and
/// each continues the conversation named by the previous turn's `session` event. A failed call
/// does not throw from [sendMessage] or [answerToolCall]: it ends the turn and appears on
/// [status]. Only misuse (not started, answering before any conversation) throws [StateError].
class HealthAgentService {
  HealthAgentService({
    this.host = '127.0.0.1',
    this.port = 50051,
    this.secure = false,
    this.authToken,
    this.retryDelay = const Duration(milliseconds: 500),
  });

  final String host;
  final int port;
  final bool secure;

  /// Sent as `authorization: Bearer <token>` on every call when set.
  final String? authToken;

  /// Wait before the single retry of a call that failed UNAVAILABLE before any event.
  final Duration retryDelay;

  final _messages = StreamController<ChatMessage>.broadcast();
  final _status = StreamController<ConnectionStatus>.broadcast();
  final _toolCalls = StreamController<ToolCall>.broadcast();

  ClientChannel? _channel;
  HealthAgentClient? _client;
  ResponseStream<ChatResponse>? _call;
  Future<void> _turns = Future.value();
  int _generation = 0;
  String _user = '';
  String _deviceId = '';
  String? _conversationId;

  Stream<ChatMessage> get messages => _messages.stream;
  Stream<ConnectionStatus> get status => _status.stream;

  /// Client tool calls; answer each with [answerToolCall].
  Stream<ToolCall> get toolCalls => _toolCalls.stream;

  /// The conversation the next message continues, once the first reply has started.
  String? get conversationId => _conversationId;

  /// Opens the channel for [user] and starts a new conversation.
  Future<void> start(String user, {String deviceId = ''}) async {
    if (user.isEmpty) throw ArgumentError.value(user, 'user', 'must not be empty');
    await stop();
    _user = user;
    _deviceId = deviceId;
    final credentials = secure ? ChannelCredentials.secure() : ChannelCredentials.insecure();
    final channel = _channel =
        ClientChannel(host, port: port, options: ChannelOptions(credentials: credentials));
    final token = authToken;
    _client = HealthAgentClient(channel,
        options: CallOptions(metadata: {if (token != null) 'authorization': 'Bearer $token'}));
    _emit(const ConnectionStatus(ConnectionPhase.ready));
  }

  /// Sends one user turn; the reply arrives on [messages]. Completes when the turn has ended.
  Future<void> sendMessage(String text) {
    _requireStarted();
    if (text.trim().isEmpty) return Future.value();
    _messages.add(ChatMessage(role: ChatRole.user, content: text));
    return _enqueue(() => ChatRequest(
        message: text, user: _user, deviceId: _deviceId, conversationId: _conversationId));
  }

  /// Answers a [ToolCall] from [toolCalls] with [output] (any JSON-encodable value).
  Future<void> answerToolCall(String callId, Object? output) {
    _requireStarted();
    final outputJson = jsonEncode(output);
    return _enqueue(() => ChatRequest(
          toolOutput: ToolOutput(callId: callId, outputJson: outputJson),
          user: _user,
          deviceId: _deviceId,
          conversationId: _conversationId ??
              (throw StateError('No conversation yet: nothing to answer')),
        ));
  }

  /// Mints a ChatKit client secret for the started user. Errors appear on [status] and are
  /// rethrown as [GrpcError].
  Future<MintSessionResponse> mintSession({int? ttlSeconds, String? version}) async {
    final client = _requireStarted();
    final request = MintSessionRequest(
        user: _user,
        deviceId: _deviceId,
        kind: SessionKind.SESSION_KIND_CHATKIT,
        ttlSeconds: ttlSeconds,
        version: version);
    for (var attempt = 1;; attempt++) {
      try {
        return await client.mintSession(request);
      } on GrpcError catch (e) {
        if (e.code == StatusCode.unavailable && attempt == 1) {
          await Future<void>.delayed(retryDelay);
          continue;
        }
        _emitError(e);
        rethrow;
      }
    }
  }

  /// Cancels any reply in progress and closes the channel. [start] may be called again.
  Future<void> stop() async {
    _generation++;
    _turns = Future.value();
    final call = _call;
    final channel = _channel;
    _call = null;
    _channel = null;
    _client = null;
    _conversationId = null;
    await call?.cancel();
    if (channel == null) return;
    await channel.shutdown();
    _emit(const ConnectionStatus(ConnectionPhase.disconnected));
  }

  /// Stops and closes the streams; the service cannot be used afterwards.
  Future<void> dispose() async {
    await stop();
    await Future.wait([_messages.close(), _status.close(), _toolCalls.close()]);
  }

  HealthAgentClient _requireStarted() =>
      _client ?? (throw StateError('HealthAgentService is not started'));

  Future<void> _enqueue(ChatRequest Function() build) {
    final generation = _generation;
    final turn = _turns.then<void>((_) async {
      if (generation == _generation) await _runTurn(build());
    });
    _turns = turn.catchError((Object _) {});
    return turn;
  }

  Future<void> _runTurn(ChatRequest request) async {
    final client = _client;
    final generation = _generation;
    if (client == null) return;
    final turn = _Turn();
    for (var attempt = 1;; attempt++) {
      _emit(const ConnectionStatus(ConnectionPhase.responding));
      try {
        final call = _call = client.chat(request);
        await for (final response in call) {
          turn.sawEvent = true;
          _handle(response, turn);
        }
        if (generation != _generation) return;
        _emit(ConnectionStatus(turn.awaitingToolOutput
            ? ConnectionPhase.awaitingToolOutput
            : ConnectionPhase.ready));
        return;
      } on GrpcError catch (e) {
        if (generation != _generation) return; // stopped: the cancel is ours
        if (e.code == StatusCode.unavailable && !turn.sawEvent && attempt == 1) {
          await Future<void>.delayed(retryDelay);
          if (generation != _generation) return;
          continue;
        }
        _emitError(e);
        return;
      } finally {
        if (generation == _generation) _call = null;
      }
    }
  }

  void _handle(ChatResponse response, _Turn turn) {
    switch (response.whichEvent()) {
      case ChatResponse_Event.session:
        final id = response.session.conversationId;
        if (id.isNotEmpty) _conversationId = id;
      case ChatResponse_Event.chunk:
        final chunk = response.chunk;
        final draft = turn.drafts.putIfAbsent(chunk.itemId, StringBuffer.new)..write(chunk.text);
        _messages.add(ChatMessage(
            role: ChatRole.assistant,
            content: draft.toString(),
            itemId: chunk.itemId,
            isPartial: true));
      case ChatResponse_Event.textDone:
        final done = response.textDone;
        turn.drafts.remove(done.itemId);
        _messages
            .add(ChatMessage(role: ChatRole.assistant, content: done.text, itemId: done.itemId));
      case ChatResponse_Event.toolCall:
        _toolCalls.add(response.toolCall);
      case ChatResponse_Event.progress:
        _emit(ConnectionStatus(ConnectionPhase.responding, detail: response.progress.text));
      case ChatResponse_Event.notice:
        final notice = response.notice;
        final text = notice.title.isEmpty ? notice.message : '${notice.title}: ${notice.message}';
        _messages.add(ChatMessage(role: ChatRole.notice, content: text));
      case ChatResponse_Event.responseDone:
        turn.awaitingToolOutput = response.responseDone.awaitingToolOutput;
      case ChatResponse_Event.passthrough: // untyped upstream events: not shown in this client
      case ChatResponse_Event.notSet:
        break;
    }
  }

  void _emit(ConnectionStatus status) {
    if (!_status.isClosed) _status.add(status);
  }

  void _emitError(GrpcError e) => _emit(
      ConnectionStatus(ConnectionPhase.error, detail: describeGrpcError(e), grpcCode: e.code));
}

class _Turn {
  final drafts = <String, StringBuffer>{};
  bool sawEvent = false;
  bool awaitingToolOutput = false;
}

/// A readable description of [e], with the server's stable `ErrorInfo.reason` when it sent one.
String describeGrpcError(GrpcError e) {
  final summary = switch (e.code) {
    StatusCode.invalidArgument => 'The request was rejected as invalid',
    StatusCode.notFound => 'The conversation was not found',
    StatusCode.failedPrecondition => 'The request cannot be served in the current state',
    StatusCode.resourceExhausted => 'Too many requests; try again later',
    StatusCode.unavailable => 'The health agent is unreachable; check the connection',
    StatusCode.deadlineExceeded => 'The health agent took too long to answer',
    StatusCode.unimplemented => 'Not supported by this server',
    StatusCode.unauthenticated => 'Not signed in, or the sign-in has expired',
    StatusCode.permissionDenied => 'Not allowed',
    StatusCode.cancelled => 'The request was cancelled',
    _ => 'The health agent failed',
  };
  final reason = _errorInfoReason(e);
  final message = e.message;
  return [
    '$summary (${e.codeName}${reason == null ? '' : ' $reason'})',
    if (message != null && message.isNotEmpty) message,
  ].join(': ');
}

String? _errorInfoReason(GrpcError e) {
  final details = e.details;
  if (details == null) return null;
  for (final detail in details) {
    if (detail.info_.qualifiedMessageName == 'google.rpc.ErrorInfo') {
      final reason = detail.getField(1); // ErrorInfo.reason
      if (reason is String && reason.isNotEmpty) return reason;
    }
  }
  return null;
}
