"""``python -m bench``: see :mod:`bench`. ``compare`` does not import torch (fast)."""

import sys

if len(sys.argv) > 1 and sys.argv[1] == "compare":
    from .compare import main as compare_main

    sys.exit(compare_main(sys.argv[2:]))

from .cli import main  # noqa: E402

sys.exit(main())
