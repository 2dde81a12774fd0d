from ovdistill.cli import main

raise SystemExit(main())
