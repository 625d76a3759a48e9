// Talks to a HealthAgent server on 127.0.0.1:50051 without TLS, like the seed app's
// RealtimeHealthAgentService example. Run from clients/dart: dart run example/main.dart
import 'package:healthagent_client/health_agent_service.dart';

Future<void> main() async {
  final service = HealthAgentService(host: '127.0.0.1', port: 50051, secure: false);

  // Print complete messages only; partial ones (isPartial) are for live-updating UIs.
  service.messages.where((m) => !m.isPartial).listen((message) {
    print('${message.role.name}: ${message.content}');
  });
  service.status.listen((status) => print('Status: $status'));

  // This client has no tools of its own: answer every tool call with an error object.
  service.toolCalls.listen((call) {
    service.answerToolCall(call.callId, {'error': 'tool ${call.name} is not available here'});
  });

  await service.start('device-123', deviceId: 'device-123');
  await service.sendMessage('Hello!');
  // Continues the same conversation (the conversation id came with the first reply).
  await service.sendMessage('What should I eat today?');
  await service.dispose();
}
