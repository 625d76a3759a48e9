import 'dart:async';
import 'dart:convert';

import 'package:grpc/service_api.dart'
    show CallOptions, Client, ClientChannel, ClientMethod, ResponseFuture, ResponseStream;
import 'package:protobuf/well_known_types/google/protobuf/struct.pb.dart' show Value;

import 'channel.dart';
import 'endpoint.dart';
import 'errors.dart';
import 'generated/healthagent/v1/health_agent.pbgrpc.dart';

/// Returns the bearer token for the next call, or null to send none.
///
/// It is called before every call (and every retry), so a short-lived token such as a Supabase
/// access token (one hour) is always current: return the session's token, refreshing it first
/// when it has expired. A JWT's `sub` must be the `user` passed to [HealthAgentService.start];
/// a service may return an API key (`hak_...`) instead.
typedef TokenProvider = FutureOr<String?> Function();

/// Who a [ChatMessage] is from. [notice] carries upstream notices that are not part of the answer.
enum ChatRole {
  /// The end user's own message, as sent.
  user,

  /// The assistant's answer.
  assistant,

  /// An upstream notice for the user (not part of the answer).
  notice,
}

/// One chat message. Assistant text arrives as several partial messages with the same [itemId]
/// (each holding all text so far) followed by one complete message.
class ChatMessage {
  /// A message from [role] with [content].
  const ChatMessage({
    required this.role,
    required this.content,
    this.itemId = '',
    this.isPartial = false,
    this.isIncomplete = false,
  });

  /// Who it is from.
  final ChatRole role;

  /// The text: for a partial message, all text of that message so far.
  final String content;

  /// The assistant message this text belongs to (empty for user messages and notices).
  final String itemId;

  /// More text of this message is coming.
  final bool isPartial;

  /// The turn failed after this text arrived: it is all there will be of this message, and the
  /// answer is cut short (the server's history records it as incomplete too). Show it marked,
  /// or discard it.
  final bool isIncomplete;

  @override
  String toString() => '${role.name}: $content${isIncomplete ? ' [incomplete]' : ''}';
}

/// What the service is doing, as reported on [HealthAgentService.status].
enum ConnectionPhase {
  /// Started, and opening a connection (or reopening one after a failure).
  connecting,

  /// Connected and waiting for a message.
  ready,

  /// A turn is running; the status's detail may carry upstream progress text.
  responding,

  /// The last turn ended with client tool calls: answer them with
  /// [HealthAgentService.answerToolCall].
  awaitingToolOutput,

  /// Stopped, or no connection is open right now (it could not be opened, or it closed while
  /// idle). A started service reopens it on the next call: sending stays possible.
  disconnected,

  /// The last turn failed; see [ConnectionStatus.error].
  error,
}

/// The service's state; [detail] is progress text while responding, or a readable error.
class ConnectionStatus {
  /// A status in [phase].
  const ConnectionStatus(this.phase, {this.detail, this.grpcCode, this.error});

  /// What the service is doing.
  final ConnectionPhase phase;

  /// Progress text while responding, or a readable description of [error].
  final String? detail;

  /// The gRPC status code of [error], when there is one.
  final int? grpcCode;

  /// The failure behind an [ConnectionPhase.error] status (or a failed connection attempt),
  /// with the server's reason, field violations and retry delay.
  final HealthAgentException? error;

  /// Whether the last turn failed.
  bool get isError => phase == ConnectionPhase.error;

  @override
  String toString() => detail == null ? phase.name : '${phase.name}: $detail';
}

/// Talks to HealthAgent over gRPC natively and over gRPC-Web in a browser.
///
/// Listen to [messages], [status] and [toolCalls], then [start], [sendMessage] and [stop].
/// Turns run one at a time, in the order they were sent, and each continues the conversation
/// named by the previous turn's `session` event. A failed turn does not throw from
/// [sendMessage] or [answerToolCall]: it ends the turn and appears on [status]. The other calls
/// ([mintSession], the history calls, [revokeSessions]) throw [HealthAgentException]. Misuse
/// (not started, answering before any conversation) throws [StateError].
///
/// Every call has a deadline ([callTimeout], [chatTimeout]) and carries the token of
/// [tokenProvider]. UNAVAILABLE, and RESOURCE_EXHAUSTED with a `RetryInfo`, are retried up to
/// [maxAttempts] attempts in all, after the server's `RetryInfo` delay or else grpc's
/// backoff; a chat turn only until its first event has arrived.
class HealthAgentService {
  /// A service for [endpoint]; nothing connects until [start].
  HealthAgentService({
    this.endpoint = const HealthAgentEndpoint(),
    this.tokenProvider,
    this.callTimeout = const Duration(seconds: 30),
    this.chatTimeout = const Duration(minutes: 5),
    this.maxAttempts = 3,
    this.maxRetryDelay = const Duration(seconds: 30),
  }) {
    if (maxAttempts < 1) throw ArgumentError.value(maxAttempts, 'maxAttempts', 'must be >= 1');
  }

