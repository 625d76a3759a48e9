// Runs without generated stubs: dart test (from clients/dart).
import 'package:healthagent_client/src/endpoint.dart';
import 'package:test/test.dart';

void main() {
  group('TLS default', () {
    test('is off on loopback only', () {
      expect(const HealthAgentEndpoint(host: '127.0.0.1').usesTls, isFalse);
      expect(const HealthAgentEndpoint(host: 'localhost').usesTls, isFalse);
      expect(const HealthAgentEndpoint(host: '::1').usesTls, isFalse);
      expect(const HealthAgentEndpoint(host: 'agent.example.com').usesTls, isTrue);
      expect(const HealthAgentEndpoint(host: '10.0.2.2').usesTls, isTrue);
      expect(const HealthAgentEndpoint(host: '127.example.com').usesTls, isTrue);
    });

    test('follows an explicit setting', () {
      expect(const HealthAgentEndpoint(host: '10.0.2.2', secure: false).usesTls, isFalse);
      expect(const HealthAgentEndpoint(host: '127.0.0.1', secure: true).usesTls, isTrue);
    });
  });

  group('webUri', () {
    test('accepts a root URL', () {
      expect(const HealthAgentEndpoint(webUrl: 'http://127.0.0.1:8080').webUri.port, 8080);
      expect(const HealthAgentEndpoint(webUrl: 'https://agent.example.com/').webUri.host,
          'agent.example.com');
    });

    test('is required on the web', () {
      expect(() => const HealthAgentEndpoint().webUri, throwsArgumentError);
    });

    test('refuses a path prefix, which grpc-dart would drop', () {
      expect(() => const HealthAgentEndpoint(webUrl: 'https://agent.example.com/grpc').webUri,
          throwsArgumentError);
    });

    test('refuses plain http off loopback unless told', () {
      expect(() => const HealthAgentEndpoint(webUrl: 'http://agent.example.com').webUri,
          throwsArgumentError);
      expect(
          const HealthAgentEndpoint(webUrl: 'http://agent.example.com', secure: false)
              .webUri
              .scheme,
          'http');
    });
  });
}
