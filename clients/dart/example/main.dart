// Talks to a HealthAgent server on 127.0.0.1:50051 (plaintext: loopback), like the seed app's
// RealtimeHealthAgentService example, then lists the user's conversations.
//
// Run from clients/dart: dart run example/main.dart
// A server with authentication needs a token: HEALTHAGENT_TOKEN=<jwt or hak_ key> dart run ...
import 'dart:io';

import 'package:healthagent_client/health_agent_service.dart';

Future<void> main() async {
  final token = Platform.environment['HEALTHAGENT_TOKEN'];
  final service = HealthAgentService(
    endpoint: const HealthAgentEndpoint(host: '127.0.0.1', port: 50051),
    tokenProvider: token == null ? null : () => token,
  );

  // Print complete messages only; partial ones (isPartial) are for live-updating UIs.
  service.messages.where((m) => !m.isPartial).listen((message) => print(message));
  service.status.listen((status) => print('Status: $status'));

  // This client has no tools of its own: answer every tool call with an error object. Each
  // answer is a turn of its own; keep its future so main can wait for it before stopping.
  final answers = <Future<void>>[];
  service.toolCalls.listen((call) {
    answers.add(
        service.answerToolCall(call.callId, {'error': 'tool ${call.name} is not available here'}));
  });

  // Sends a message and waits for its reply and for the replies to any tool answers.
  Future<void> send(String text) async {
    await service.sendMessage(text);
    while (answers.isNotEmpty) {
      final pending = List.of(answers);
      answers.clear();
      await Future.wait(pending); // an answer's reply may ask for another tool
    }
  }

  await service.start('device-123', deviceId: 'device-123');
  if (!service.isConnected) {
    print('Not connected yet; the first message will try again.');
  }
  await send('Hello!');
  // Continues the same conversation (the conversation id came with the first reply).
  await send('What should I eat today?');

  try {
    final page = await service.listConversations(pageSize: 5);
    for (final conversation in page.conversations) {
      print('Conversation ${conversation.id}: ${conversation.title} '
          '(updated ${conversation.updateTime.toDateTime(toLocal: true)})');
    }
  } on HealthAgentException catch (e) {
    print('History unavailable: ${e.description}');
  }

  await service.dispose();
}
