import time

from django.core.management.base import BaseCommand

from workers.fleet.probes import probe_backends


class Command(BaseCommand):
    help = "Probe every enabled Ollama/OpenAI-compatible backend; a down answer counts against its circuit."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--timeout", type=float, default=5.0, help="Seconds per probe.")
        parser.add_argument("--loop", type=float, default=0, metavar="SECONDS", help="Repeat every SECONDS.")

    def handle(self, *args, timeout: float, loop: float, **options) -> None:
        while True:
            for outcome in probe_backends(timeout_s=timeout):
                r = outcome.result
                self.stdout.write(
                    f"{outcome.backend}: {r.status} in {r.latency_ms} ms (circuit {outcome.circuit_state}) {r.detail}"
                )
            if not loop:
                return
            time.sleep(loop)
