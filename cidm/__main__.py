from cidm.cli import main

raise SystemExit(main())
