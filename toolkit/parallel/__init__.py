# Parallel engines: one registered strategy per recipe `parallel.engine` name, its checkpoint format, the launch environment.
from toolkit.parallel.base import (BatchShape, LaunchEnvironment, ModelStateLayout, ParallelStrategy, get_strategy,
                                   register_strategy, strategy_names)
from toolkit.parallel.checkpoint_format import CheckpointFormat, format_of, register_checkpoint_format
from toolkit.parallel import ddp, deepspeed_zero, fsdp2, single  # noqa: F401,E402  (each registers its strategy)

__all__ = ["BatchShape", "CheckpointFormat", "LaunchEnvironment", "ModelStateLayout", "ParallelStrategy", "format_of",
           "get_strategy", "register_checkpoint_format", "register_strategy", "strategy_names"]
