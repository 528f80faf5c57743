import time

from django.core.management.base import BaseCommand

from workers.fleet.reconciler import expire_overdue, reconcile


class Command(BaseCommand):
    help = (
        "Expire jobs past their queue timeout, re-enqueue queued jobs Redis lost and running jobs whose worker"
        " died. --loop to keep going."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--min-age", type=float, default=5.0, help="Leave jobs younger than this (seconds).")
        parser.add_argument("--loop", type=float, default=0, metavar="SECONDS", help="Repeat every SECONDS.")

    def handle(self, *args, min_age: float, loop: float, **options) -> None:
        while True:
            expired = expire_overdue()
            pushed, requeued, failed = reconcile(min_age_s=min_age)
            self.stdout.write(f"expired {expired} job(s) past their queue timeout")
            self.stdout.write(f"re-enqueued {pushed} job(s)")
            self.stdout.write(f"recovered {requeued} running job(s) from lost workers; failed {failed}")
            if not loop:
                return
            time.sleep(loop)
