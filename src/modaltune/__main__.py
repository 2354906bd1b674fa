from modaltune.shared.cli import main

raise SystemExit(main())
