/// Native transport: grpc-dart's HTTP/2 `ClientChannel` with TLS, connect timeout and keepalive.
library;

import 'package:grpc/grpc.dart' as grpc;
import 'package:grpc/service_api.dart' show ClientChannel;

import 'endpoint.dart';

export 'package:grpc/grpc.dart' show GrpcError, StatusCode;

/// False: this is the native transport.
const bool isWeb = false;

/// Opens an HTTP/2 channel to `endpoint.host:endpoint.port`. Nothing connects until the first
/// call.
PlatformChannel openChannel(HealthAgentEndpoint endpoint) {
  final interval = endpoint.keepAliveInterval;
  final channel = grpc.ClientChannel(
    endpoint.host,
    port: endpoint.port,
    options: grpc.ChannelOptions(
      credentials: endpoint.usesTls
          ? const grpc.ChannelCredentials.secure()
          : const grpc.ChannelCredentials.insecure(),
      connectTimeout: endpoint.connectTimeout,
      keepAlive: grpc.ClientKeepAliveOptions(
        pingInterval: interval,
        timeout: endpoint.keepAliveTimeout,
        // Pings between calls find a dead connection (a network change, a NAT that forgot it)
        // before the next message waits on it; the server permits them.
        permitWithoutCalls: interval != null,
      ),
    ),
  );
  final ClientChannel abstractChannel = channel;
  return PlatformChannel(
      abstractChannel, abstractChannel.onConnectionStateChanged.map(_linkState));
}

LinkState _linkState(grpc.ConnectionState state) => switch (state) {
      grpc.ConnectionState.connecting ||
      grpc.ConnectionState.transientFailure =>
        LinkState.connecting,
      grpc.ConnectionState.ready => LinkState.up,
      grpc.ConnectionState.idle || grpc.ConnectionState.shutdown => LinkState.down,
    };

/// grpc's own backoff (`defaultBackoffStrategy`: 1 s, then x1.6 with ±20% jitter, at most
/// 120 s), used between retries when the server sent no `RetryInfo`.
Duration defaultBackoff(Duration? lastBackoff) => grpc.defaultBackoffStrategy(lastBackoff);
