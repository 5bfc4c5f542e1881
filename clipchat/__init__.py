"""ClipChat's shared core: settings, database, broker, storage, telemetry and gRPC helpers.

The generated protobuf code lives in ``clipchat.v1`` (built by ``make proto``).
"""
