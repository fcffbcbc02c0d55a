# Parallel engines: one registered strategy per recipe `parallel.engine` name, and the launch environment.
from toolkit.parallel.base import (BatchShape, LaunchEnvironment, ModelStateLayout, ParallelStrategy, get_strategy,
                                   register_strategy, strategy_names)
from toolkit.parallel import ddp, deepspeed_zero, fsdp2, single  # noqa: F401,E402  (each registers its strategy)

__all__ = ["BatchShape", "LaunchEnvironment", "ModelStateLayout", "ParallelStrategy", "get_strategy", "register_strategy",
           "strategy_names"]
