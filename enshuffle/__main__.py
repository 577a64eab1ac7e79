from enshuffle.cli import main

raise SystemExit(main())
