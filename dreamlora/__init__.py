"""dreamlora: LoRA-family adapters (LoRA, LoRA+, DoRA, SingLoRA, LoHa, LoKr) on any torch module, behind one small API.

    from dreamlora import AdapterConfig, attach
    model = attach(model, AdapterConfig(method="dora", rank=8, target_modules=["to_q", "to_v"]))

The core (this package minus the training entry points) imports torch and safetensors only.
"""

from dreamlora.config import AdapterConfig
from dreamlora.hooks import (
    StepContext,
    on_optimizer_step,
    param_groups,
    regularization_loss,
    trainable_parameter_count,
)
from dreamlora.inject import (
    LayerWithAdapters,
    adapter_config,
    adapter_layers,
    adapter_names,
    attach,
    detach,
    disable,
    enable,
    merge,
    set_scale,
)
from dreamlora.io import (
    export_errors,
    export_lora,
    load,
    load_weights,
    peft_lora_state_dict,
    save,
    set_export_rank,
)
from dreamlora.methods import METHODS, AdapterLayer, register
from dreamlora.options import MethodOptions

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "LayerWithAdapters",
    "AdapterConfig",
    "AdapterLayer",
    "MethodOptions",
    "StepContext",
    "adapter_config",
    "adapter_layers",
    "adapter_names",
    "attach",
    "detach",
    "disable",
    "enable",
    "export_errors",
    "export_lora",
    "set_export_rank",
    "load",
    "load_weights",
    "merge",
    "on_optimizer_step",
    "param_groups",
    "peft_lora_state_dict",
    "regularization_loss",
    "register",
    "save",
    "set_scale",
    "trainable_parameter_count",
]
