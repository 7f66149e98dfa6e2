import signal
import sys

if sys.argv[1:2] == ["run"]:
    # A worker stopped while it is still starting (importing, connecting) has claimed nothing:
    # SIGTERM then ends it with status 0, as it does once `serve` runs (and replaces this with
    # its own handler, which lets the jobs in flight finish). Without this, a stop that came
    # during the imports ended it by the signal (status -15; seen in the chaos test, whose
    # last respawned worker was stopped as the pipeline settled).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))

from workers.cli import main  # after the handler: the imports take a while

raise SystemExit(main())
