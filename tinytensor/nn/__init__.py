"""Neural-network layers (tinytensor.nn), their functional forms (tinytensor.nn.functional),
parameter initialisation (tinytensor.nn.init) and gradient clipping (tinytensor.nn.utils)."""
from . import functional, init, utils
from .modules import (GELU, Dropout, Embedding, Identity, LayerNorm, Linear, Module, ModuleDict,
                      ModuleList, Parameter, ParameterDict, ParameterList, ReLU, Sequential, Tanh)

__all__ = ["functional", "init", "utils", "Module", "Parameter", "Linear", "Embedding", "LayerNorm",
           "Dropout", "ReLU", "GELU", "Tanh", "Identity", "Sequential", "ModuleList", "ModuleDict",
           "ParameterList", "ParameterDict"]
