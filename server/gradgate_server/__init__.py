"""gradgate_server: the gRPC server. ``python -m gradgate_server`` or ``gradgate-server``."""
from .app import Server, serve
from .config import Config

__all__ = ["Config", "Server", "serve"]
