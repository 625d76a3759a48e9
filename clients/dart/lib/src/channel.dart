/// The transport, chosen when the app is compiled: gRPC over HTTP/2 natively, gRPC-Web (XHR) in
/// a browser. Both libraries export the same names: `openChannel`, `defaultBackoff`, `isWeb`,
/// and grpc's `GrpcError` and `StatusCode` (from `package:grpc/grpc.dart` natively and from
/// `package:grpc/grpc_web.dart` on the web, so no web build imports `dart:io` through here).
library;

export 'channel_native.dart' if (dart.library.js_interop) 'channel_web.dart';