  /// Where the server is.
  final HealthAgentEndpoint endpoint;

  /// The bearer token for each call (`authorization: Bearer <token>`); null sends none, which
  /// only a server without authentication on a loopback address accepts.
  final TokenProvider? tokenProvider;

  /// Deadline of each attempt of a unary call (mint, history, logout), connecting included.
  final Duration callTimeout;

  /// Deadline of each attempt of a chat turn, from the request to the last event.
  final Duration chatTimeout;

  /// Attempts per call, the first included.
  final int maxAttempts;

  /// A retry that would have to wait longer than this is not made: the error is reported with
  /// its [HealthAgentException.retryDelay] instead.
  final Duration maxRetryDelay;

  final _messages = StreamController<ChatMessage>.broadcast();
  final _status = StreamController<ConnectionStatus>.broadcast();
  // Synchronous, so a listener's answerToolCall is queued before the turn's future completes.
  final _toolCalls = StreamController<ToolCall>.broadcast(sync: true);

  ClientChannel? _channel;
  HealthAgentClient? _client;
  StreamSubscription<LinkState>? _linkSubscription;
  bool _reportsLink = false;
  LinkState _link = LinkState.down;
  ResponseStream<ChatResponse>? _call;
  Future<void> _turns = Future.value();
  bool _inTurn = false;
  int _generation = 0;
  ConnectionStatus? _lastStatus;
  ConnectionPhase _restingPhase = ConnectionPhase.ready;
  String _user = '';
  String _deviceId = '';
  String? _conversationId;

  /// User messages as sent, assistant text as it streams, and notices.
  Stream<ChatMessage> get messages => _messages.stream;

  /// What the service is doing; every change is announced once.
  Stream<ConnectionStatus> get status => _status.stream;

  /// Client tool calls; answer each with [answerToolCall]. Delivered synchronously, so an
  /// answer queued from a listener runs before any message sent after the turn completes.
  Stream<ToolCall> get toolCalls => _toolCalls.stream;

  /// Whether [start] has been called (and [stop] not since).
  bool get isStarted => _client != null;

  /// Whether a connection to the server is open now. Natively this follows the channel's
  /// `onConnectionStateChanged`; on the web, which has no connection state, it is whether the
  /// last call reached the server. A started service reconnects on demand, so do not gate
  /// sending on it.
  bool get isConnected => _client != null && _link == LinkState.up;

  /// The user the service was started for.
  String get user => _user;

  /// The conversation the next message continues, once the first reply has started (or as set
  /// by [start] or [openConversation]).
  String? get conversationId => _conversationId;

  /// Opens the channel for [user] (the end user's id; with a JWT, its `sub`) and checks that the
  /// server answers. Completes once the first connection attempt is over: [isConnected] and
  /// [status] (`ready`, or `disconnected` with the reason) tell how it went. Continues
  /// [conversationId] when given, else starts a new conversation with the first message.
  ///
  /// Throws [ArgumentError] for an empty [user] or an [endpoint] unusable on this platform.
  Future<void> start(String user, {String deviceId = '', String? conversationId}) async {
    if (user.isEmpty) throw ArgumentError.value(user, 'user', 'must not be empty');
    await stop();
    final platform = openChannel(endpoint);
    final generation = _generation;
    _user = user;
    _deviceId = deviceId;
    _conversationId = conversationId;
    _restingPhase = ConnectionPhase.ready;
    _link = LinkState.connecting;
    _channel = platform.channel;
    _client = HealthAgentClient(platform.channel, options: CallOptions(providers: [_authorize]));
    final linkStates = platform.linkStates;
    _reportsLink = linkStates != null;
    _linkSubscription = linkStates?.listen(_onLink);
    _emit(const ConnectionStatus(ConnectionPhase.connecting));
    await _probe(platform.channel, generation);
  }

  /// Makes the next message continue [conversationId] (e.g. one from [listConversations]), or
  /// start a new conversation when null. Call it between turns.
  void openConversation(String? conversationId) {
    _requireStarted();
    _conversationId = conversationId;
  }

