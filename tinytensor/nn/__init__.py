"""Neural-network layers (tinytensor.nn), their functional forms (tinytensor.nn.functional) and
parameter initialisation (tinytensor.nn.init)."""
from . import functional, init
from .modules import (GELU, Dropout, Embedding, LayerNorm, Linear, Module, ModuleList, Parameter,
                      ReLU, Sequential, Tanh)

__all__ = ["functional", "init", "Module", "Parameter", "Linear", "Embedding", "LayerNorm",
           "Dropout", "ReLU", "GELU", "Tanh", "Sequential", "ModuleList"]
