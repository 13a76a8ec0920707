from sophon_fast.cli import main

raise SystemExit(main())