  /// Sends one user turn; the reply arrives on [messages]. Completes when the turn has ended
  /// (successfully or not: a failure is reported on [status]), so await it before [stop].
  Future<void> sendMessage(String text) async {
    _requireStarted();
    if (text.trim().isEmpty) return;
    _messages.add(ChatMessage(role: ChatRole.user, content: text));
    return _enqueue(() => ChatRequest(
        message: text, user: _user, deviceId: _deviceId, conversationId: _conversationId));
  }

  /// Answers a [ToolCall] from [toolCalls] with [output] (any JSON-encodable value). The reply
  /// continues on [messages]; completes when that turn has ended.
  Future<void> answerToolCall(String callId, Object? output) async {
    _requireStarted();
    final outputJson = jsonEncode(output);
    return _enqueue(() => ChatRequest(
          toolOutput: ToolOutput(callId: callId, outputJson: outputJson),
          user: _user,
          deviceId: _deviceId,
          conversationId:
              _conversationId ?? (throw StateError('No conversation yet: nothing to answer')),
        ));
  }

  /// Mints a short-lived upstream credential for the started user, for apps that talk to the
  /// upstream directly: a ChatKit session (the default), or with
  /// `kind: SessionKind.SESSION_KIND_REALTIME` a Realtime API `ek_...` secret for
  /// `wss://api.openai.com/v1/realtime`. [ttlSeconds] is 1..600 for ChatKit and 10..7200 for
  /// Realtime; [version] and [stateVariables] (values: String, num or bool; at most 64) apply
  /// to ChatKit only.
  Future<MintSessionResponse> mintSession({
    SessionKind kind = SessionKind.SESSION_KIND_CHATKIT,
    int? ttlSeconds,
    String? version,
    Map<String, Object>? stateVariables,
  }) async {
    _requireStarted();
    final request = MintSessionRequest(
      user: _user,
      deviceId: _deviceId,
      kind: kind,
      ttlSeconds: ttlSeconds,
      version: version,
      stateVariables: stateVariables?.entries
          .map((entry) => MapEntry(entry.key, _stateValue(entry.key, entry.value))),
    );
    return _unary((client, options) => client.mintSession(request, options: options));
  }

  /// A page of the user's conversations, most recently updated first, without messages. Pass
  /// the response's `nextPageToken` as [pageToken] for the next page (empty on the last one).
  Future<ListConversationsResponse> listConversations(
      {int pageSize = 20, String pageToken = ''}) async {
    _requireStarted();
    final request =
        ListConversationsRequest(user: _user, pageSize: pageSize, pageToken: pageToken);
    return _unary((client, options) => client.listConversations(request, options: options));
  }

  /// One of the user's conversations with its messages in order.
  Future<Conversation> getConversation(String conversationId) async {
    _requireStarted();
    final request = GetConversationRequest(user: _user, conversationId: conversationId);
    final response =
        await _unary((client, options) => client.getConversation(request, options: options));
    return response.conversation;
  }

  /// Deletes one of the user's conversations from the history. When it is the current one, the
  /// next message starts a new conversation.
  Future<void> deleteConversation(String conversationId) async {
    _requireStarted();
    final request = DeleteConversationRequest(user: _user, conversationId: conversationId);
    await _unary((client, options) => client.deleteConversation(request, options: options));
    if (_conversationId == conversationId) _conversationId = null;
  }

  /// Exports one of the user's conversations as JSON (the default) or Markdown: the response
  /// has the document, its content type and a file name.
  Future<ExportConversationResponse> exportConversation(String conversationId,
      {ExportFormat format = ExportFormat.EXPORT_FORMAT_JSON}) async {
    _requireStarted();
    final request = ExportConversationRequest(
        user: _user, conversationId: conversationId, format: format);
    return _unary((client, options) => client.exportConversation(request, options: options));
  }

  /// Logout: revokes every upstream session minted for the user (ChatKit sessions cancelled,
  /// Realtime sockets closed, on every replica), so no secret of theirs is handed out again.
  /// Call it before [stop] when the user signs out.
  Future<RevokeSessionsResponse> revokeSessions() async {
    _requireStarted();
    final request = RevokeSessionsRequest(user: _user);
    return _unary((client, options) => client.revokeSessions(request, options: options));
  }

  /// Cancels any reply in progress, ends every call in flight and closes the channel at once
  /// (grpc's `terminate()`); turns still queued are dropped. [start] may be called again.
  Future<void> stop() async {
    _generation++;
    _turns = Future.value();
    _inTurn = false;
    final call = _call;
    final channel = _channel;
    final linkSubscription = _linkSubscription;
    _call = null;
    _channel = null;
    _client = null;
    _linkSubscription = null;
    _link = LinkState.down;
    _conversationId = null;
    await linkSubscription?.cancel();
    if (channel == null) return;
    await call?.cancel();
    await channel.terminate();
    _emit(const ConnectionStatus(ConnectionPhase.disconnected));
  }

