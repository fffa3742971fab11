"""gradgate: describe a graph, let a gRPC server compute forward and backward, train from Python.

>>> import gradgate as gg
>>> g = gg.Graph()
>>> x = g.input("x", (None, 2)); W = g.param("W", (2, 3))
>>> loss = g.set_loss(gg.mean(gg.relu(x @ W)))
"""
from gradgate import data, gradcheck, optim
from gradgate.client import Client, OpInfo, connect
from gradgate.data import spiral
from gradgate.errors import GradgateError
from gradgate.graph import (Graph, TensorSpec, Value, constant, exp, l2, log, maximum, mean, relu, reshape,
                            sigmoid, softmax_cross_entropy, square, sum, svm_loss, tanh, transpose)
from gradgate.params import init_params
from gradgate.session import ForwardResult, Session, StepResult
from gradgate.train import train

__version__ = "0.1.0"

__all__ = [
    "Client", "ForwardResult", "GradgateError", "Graph", "OpInfo", "Session", "StepResult", "TensorSpec",
    "Value", "connect", "constant", "data", "exp", "gradcheck", "init_params", "l2", "log", "maximum", "mean",
    "optim", "relu", "reshape", "sigmoid", "softmax_cross_entropy", "spiral", "square", "sum", "svm_loss", "tanh",
    "train", "transpose",
]
