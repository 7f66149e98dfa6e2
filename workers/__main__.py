from workers.ops.cli import main

raise SystemExit(main())
