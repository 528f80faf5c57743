"""``manage.py send_webhooks``: send webhook deliveries outside a worker.

Every ``rqworker`` already sends them (``WEBHOOK_SENDER_THREADS`` threads). This command is for a
deployment that wants a sender of its own (a host that may reach the internet when the workers may
not, then run with ``WEBHOOK_SENDER_THREADS=0`` on the workers), and ``--burst`` sends what is due
now and exits (an operator after an outage; tests).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from typing import Any

from django.core.management.base import BaseCommand

from webhooks.sender import Sender, send_due


class Command(BaseCommand):
    help = "Send webhook deliveries: those due now (--burst), or continuously until SIGTERM/SIGINT."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--burst", action="store_true", help="Send what is due now, then exit.")
        parser.add_argument(
            "--threads", type=int, default=None, help="Sending threads (default: WEBHOOK_SENDER_THREADS, at least 1)."
        )

    def handle(self, *args: Any, burst: bool = False, threads: int | None = None, **options: Any) -> None:
        name = f"{socket.gethostname()}.{os.getpid()}"
        if burst:
            sent = send_due(worker=name)
            self.stdout.write(f"{sent} attempt(s) made.")
            return
        sender = Sender(name, threads=threads or None)
        if sender.threads <= 0:
            sender = Sender(name, threads=1)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        sender.start()
        self.stdout.write(f"Sending webhooks with {sender.threads} thread(s); SIGTERM or Ctrl-C stops.")
        stop.wait()
        sender.stop()
