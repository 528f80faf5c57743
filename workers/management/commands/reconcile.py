import time

from django.core.management.base import BaseCommand

from workers.reconciler import requeue_lost_jobs


class Command(BaseCommand):
    help = "Re-enqueue queued jobs whose RQ entry Redis lost (after a flush or restart). --loop to keep going."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--min-age", type=float, default=5.0, help="Leave jobs younger than this (seconds).")
        parser.add_argument("--loop", type=float, default=0, metavar="SECONDS", help="Repeat every SECONDS.")

    def handle(self, *args, min_age: float, loop: float, **options) -> None:
        while True:
            pushed = requeue_lost_jobs(min_age_s=min_age)
            self.stdout.write(f"re-enqueued {pushed} job(s)")
            if not loop:
                return
            time.sleep(loop)
