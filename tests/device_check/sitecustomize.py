"""Put this folder on PYTHONPATH and every Python process started with it (stage scripts, torchrun ranks)
installs the checks that pipeline/core/device_check.py names in the environment (PIPELINE_DEVICE_CHECK,
PIPELINE_COLLECTIVE_LOG) before it runs anything."""

import os

if os.environ.get("PIPELINE_DEVICE_CHECK") or os.environ.get("PIPELINE_COLLECTIVE_LOG"):
    from pipeline.core.device_check import install_from_env

    install_from_env()
