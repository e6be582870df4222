"""The one rule that draws the weights of the random LLaVA models, and the two settings it is used with.

The tiny checkpoints (`llava.model.tiny`) and the speed benchmarks' models (`llava.bench.workload`, whose
rule `llava.bench.qwen_model` borrows) are random, yet must behave like trained models: std 0.02
everywhere makes every attention row uniform, every greedy answer the same token, and MustDrop's
thresholds drop nothing. So matrices get fan-in scaled normals with a gain on queries and keys (peaked
attention), writes into the residual stream are damped (activations stay finite through every layer),
and vision embeddings are small (flat image regions stay similar, as a trained CLIP's do).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

EMBED_STD = 0.02  # CLIP's patch, position, class (and text token) embeddings
TOKEN_EMBED_STD = 1.0  # the language model's input embeddings
BIAS_STD = 0.02
QK_NAMES = ("q_proj.weight", "k_proj.weight")
RESIDUAL_WRITE_NAMES = ("o_proj.weight", "down_proj.weight", "out_proj.weight", "fc2.weight")


@dataclass(frozen=True)
class PeakedInit:
    """How a parameter's initial value follows from its name and shape; the fields are what differs
    between the settings in use (`TINY_INIT`, `BENCHMARK_INIT`)."""

    qk_gain: float  # multiplies the fan-in std of query and key projections: the higher, the sharper attention
    lm_head_std: float | None = None  # std of the output rows; None: fan-in scaled like any other matrix

    def value(self, name: str, like: torch.Tensor, gen: torch.Generator, depth: int | None = None) -> torch.Tensor:
        """The initial value of parameter `name`, shaped and placed like `like`. `depth`: how many layers
        write into its residual stream; their writes are damped by 1/sqrt(2 depth) (None: not damped)."""
        if name.endswith("logit_scale"):  # CLIP's learned temperature keeps its own init
            return like.detach().clone()
        if "norm" in name:  # LayerNorm / RMSNorm: weights 1, biases 0
            return torch.ones_like(like) if name.endswith("weight") else torch.zeros_like(like)
        if "embed_tokens" in name:
            return normal(like, TOKEN_EMBED_STD, gen)
        if "embedding" in name:
            return normal(like, EMBED_STD, gen)
        if name.endswith("bias"):
            return normal(like, BIAS_STD, gen)
        if name.endswith("image_newline"):  # LLaVA-NeXT's row-end token: an embedding of unit-ish norm
            return normal(like, 1.0 / math.sqrt(like.numel()), gen)
        if self.lm_head_std is not None and name.startswith("lm_head"):
            return normal(like, self.lm_head_std, gen)
        gain = self.qk_gain if name.endswith(QK_NAMES) else 1.0
        if depth is not None and name.endswith(RESIDUAL_WRITE_NAMES):
            gain = 1.0 / math.sqrt(2 * depth)
        return normal(like, gain / math.sqrt(like[0].numel()), gen)


# The tiny checkpoints: attention sharp enough that answers depend on the image and the question, and
# large output rows, so that greedy decoding gives varied tokens that do not hinge on rounding.
TINY_INIT = PeakedInit(qk_gain=2.0, lm_head_std=0.5)
# The speed benchmarks: a sharper q/k gain, so that MustDrop's thresholds drop what they drop on a trained
# model. With 4 (attention logits of std ~16) the settings 192 / 128 / 64 keep 196 / 196 / 136
# layer-averaged vision tokens on the quick model and 284 / 284 / 220 on the full one (more heads average
# out); at gain 2 the quick model keeps 360 / 360 / 257, barely below the merge's 360. The output rows
# are fan-in scaled (the benchmarks decode with EOS off). Qwen's merger norm, `ln_q`, is not named a norm
# and is drawn like a matrix.
BENCHMARK_INIT = PeakedInit(qk_gain=4.0)


@torch.no_grad()
def init_peaked(model: nn.Module, gen: torch.Generator, rule: PeakedInit,
                depth_of: Callable[[str], int] | None = None) -> None:
    """Overwrite every parameter of `model`, in order, from `gen` by `rule`. `depth_of(name)`: the layer count
    of the stack a parameter belongs to, whose residual writes are damped (None: nothing is damped)."""
    for name, param in model.named_parameters():
        param.copy_(rule.value(name, param, gen, depth_of(name) if depth_of else None))


def normal(like: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    """Seeded N(0, std^2) drawn where `like` lives, in its dtype: a 7B model on a GPU in seconds, and
    bit-identical files from the same seed on any CPU."""
    return torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype) * std