  /// Stops and closes the streams; the service cannot be used afterwards.
  Future<void> dispose() async {
    await stop();
    await Future.wait([_messages.close(), _status.close(), _toolCalls.close()]);
  }

  HealthAgentClient _requireStarted() =>
      _client ?? (throw StateError('HealthAgentService is not started'));

  /// The `CallOptions` metadata provider: adds the current token to every call.
  Future<void> _authorize(Map<String, String> metadata, String uri) async {
    final provider = tokenProvider;
    if (provider == null) return;
    String? token;
    try {
      token = await provider();
    } catch (error) {
      // Not UNAVAILABLE (grpc's wrapping of other errors), so it is not retried.
      throw GrpcError.unauthenticated('Could not get a sign-in token: $error');
    }
    if (token != null && token.isNotEmpty) metadata['authorization'] = 'Bearer $token';
  }

  /// Opens the connection with a `grpc.health.v1.Health/Check` call (open to anyone, no token)
  /// and reports the outcome; native connection changes also arrive through [_onLink].
  Future<void> _probe(ClientChannel channel, int generation) async {
    GrpcError? failure;
    var serving = true;
    try {
      serving = await _HealthProbe(channel).check(endpoint.connectTimeout);
    } on GrpcError catch (error) {
      failure = error;
    }
    if (generation != _generation) return;
    // A gRPC-Web gateway that does not forward the health service still answered.
    if (failure == null ||
        failure.code == StatusCode.unimplemented ||
        failure.code == StatusCode.notFound) {
      _onLink(LinkState.up);
      if (!serving) {
        _emit(const ConnectionStatus(ConnectionPhase.disconnected,
            detail: 'The health agent is up but not serving (it may be shutting down)'));
      }
      return;
    }
    if (!_reportsLink) _link = LinkState.down;
    final error = HealthAgentException.fromGrpcError(failure);
    _emit(ConnectionStatus(ConnectionPhase.disconnected,
        detail: error.description, grpcCode: error.code, error: error));
  }

  void _onLink(LinkState state) {
    _link = state;
    if (_inTurn || _client == null) return; // a turn reports its own outcome
    switch (state) {
      case LinkState.connecting:
        _emit(const ConnectionStatus(ConnectionPhase.connecting));
      case LinkState.up:
        _emit(ConnectionStatus(_restingPhase));
      case LinkState.down:
        if (_lastStatus?.phase != ConnectionPhase.disconnected) {
          _emit(const ConnectionStatus(ConnectionPhase.disconnected,
              detail: 'No connection open; the next call opens one'));
        }
    }
  }

  /// On the web, where the transport reports no connection state, a call's outcome does: an
  /// answer from the server (the service's errors always carry `ErrorInfo`) means it is
  /// reachable; UNAVAILABLE or UNKNOWN without it (XHR error, no HTTP status) means it is not;
  /// anything else (a client deadline, a cancel) says nothing.
  void _noteOutcome(GrpcError? failure) {
    if (_reportsLink) return;
    if (failure == null || HealthAgentException.fromGrpcError(failure).reason != null) {
      _onLink(LinkState.up);
    } else if (failure.code == StatusCode.unavailable || failure.code == StatusCode.unknown) {
      _onLink(LinkState.down);
    }
  }

  /// How long to wait before another attempt after [error], or null to give up.
  Duration? _retryDelay(HealthAgentException error, int attempt, Duration? lastBackoff) {
    if (attempt >= maxAttempts || !error.isRetryable) return null;
    final delay = error.retryDelay ?? defaultBackoff(lastBackoff);
    return delay > maxRetryDelay ? null : delay;
  }

  /// Runs a unary call with a deadline per attempt and the server's retry policy.
  Future<T> _unary<T>(
      ResponseFuture<T> Function(HealthAgentClient client, CallOptions options) call) async {
    final client = _requireStarted();
    final generation = _generation;
    Duration? lastBackoff;
    for (var attempt = 1;; attempt++) {
      try {
        final result = await call(client, CallOptions(timeout: callTimeout));
        if (generation == _generation) _noteOutcome(null);
        return result;
      } on GrpcError catch (grpcError, stackTrace) {
        final error = HealthAgentException.fromGrpcError(grpcError);
        if (generation != _generation) Error.throwWithStackTrace(error, stackTrace);
        _noteOutcome(grpcError);
        final delay = _retryDelay(error, attempt, lastBackoff);
        if (delay == null) Error.throwWithStackTrace(error, stackTrace);
        if (error.retryDelay == null) lastBackoff = delay;
        await Future<void>.delayed(delay);
        if (generation != _generation) Error.throwWithStackTrace(error, stackTrace);
      }
    }
  }

