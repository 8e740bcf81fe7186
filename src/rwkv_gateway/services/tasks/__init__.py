"""The Task API's services (docs/tasks.md): `model.py` (tasks, their kinds, parameters and runs),
`registry.py` (the tasks in RAM and in storage, eviction), `runner.py` (generations on the
engine) and `service.py` (`TaskService`, the use cases the routes call).

The names the routes and the composition root use are importable from here.
"""

from rwkv_gateway.services.tasks.model import (
    Generated,
    GenParams,
    Prefilled,
    Task,
    TaskConfig,
    TaskConflict,
    TaskKind,
    TaskListing,
    TaskNotFound,
    TaskOperationError,
    TaskStatus,
    is_task_id,
    new_seed,
)
from rwkv_gateway.services.tasks.service import TaskService

__all__ = [
    "GenParams",
    "Generated",
    "Prefilled",
    "Task",
    "TaskConfig",
    "TaskConflict",
    "TaskKind",
    "TaskListing",
    "TaskNotFound",
    "TaskOperationError",
    "TaskService",
    "TaskStatus",
    "is_task_id",
    "new_seed",
]
