"""FSDP under accelerate (`accelerate launch --config_file training/configs/accelerate_fsdp.yaml ...`).

accelerate's FSDP plugin does the sharding; what CLIP needs on top of it lives here:

- FSDP2 only. FSDP1 and FSDP2 both refuse 0-dim parameters, and CLIP's ``logit_scale`` / ``logit_bias``
  are 0-dim (their shape is the public state-dict API, as in open_clip). FSDP2 can leave parameters
  out (``ignored_params``): the two scalars stay whole on every process and `average_replicated_grads`
  averages their gradients, which FSDP does not reduce for ignored parameters.
- A vision tower runs its last Block through ``forward_queries`` (the class token only), which FSDP's
  forward hooks do not see: it is registered as a forward method so the Block's weights are gathered.
- Evaluation and the final model run on the main process alone, where the sharded model cannot run
  (every process must join each all-gather): `full_model` gathers the weights into a plain copy.
- On CPU accelerate ignores the FSDP settings and silently wraps the model in DDP; `enable_on_cpu`
  turns FSDP on there too, so that two gloo processes test the code path GPUs run.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from torch import nn

from vlm.layers.block import Block
from vlm.model import CLIP, create_model

from .distributed import all_reduce_mean

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .loop import Run

__all__ = ["is_fsdp", "enable_on_cpu", "prepare", "average_replicated_grads", "full_model"]

logger = logging.getLogger(__name__)


def is_fsdp(accelerator: "Accelerator") -> bool:
    """Whether accelerate shards the model (FSDP1 or FSDP2)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def enable_on_cpu(accelerator: "Accelerator") -> None:
    """Turns FSDP on for CPU processes launched with accelerate's FSDP settings (``ACCELERATE_USE_FSDP``),
    which accelerate would otherwise run as DDP without a word."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    # Both shared states: every `AcceleratorState()` re-reads the distributed type from `PartialState`.
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables, as on GPUs
    logger.info("FSDP on CPU processes (gloo)")


class _Scalars(nn.Module):
    """CLIP's 0-dim parameters, handed to FSDP2 as `ignored_modules` (accelerate turns them into
    `ignored_params`); the same Parameter objects, not copies."""

    def __init__(self, model: CLIP):
        super().__init__()
        self.logit_scale = model.logit_scale
        self.logit_bias = model.logit_bias


def _check_plugin(plugin) -> None:
    from torch.distributed.fsdp import StateDictType

    if plugin.fsdp_version != 2:
        raise ValueError(
            f"fsdp_version={plugin.fsdp_version}: FSDP1 cannot wrap CLIP (it refuses the 0-dim logit_scale); "
            "set fsdp_version: 2 in the accelerate config (see training/configs/accelerate_fsdp.yaml)"
        )
    if plugin.state_dict_type != StateDictType.FULL_STATE_DICT:
        raise ValueError(
            f"fsdp_state_dict_type={plugin.state_dict_type.name}: checkpoints must hold the whole model so that "
            "vlm.load reads them; set fsdp_state_dict_type: FULL_STATE_DICT in the accelerate config"
        )


def _check_plain(model: CLIP) -> None:
    """`full_model` rebuilds the model from its config: parameters the config does not describe (LoRA
    adapters) would be lost at the first evaluation, hours in; refuse them before training."""
    extra = set(model.state_dict()) - set(create_model(model.config, device="meta").state_dict())
    if extra:
        raise ValueError(
            f"under FSDP the model must be the plain CLIP of its config, and it has {len(extra)} more tensors "
            f"(e.g. {min(extra)}, from LoRA adapters); drop model.lora.enabled or train without FSDP"
        )


def prepare(accelerator: "Accelerator", model: CLIP, *objects: object) -> tuple:
    """`accelerator.prepare(model, *objects)`, with CLIP's needs under FSDP (see the module's docstring)."""
    if not is_fsdp(accelerator):
        return accelerator.prepare(model, *objects)
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    plugin = accelerator.state.fsdp_plugin
    _check_plugin(plugin)
    _check_plain(model)
    # fully_shard moves the parameters it shards to the device, not the ones it ignores; `.to` keeps
    # the Parameter objects (the optimiser holds them) and moves their data.
    plugin.ignored_modules = [_Scalars(model).to(accelerator.device)]
    prepared = accelerator.prepare(model, *objects)
    for module in prepared[0].modules():
        if isinstance(module, Block) and isinstance(module, FSDPModule):
            register_fsdp_forward_method(module, "forward_queries")
    return prepared


def average_replicated_grads(accelerator: "Accelerator", model: CLIP) -> None:
    """Averages the gradients of the parameters FSDP leaves whole over processes, as DDP would; call
    it after the backward pass and before clipping. Nothing to do without FSDP."""
    if not is_fsdp(accelerator):
        return
    for param in (model.logit_scale, model.logit_bias):
        if param is not None and param.grad is not None:
            param.grad.copy_(all_reduce_mean(param.grad))


def full_model(run: "Run") -> CLIP | None:
    """The model with all its weights, for the main process: `run.clip` itself without FSDP; under FSDP
    a plain copy gathered from every process (all must call this), None on the other processes."""
    acc = run.accelerator
    if not is_fsdp(acc):
        return run.clip
    state = acc.get_state_dict(run.model)  # the full weights, on the main process only
    if not acc.is_main_process:
        return None
    clip = run.clip
    # Built on the meta device: random initialisation would move the main process's RNG stream.
    model = create_model(clip.config, device="meta")
    model.load_state_dict(state, assign=True)
    model.to(acc.device)
    for name in ("card", "tokenizer_path"):  # what travels with a model into save_pretrained
        if hasattr(clip, name):
            setattr(model, name, getattr(clip, name))
    return model
