from cnnvis_pipeline.cli import main

raise SystemExit(main())