  Future<void> _enqueue(ChatRequest Function() build) {
    final generation = _generation;
    final turn = _turns.then<void>((_) async {
      if (generation == _generation) await _runTurn(build(), generation);
    });
    _turns = turn.catchError((Object _) {});
    return turn;
  }

  Future<void> _runTurn(ChatRequest request, int generation) async {
    final client = _client;
    if (client == null) return;
    final turn = _Turn();
    Duration? lastBackoff;
    _inTurn = true;
    try {
      for (var attempt = 1;; attempt++) {
        _emit(const ConnectionStatus(ConnectionPhase.responding));
        try {
          final call = _call = client.chat(request, options: CallOptions(timeout: chatTimeout));
          await for (final response in call) {
            turn.sawEvent = true;
            _handle(response, turn);
          }
          if (generation != _generation) return;
          _noteOutcome(null);
          _restingPhase = turn.awaitingToolOutput
              ? ConnectionPhase.awaitingToolOutput
              : ConnectionPhase.ready;
          _emit(ConnectionStatus(_restingPhase));
          return;
        } on GrpcError catch (grpcError) {
          if (generation != _generation) return; // stopped: the cancel is ours
          _noteOutcome(grpcError);
          final error = HealthAgentException.fromGrpcError(grpcError);
          // Retry only while nothing of this turn has reached the caller.
          final delay = turn.sawEvent ? null : _retryDelay(error, attempt, lastBackoff);
          if (delay != null) {
            if (error.retryDelay == null) lastBackoff = delay;
            _emit(ConnectionStatus(ConnectionPhase.responding,
                detail: 'Retrying in ${(delay.inMilliseconds / 1000).toStringAsFixed(1)} s '
                    '(${error.codeName})'));
            await Future<void>.delayed(delay);
            if (generation != _generation) return;
            continue;
          }
          // Text that arrived before the failure is all there will be of those messages.
          turn.drafts.forEach((itemId, draft) => _messages.add(ChatMessage(
              role: ChatRole.assistant,
              content: draft.toString(),
              itemId: itemId,
              isIncomplete: true)));
          turn.drafts.clear();
          _restingPhase = ConnectionPhase.ready;
          _emit(ConnectionStatus(ConnectionPhase.error,
              detail: error.description, grpcCode: error.code, error: error));
          return;
        } finally {
          if (generation == _generation) _call = null;
        }
      }
    } finally {
      if (generation == _generation) _inTurn = false;
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
    final last = _lastStatus;
    if (last != null &&
        last.phase == status.phase &&
        last.detail == status.detail &&
        identical(last.error, status.error)) {
      return;
    }
    _lastStatus = status;
    if (!_status.isClosed) _status.add(status);
  }
}

class _Turn {
  final drafts = <String, StringBuffer>{};
  bool sawEvent = false;
  bool awaitingToolOutput = false;
}

/// A `state_variables` value: a string, number or boolean.
Value _stateValue(String name, Object value) => switch (value) {
      String text => Value(stringValue: text),
      bool flag => Value(boolValue: flag),
      num number => Value(numberValue: number.toDouble()),
      _ => throw ArgumentError.value(
          value, 'stateVariables[$name]', 'must be a String, num or bool'),
    };

/// `grpc.health.v1.Health/Check` without generated stubs: the messages are one field each, so
/// the bytes are written and read here.
class _HealthProbe extends Client {
  _HealthProbe(super.channel);

  static const _service = 'healthagent.v1.HealthAgent';

  static final _check = ClientMethod<List<int>, List<int>>(
      '/grpc.health.v1.Health/Check', (request) => request, (response) => response);

  /// Whether the server reports the HealthAgent service SERVING.
  Future<bool> check(Duration timeout) async {
    final name = utf8.encode(_service);
    // HealthCheckRequest { string service = 1; }
    final request = <int>[0x0a, name.length, ...name];
    final response =
        await $createUnaryCall(_check, request, options: CallOptions(timeout: timeout));
    // HealthCheckResponse { ServingStatus status = 1; }, SERVING = 1
    return response.length >= 2 && response[0] == 0x08 && response[1] == 1;
  }
}
