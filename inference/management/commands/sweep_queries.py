import time

from django.core.management.base import BaseCommand

from inference import events, workers


class Command(BaseCommand):
    help = (
        "End queries stuck on dead workers (failed/worker_lost) and queries no worker took. "
        "Workers run this themselves every SWEEP_INTERVAL_SECONDS; this command is for cron or by hand."
    )

    def add_arguments(self, parser):
        parser.add_argument("--loop", type=float, metavar="SECONDS", help="repeat every SECONDS instead of once")

    def handle(self, *args, loop, **options):
        publisher = events.Publisher()
        while True:
            ended = workers.sweep(publisher=publisher)
            self.stdout.write(
                f"ended {ended['worker_lost']} running on dead workers, {ended['never_taken']} never taken"
            )
            if not loop:
                return
            time.sleep(loop)
