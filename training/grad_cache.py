"""Loss and gradients of one step, in one pass or in micro-batches that keep the whole step's negatives.

With `accum_steps > 1` the step follows GradCache (Gao et al., 2021): every micro-batch is embedded
without gradients, the loss of the whole step is computed on those cached features (gathered over
processes), which gives the gradient of the loss with respect to each feature; then each micro-batch
is embedded again with gradients and back-propagates its features' cached gradients. The parameter
gradients are those of one big batch, at the activation memory of one micro-batch, for the price of
one extra forward pass. Both passes of a micro-batch draw the same random numbers (patch dropout's masks,
dropout): each micro-batch's generator states are saved before its first pass and restored before its
second, as GradCache's RandContext does, or the gradients would belong to features the loss never saw.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vlm.model import CLIPOutput

from .config import LossConfig
from .distributed import all_reduce_mean
from .losses import contrastive_loss

__all__ = ["LossValue", "loss_and_gradients"]


@dataclass
class LossValue:
    """The step's loss averaged over processes (the global-batch loss) and whether it is finite."""

    value: float
    finite: bool


def _loss(output: CLIPOutput, config: LossConfig) -> Tensor:
    return contrastive_loss(output, config.kind, local_loss=config.local_loss, chunk_size=config.chunk_size)


def _global(loss: Tensor) -> LossValue:
    value = all_reduce_mean(loss).item()
    return LossValue(value, bool(torch.isfinite(torch.tensor(value))))


def loss_and_gradients(model: nn.Module, images: Tensor, texts: Tensor, config: LossConfig, accelerator) -> LossValue:
    """Runs forward and backward for this process's batch; gradients accumulate in the parameters.

    With a non-finite loss the gradients may hold NaN: the caller must not step on them.
    """
    if config.accum_steps == 1:
        with accelerator.autocast():
            output = model(images, texts)
        loss = _loss(output, config)
        # Always run the backward pass, also for a NaN loss: DistributedDataParallel expects one after
        # every forward, and the caller drops the gradients.
        accelerator.backward(loss)
        return _global(loss)
    return _cached_gradients(model, images, texts, config, accelerator)


def _leaf(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.detach().float().requires_grad_(True)


def _cached_gradients(model: nn.Module, images: Tensor, texts: Tensor, config: LossConfig, accelerator) -> LossValue:
    micro = list(zip(images.chunk(config.accum_steps), texts.chunk(config.accum_steps)))
    generators = _generators(accelerator.unwrap_model(model), images.device)
    states, outs = [], []
    with torch.no_grad(), accelerator.autocast():
        for i, t in micro:
            states.append([g.get_state() for g in generators])
            outs.append(model(i, t))
    cache = CLIPOutput(
        image_embeds=_leaf(torch.cat([o.image_embeds for o in outs])),
        text_embeds=_leaf(torch.cat([o.text_embeds for o in outs])),
        logit_scale=_leaf(outs[0].logit_scale),
        logit_bias=_leaf(outs[0].logit_bias),
    )
    loss = _loss(cache, config)
    result = _global(loss)
    # The loss of the whole step gives each cached feature its gradient (scaled by the fp16 loss
    # scale when there is one, as the parameters' gradients must be).
    accelerator.backward(loss)
    if not result.finite:
        return result
    sizes = [len(i) for i, _ in micro]
    image_grads = cache.image_embeds.grad.split(sizes)
    text_grads = cache.text_embeds.grad.split(sizes)
    for k, (i, t) in enumerate(micro):
        last = k == len(micro) - 1
        # Gradients are synchronised across processes once, after the last micro-batch.
        for g, state in zip(generators, states[k]):
            g.set_state(state)
        with nullcontext() if last else accelerator.no_sync(model):
            with accelerator.autocast():
                out = model(i, t)
            surrogate = (out.image_embeds.float() * image_grads[k]).sum() + (
                out.text_embeds.float() * text_grads[k]
            ).sum()
            if last:
                # The temperature (and bias) are shared by all micro-batches: their gradient enters once.
                surrogate = surrogate + out.logit_scale.float() * cache.logit_scale.grad
                if out.logit_bias is not None:
                    surrogate = surrogate + out.logit_bias.float() * cache.logit_bias.grad
            surrogate.backward()
    return result


def _generators(model: nn.Module, device: torch.device) -> list[torch.Generator]:
    """The random generators a forward pass may draw from: the image tower's own one for patch dropout masks
    (`training.patch_dropout`), and the default ones of the CPU and the model's device."""
    found = [torch.default_generator]
    if device.type == "cuda":
        found.append(torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()])
    own = getattr(getattr(model, "visual", None), "patch_dropout_generator", None)
    return found + ([own] if own is not None else [])
