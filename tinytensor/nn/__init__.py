"""Neural-network layers (tinytensor.nn), their functional forms (tinytensor.nn.functional) and
parameter initialisation (tinytensor.nn.init)."""
from . import functional, init
from .modules import (GELU, Dropout, Embedding, Identity, LayerNorm, Linear, Module, ModuleDict,
                      ModuleList, Parameter, ParameterDict, ParameterList, ReLU, Sequential, Tanh)

__all__ = ["functional", "init", "Module", "Parameter", "Linear", "Embedding", "LayerNorm",
           "Dropout", "ReLU", "GELU", "Tanh", "Identity", "Sequential", "ModuleList", "ModuleDict",
           "ParameterList", "ParameterDict"]
