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
from gradgate.graph import (Graph, TensorSpec, Value, abs, add, affine, avg_pool2d, batchnorm, bce_with_logits, clip,
                            concat, constant, conv2d, div, dropout, exp, flatten, l2, layernorm, log, log_softmax,
                            matmul, max_pool2d, maximum, mean, mse_loss, mul, neg, pow, relu, reshape, sigmoid,
                            slice, softmax, softmax_cross_entropy, sqrt, square, sub, sum, svm_loss, tanh, transpose)
from gradgate.params import init_params
from gradgate.security import TLS
from gradgate.session import ForwardResult, Session, StepResult
from gradgate.train import train

__version__ = "0.1.0"

# the graph builder: one function per registry op, same names and attributes as ListOps
OPS = [
    "abs", "add", "affine", "avg_pool2d", "batchnorm", "bce_with_logits", "clip", "concat", "constant", "conv2d", "div",
    "dropout", "exp", "flatten", "l2", "layernorm", "log", "log_softmax", "matmul", "max_pool2d", "maximum", "mean",
    "mse_loss", "mul", "neg", "pow", "relu", "reshape", "sigmoid", "slice", "softmax", "softmax_cross_entropy",
    "sqrt", "square", "sub", "sum", "svm_loss", "tanh", "transpose",
]

__all__ = [
    "Client", "ForwardResult", "GradgateError", "Graph", "OpInfo", "Session", "StepResult", "TLS", "TensorSpec",
    "Value", "connect", "data", "gradcheck", "init_params", "optim", "spiral", "train", *OPS,
]
