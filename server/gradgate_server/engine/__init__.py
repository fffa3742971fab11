"""The engine: pure numpy, no grpc. compile_graph -> Plan; forward -> Tape; backward -> grads."""
from .compile import Buffer, Plan, Step, compile_graph
from .errors import (DeadlineExceeded, FailedPrecondition, GradgateError, InvalidArgument, NotFound,
                     ResourceExhausted)
from .ops import OPS, OpDef
from .run import (State, Tape, Watch, backward, check_batch, check_buffers, check_params, forward, full_buffers,
                  run_steps)

__all__ = ["OPS", "OpDef", "Plan", "Step", "Buffer", "State", "Tape", "Watch", "compile_graph", "forward",
           "backward", "run_steps", "check_batch", "check_params", "check_buffers", "full_buffers", "GradgateError",
           "InvalidArgument", "NotFound", "FailedPrecondition", "ResourceExhausted", "DeadlineExceeded"]
