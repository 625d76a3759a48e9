/// Dart client for the HealthAgent gRPC service (`healthagent.v1`), for Flutter apps on every
/// platform: gRPC over HTTP/2 on Android, iOS and desktop, gRPC-Web in the browser.
///
/// [HealthAgentService] has the shape of the seed app's `RealtimeHealthAgentService`: listen to
/// [HealthAgentService.messages] and [HealthAgentService.status], then `start`, `sendMessage`
/// and `stop`. It also mints upstream credentials (ChatKit sessions, Realtime secrets), reads
/// and exports the conversation history, and logs out (`revokeSessions`).
library;

export 'src/channel.dart' show GrpcError, StatusCode;
export 'src/endpoint.dart' show HealthAgentEndpoint;
export 'src/errors.dart' show FieldViolation, HealthAgentException;
export 'src/generated/healthagent/v1/health_agent.pb.dart'
    show
        Conversation,
        ConversationMessage,
        ExportConversationResponse,
        ExportFormat,
        ListConversationsResponse,
        MessageRole,
        MessageStatus,
        MintSessionResponse,
        RevokeSessionsResponse,
        Session,
        SessionKind,
        ToolCall,
        Usage;
export 'src/service.dart'
    show
        ChatMessage,
        ChatRole,
        ConnectionPhase,
        ConnectionStatus,
        HealthAgentService,
        TokenProvider;
