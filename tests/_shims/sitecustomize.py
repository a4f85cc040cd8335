"""Put on ``PYTHONPATH`` by the tests for the programs they run: installs the torchvision hook of
``omnisift_torchvision_hook`` (a test-environment measure; see that module)."""

import omnisift_torchvision_hook  # noqa: F401
