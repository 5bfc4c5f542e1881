"""``python -m gateway``: the gateway alone, configured from ``CLIPCHAT_*`` environment variables."""

from __future__ import annotations

import asyncio

from clipchat import telemetry
from clipchat.settings import Settings
from gateway.app import serve
from gateway.collector import tune_garbage_collector


def main() -> None:
    settings = Settings()
    tune_garbage_collector()
    telemetry.configure("gateway", otlp_endpoint=settings.otlp_endpoint, log_level=settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
