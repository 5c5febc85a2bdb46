from rpfs.cli import main

raise SystemExit(main())
