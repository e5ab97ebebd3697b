"""Neural-network layers (tinytensor.nn) and their functional forms (tinytensor.nn.functional)."""
from . import functional
from .modules import (GELU, Dropout, Embedding, LayerNorm, Linear, Module, ModuleList, Parameter,
                      ReLU, Sequential, Tanh)

__all__ = ["functional", "Module", "Parameter", "Linear", "Embedding", "LayerNorm", "Dropout",
           "ReLU", "GELU", "Tanh", "Sequential", "ModuleList"]
