import 'package:grpc/protos.dart' show BadRequest, ErrorInfo, RetryInfo;

import 'channel.dart' show GrpcError, StatusCode;

/// A failed HealthAgent call, with the `google.rpc` details the server attaches decoded.
///
/// grpc-dart decodes `grpc-status-details-bin` into [GrpcError.details] as typed messages
/// (by their `type.googleapis.com/...` URL, which survives Flutter's
/// `--dart-define=protobuf.omit_message_names=true`); this class picks out the three the
/// server sends: `ErrorInfo` (always), `BadRequest` (INVALID_ARGUMENT) and `RetryInfo`
/// (RESOURCE_EXHAUSTED, UNAVAILABLE).
class HealthAgentException implements Exception {
  HealthAgentException._(
    this.grpcError, {
    required this.reason,
    required this.domain,
    required this.metadata,
    required this.fieldViolations,
    required this.retryDelay,
  });

  /// Decodes [error]'s details.
  factory HealthAgentException.fromGrpcError(GrpcError error) {
    ErrorInfo? info;
    BadRequest? badRequest;
    RetryInfo? retryInfo;
    final details = error.details;
    if (details != null) {
      for (final detail in details) {
        if (detail is ErrorInfo) {
          info ??= detail;
        } else if (detail is BadRequest) {
          badRequest ??= detail;
        } else if (detail is RetryInfo) {
          retryInfo ??= detail;
        }
      }
    }
    return HealthAgentException._(
      error,
      reason: info == null || info.reason.isEmpty ? null : info.reason,
      domain: info == null || info.domain.isEmpty ? null : info.domain,
      metadata: Map<String, String>.unmodifiable(info?.metadata ?? const <String, String>{}),
      fieldViolations: List<FieldViolation>.unmodifiable([
        if (badRequest != null)
          for (final violation in badRequest.fieldViolations)
            FieldViolation(violation.field_1, violation.description),
      ]),
      retryDelay: retryInfo != null && retryInfo.hasRetryDelay()
          ? retryInfo.retryDelay.toDart()
          : null,
    );
  }

  /// The error as grpc-dart reported it.
  final GrpcError grpcError;

  /// `ErrorInfo.reason`: a stable name for the failure (`USER_RATE_LIMITED`,
  /// `CONVERSATION_NOT_FOUND`, ...; the table is in the service's README under "Errors"). Null
  /// when the error did not come from the HealthAgent service (a connection failure, a client
  /// deadline, a proxy).
  final String? reason;

  /// `ErrorInfo.domain`: `healthagent.v1` for the service's own errors.
  final String? domain;

  /// `ErrorInfo.metadata`, e.g. `withdrawn_item_ids` for `OUTPUT_WITHDRAWN`.
  final Map<String, String> metadata;

  /// `BadRequest.field_violations`: which request fields were refused and why.
  final List<FieldViolation> fieldViolations;

  /// `RetryInfo.retry_delay`: how long the server asks the caller to wait before retrying.
  final Duration? retryDelay;

  /// The gRPC status code (see [StatusCode]).
  int get code => grpcError.code;

  /// The status code's name, e.g. `UNAVAILABLE`.
  String get codeName => grpcError.codeName;

  /// The status message.
  String? get message => grpcError.message;

  /// Whether the server's policy allows a retry: UNAVAILABLE, or RESOURCE_EXHAUSTED with a
  /// `RetryInfo` delay (without one it is a size limit that a retry cannot pass).
  bool get isRetryable =>
      code == StatusCode.unavailable ||
      (code == StatusCode.resourceExhausted && retryDelay != null);

  /// A readable one-line description for an app's status line or log.
  String get description {
    final summary = switch (code) {
      StatusCode.invalidArgument => 'The request was rejected as invalid',
      StatusCode.notFound => 'The conversation was not found',
      StatusCode.failedPrecondition => 'The request cannot be served in the current state',
      StatusCode.resourceExhausted => 'Too many requests; try again later',
      StatusCode.unavailable => 'The health agent is unreachable; check the connection',
      StatusCode.deadlineExceeded => 'The health agent took too long to answer',
      StatusCode.unimplemented => 'Not supported by this server',
      StatusCode.unauthenticated => 'Not signed in, or the sign-in has expired',
      StatusCode.permissionDenied => 'Not allowed',
      StatusCode.aborted => 'The request was ended by the server',
      StatusCode.cancelled => 'The request was cancelled',
      _ => 'The health agent failed',
    };
    final text = message;
    return [
      '$summary (${reason == null ? codeName : '$codeName $reason'})',
      if (text != null && text.isNotEmpty) text,
      if (fieldViolations.isNotEmpty) fieldViolations.join('; '),
    ].join(': ');
  }

  @override
  String toString() => 'HealthAgentException: $description';
}

/// One `BadRequest.FieldViolation`: a request field and why it was refused.
class FieldViolation {
  /// A violation of [field] (a dotted path such as `state_variables`) described by
  /// [description].
  const FieldViolation(this.field, this.description);

  /// The refused field.
  final String field;

  /// Why it was refused.
  final String description;

  @override
  String toString() => '$field: $description';
}
