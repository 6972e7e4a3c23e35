"""c5snn: hyperparameter sweeps of a Spikformer-style spiking transformer on CA5 events.

Architecture, in the order data flows: `data` -> `model` -> `train` -> `worker` -> `promote` /
`export`, with `studies` the read side every command shares; `config` (study files) and
`storage` (the database) at the edges, `cli` on top. Library modules know nothing of the CLI.
"""

from c5snn.config import StudyConfig, load_config
from c5snn.errors import C5Error
from c5snn.metrics import compute_metrics
from c5snn.model import SpikingTransformer

__all__ = ["C5Error", "SpikingTransformer", "StudyConfig", "compute_metrics", "load_config"]
__version__ = "0.1.0"
