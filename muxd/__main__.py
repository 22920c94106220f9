from muxd.cli import main

raise SystemExit(main())
