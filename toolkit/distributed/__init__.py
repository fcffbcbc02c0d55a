# Process groups and collectives: the distributed context launchers create and library code receives.
from toolkit.distributed.context import DistributedContext

__all__ = ["DistributedContext"]
