import 'package:grpc/service_api.dart' show ClientChannel;

/// Where the HealthAgent server is and how to reach it, on every platform.
///
/// Natively (Android, iOS, desktop, the Dart VM) calls go over HTTP/2 gRPC to [host]:[port].
/// In a browser they go over gRPC-Web to [webUrl], the server's HTTP listener
/// (`HEALTHAGENT_HTTP_LISTEN`). One endpoint can name both, so the same app build configuration
/// serves every platform.
class HealthAgentEndpoint {
  /// Describes the server; every argument has a default suited to a server on this machine.
  const HealthAgentEndpoint({
    this.host = '127.0.0.1',
    this.port = 50051,
    this.webUrl,
    this.secure,
    this.connectTimeout = const Duration(seconds: 10),
    this.keepAliveInterval = const Duration(seconds: 30),
    this.keepAliveTimeout = const Duration(seconds: 10),
  });

  /// The gRPC server's host name or IP address (native platforms).
  final String host;

  /// The gRPC server's port (native platforms).
  final int port;

  /// The gRPC-Web base URL used in a browser, such as `https://agent.example.com` or
  /// `http://127.0.0.1:8080`. Scheme, host and port only: grpc-dart resolves the absolute method
  /// path (`/healthagent.v1.HealthAgent/Chat`) against it, so a path prefix would be dropped
  /// silently; [webUri] refuses one. Required on the web, unused elsewhere.
  final String? webUrl;

  /// Whether to use TLS. When null (the default), TLS is used unless the host is a loopback
  /// address (`localhost`, `127.x.x.x`, `::1`). On the web the URL's scheme decides, and a plain
  /// `http` URL to a host that is not loopback needs `secure: false` to be accepted.
  final bool? secure;

  /// How long to wait for a connection: the socket connect timeout natively, and the deadline
  /// of the health check that `HealthAgentService.start` makes on every platform.
  final Duration connectTimeout;

  /// How often a native connection sends HTTP/2 keepalive pings, also between calls; null sends
  /// none. The server accepts pings every 10 seconds or slower, without calls too. Browsers
  /// manage their own connections, so this does not apply on the web.
  final Duration? keepAliveInterval;

  /// How long a native connection waits for a ping's answer before it is dropped.
  final Duration keepAliveTimeout;

  /// Whether native calls use TLS: [secure] when set, else TLS unless [host] is loopback.
  bool get usesTls => secure ?? !isLoopbackHost(host);

  /// [webUrl] parsed and checked; throws [ArgumentError] when it is missing or unusable.
  Uri get webUri {
    final url = webUrl;
    if (url == null) {
      throw ArgumentError.value(url, 'webUrl',
          'is required on the web: the gRPC-Web URL of the server, e.g. http://127.0.0.1:8080');
    }
    final uri = Uri.parse(url);
    if ((uri.scheme != 'http' && uri.scheme != 'https') || uri.host.isEmpty) {
      throw ArgumentError.value(url, 'webUrl', 'must be an absolute http or https URL');
    }
    if ((uri.path.isNotEmpty && uri.path != '/') || uri.hasQuery || uri.hasFragment) {
      throw ArgumentError.value(url, 'webUrl',
          'must have no path, query or fragment: grpc-dart sends every call to '
              '/<service>/<method> at the root of the host and drops any path prefix');
    }
    if (uri.scheme == 'http' && secure != false && !isLoopbackHost(uri.host)) {
      throw ArgumentError.value(url, 'webUrl',
          'is plain http to a host that is not loopback; use https, or pass secure: false');
    }
    return uri;
  }

  @override
  String toString() => webUrl == null
      ? 'HealthAgentEndpoint($host:$port, tls: $usesTls)'
      : 'HealthAgentEndpoint($host:$port, tls: $usesTls, web: $webUrl)';
}

/// Whether [host] names this machine: `localhost`, an IPv4 address in 127.0.0.0/8, or `::1`.
bool isLoopbackHost(String host) {
  final name = host.toLowerCase();
  if (name == 'localhost' || name == '::1' || name == '[::1]') return true;
  final parts = name.split('.');
  return parts.length == 4 &&
      parts.first == '127' &&
      parts.every((part) {
        final value = int.tryParse(part);
        return value != null && value >= 0 && value <= 255;
      });
}

/// What a channel's transport reports about its connection.
enum LinkState {
  /// Connecting, or waiting to reconnect after a failure.
  connecting,

  /// Connected.
  up,

  /// No connection open (idle, failed or shut down); the next call opens one.
  down,
}

/// A channel for the current platform, typed as grpc's platform-neutral [ClientChannel].
class PlatformChannel {
  /// Wraps [channel] and its transport's [linkStates].
  PlatformChannel(this.channel, this.linkStates);

  /// The channel the generated client stubs use.
  final ClientChannel channel;

  /// Connection changes as the transport reports them, or null where it reports none: grpc-dart's
  /// gRPC-Web channel (XHR) has no connection of its own and never emits
  /// `onConnectionStateChanged`, so the web judges connectivity from the calls' outcomes.
  final Stream<LinkState>? linkStates;
}
