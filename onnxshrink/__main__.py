import sys

from onnxshrink.cli import main

sys.exit(main())
