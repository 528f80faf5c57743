from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError

from jobs import retention


class Command(BaseCommand):
    help = (
        "Delete finished (succeeded, failed, canceled) jobs older than DAYS with their attempts, images no other"
        " job uses and status mirror entries, in batches. --dry-run only counts."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--older-than", type=int, required=True, metavar="DAYS", help="Age in days (0: all).")
        parser.add_argument("--dry-run", action="store_true", help="Count what would go; delete nothing.")
        parser.add_argument("--batch-size", type=int, default=retention.BATCH, help="Jobs per transaction.")
        parser.add_argument(
            "--pause-ms", type=int, default=0, help="Sleep between batches, to leave the database to live traffic."
        )

    def handle(self, *args, older_than: int, dry_run: bool, batch_size: int, pause_ms: int, **options) -> None:
        if older_than < 0:
            raise CommandError("--older-than must be 0 or more days.")
        if batch_size < 1:
            raise CommandError("--batch-size must be at least 1.")
        if pause_ms < 0:
            raise CommandError("--pause-ms must be 0 or more.")
        counts = retention.purge(
            timedelta(days=older_than), dry_run=dry_run, batch_size=batch_size, pause_s=pause_ms / 1000
        )
        self.stdout.write(f"{'would delete' if dry_run else 'deleted'} {counts}")
