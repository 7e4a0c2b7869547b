import sys

from cnnvis_pipeline.bench.bench import main

sys.exit(main())
