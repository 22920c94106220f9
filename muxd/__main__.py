# Hold SIGHUP/SIGUSR1/SIGUSR2 before the imports: until muxd's handlers are in
# place their default action would kill it (muxd.signals says more).
from muxd.signals import hold_until_handled

hold_until_handled()

from muxd.cli import main  # noqa: E402

raise SystemExit(main())
