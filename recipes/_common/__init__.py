"""Parts shared by the recipes; each recipe stays one readable script.

* :mod:`.config`: a recipe's ``Config`` dataclass, its command line
  (:func:`parse_config`; help text from :func:`option`) and the checks on it.
* :mod:`.data`: :func:`load_data` (offline ``digits``, torchvision sets).
* :mod:`.models`: :func:`make_model` (timm or the papers' small models), losses,
  targets, the parameters as one vector.
* :mod:`.run`: a run's start and finish (:class:`Run`), its resumable stages
  (:class:`Stages`), the environment record and the ``__main__`` (:func:`cli`).
* :mod:`.files`: atomic JSON and checkpoints (with the RNG states).
* :mod:`.verdict`: verdict rows (:func:`claim`) and their table.
* :mod:`.plotting`: Matplotlib on Agg, figures saved atomically.

The recipes import the package as ``import _common as common`` (their own folder
is on the import path when run as ``python recipes/<name>.py``) and use the names
re-exported here.
"""

from .config import (
    DEVICES,
    RunOptions,
    check_choice,
    check_config_basics,
    check_device,
    check_min,
    config_from_dict,
    config_to_dict,
    option,
    parse_config,
    resolve_device,
)
from .data import DATASETS, DataSplit, check_dataset, load_data
from .files import (
    DirLock,
    OutDirBusy,
    load_checkpoint,
    read_json,
    remove_stale_temp_files,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_json,
)
from .models import (
    LOSSES,
    SMALL_MODELS,
    RandomFeatures,
    check_model_name,
    flat_parameters,
    full_batch_loss,
    make_loss,
    make_model,
    make_targets,
    model_wants_flat,
    parity_targets,
    parse_model_kwargs,
    set_flat_parameters,
)
from .plotting import pyplot, save_figure
from .run import (
    SCHEMA_VERSION,
    Diverged,
    Interrupted,
    Run,
    Stages,
    cli,
    environment,
    maybe_interrupt,
    progress_bar,
    results_payload,
    seed_everything,
)
from .verdict import claim, strict_max, strict_min, verdict_table

__all__ = [
    "DATASETS",
    "DEVICES",
    "LOSSES",
    "SCHEMA_VERSION",
    "SMALL_MODELS",
    "RandomFeatures",
    "DataSplit",
    "DirLock",
    "Diverged",
    "Interrupted",
    "OutDirBusy",
    "Run",
    "RunOptions",
    "Stages",
    "check_choice",
    "check_config_basics",
    "check_dataset",
    "check_device",
    "check_min",
    "check_model_name",
    "claim",
    "strict_max",
    "strict_min",
    "cli",
    "config_from_dict",
    "config_to_dict",
    "environment",
    "flat_parameters",
    "full_batch_loss",
    "load_checkpoint",
    "load_data",
    "make_loss",
    "make_model",
    "make_targets",
    "maybe_interrupt",
    "model_wants_flat",
    "option",
    "parity_targets",
    "parse_model_kwargs",
    "parse_config",
    "progress_bar",
    "pyplot",
    "read_json",
    "remove_stale_temp_files",
    "resolve_device",
    "results_payload",
    "rng_state",
    "save_checkpoint",
    "save_figure",
    "seed_everything",
    "set_flat_parameters",
    "set_rng_state",
    "verdict_table",
    "write_json",
]
