from hubcore.cli.main import main

raise SystemExit(main())
