"""sae_training.py as torchrun runs it, except that rank 1 finds no checkpoint: what a node without the
run folder's filesystem sees. The ranks must all stop with one error line instead of hanging."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.cli import parse_config, run_main  # noqa: E402
from pipeline.sae.config import TrainConfig  # noqa: E402
from pipeline.sae.training import Trainer  # noqa: E402
from sae_training import main  # noqa: E402

_load = Trainer.load_checkpoint


def load_checkpoint(self, directory):
    return False if os.environ.get("RANK") == "1" else _load(self, directory)


Trainer.load_checkpoint = load_checkpoint
run_main(main, parse_config(TrainConfig, sys.argv[1:], __doc__))
