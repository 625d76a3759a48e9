// Runs without generated stubs: dart test (from clients/dart).
import 'package:fixnum/fixnum.dart';
import 'package:grpc/grpc.dart';
import 'package:grpc/protos.dart' as rpc;
import 'package:healthagent_client/src/errors.dart';
import 'package:test/test.dart';

void main() {
  test('decodes ErrorInfo, BadRequest and RetryInfo by type', () {
    final error = HealthAgentException.fromGrpcError(GrpcError.custom(
      StatusCode.invalidArgument,
      'bad request',
      [
        rpc.ErrorInfo(
            reason: 'INVALID_REQUEST',
            domain: 'healthagent.v1',
            metadata: {'field': 'user'}.entries),
        rpc.BadRequest(fieldViolations: [
          rpc.BadRequest_FieldViolation(field_1: 'user', description: 'must not be empty'),
        ]),
        rpc.RetryInfo(retryDelay: rpc.Duration(seconds: Int64(2), nanos: 500000000)),
      ],
    ));
    expect(error.reason, 'INVALID_REQUEST');
    expect(error.domain, 'healthagent.v1');
    expect(error.metadata, {'field': 'user'});
    expect(error.fieldViolations.single.field, 'user');
    expect(error.fieldViolations.single.description, 'must not be empty');
    expect(error.retryDelay, const Duration(milliseconds: 2500));
    expect(error.description, contains('INVALID_ARGUMENT INVALID_REQUEST'));
    expect(error.description, contains('user: must not be empty'));
    expect(error.isRetryable, isFalse);
  });

  test('retry policy: UNAVAILABLE always, RESOURCE_EXHAUSTED only with RetryInfo', () {
    HealthAgentException of(int code, [List<rpc.RetryInfo> details = const []]) =>
        HealthAgentException.fromGrpcError(GrpcError.custom(code, null, details));
    expect(of(StatusCode.unavailable).isRetryable, isTrue);
    expect(of(StatusCode.resourceExhausted).isRetryable, isFalse);
    expect(
        of(StatusCode.resourceExhausted, [
          rpc.RetryInfo(retryDelay: rpc.Duration(seconds: Int64(1))),
        ]).isRetryable,
        isTrue);
    expect(of(StatusCode.deadlineExceeded).isRetryable, isFalse);
  });

  test('an error without details (a connection failure) has no reason', () {
    final error = HealthAgentException.fromGrpcError(const GrpcError.unavailable('refused'));
    expect(error.reason, isNull);
    expect(error.fieldViolations, isEmpty);
    expect(error.retryDelay, isNull);
  });
}
