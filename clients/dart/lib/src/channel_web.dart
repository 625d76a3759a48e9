/// Web transport: grpc-dart's gRPC-Web channel over XHR, the only web transport it has.
library;

import 'dart:math';

import 'package:grpc/grpc_web.dart' show GrpcWebClientChannel;

import 'endpoint.dart';

export 'package:grpc/grpc_web.dart' show GrpcError, StatusCode;

/// True: this is the web transport.
const bool isWeb = true;

/// Opens a gRPC-Web channel to `endpoint.webUri` (the server's HTTP listener). The browser owns
/// connections, TLS and keepalive; deadlines are enforced by aborting the request.
PlatformChannel openChannel(HealthAgentEndpoint endpoint) =>
    PlatformChannel(GrpcWebClientChannel.xhr(endpoint.webUri), null);

final _random = Random();

/// The same backoff as grpc's `defaultBackoffStrategy` (1 s, then x1.6 with ±20% jitter, at most
/// 120 s). grpc-dart exports that function only from `package:grpc/grpc.dart`, whose native
/// transport imports `dart:io`, so the web build carries this copy instead.
Duration defaultBackoff(Duration? lastBackoff) {
  const initial = Duration(seconds: 1);
  const maximum = Duration(seconds: 120);
  if (lastBackoff == null) return initial;
  final jitter = _random.nextDouble() * 0.4 - 0.2;
  final next = lastBackoff * (1.6 + jitter);
  return next < maximum ? next : maximum;
}
