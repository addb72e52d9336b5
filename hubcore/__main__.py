from hubcore.cli import main

raise SystemExit(main())
