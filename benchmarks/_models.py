"""Models and synthetic batches for the benchmarks: CIFAR-style ResNets (ResNet-32 with BatchNorm or GroupNorm,
ResNet-20 with BatchNorm), a small pre-norm text transformer, a small MLP, timm's ViT-Tiny on 32x32 images and a
tiny random Llama with LoRA."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _norm(kind: str, channels: int) -> nn.Module:
    """BatchNorm (couples the samples of a batch in train mode) or GroupNorm with 8 channels per group."""
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.GroupNorm(max(1, channels // 8), channels)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = _norm(norm, cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(norm, cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (He et al. 2016): 3 stages of ``blocks`` (n) basic blocks, 16/32/64
    channels; ``blocks=5`` is ResNet-32, ``blocks=3`` ResNet-20.

    ``norm="group"`` replaces every BatchNorm by a GroupNorm (8 channels per group): no layer couples samples.
    """

    def __init__(self, num_classes: int = 10, norm: str = "batch", blocks: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = _norm(norm, 16)
        layers, cin = [], 16
        for cout, stride in [(16, 1), (32, 2), (64, 2)]:
            for i in range(blocks):
                layers.append(BasicBlock(cin, cout, stride if i == 0 else 1, norm))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        h = self.layers(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class TextTransformer(nn.Module):
    """Token embedding + learned positions, 2 pre-norm encoder layers (SDPA), mean pooling, Linear head."""

    def __init__(self, vocab: int = 1000, seq: int = 32, d: int = 128, num_classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        layer = nn.TransformerEncoderLayer(
            d, nhead=4, dim_feedforward=256, dropout=0.1, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)

    def forward(self, tokens):
        h = self.encoder(self.embed(tokens) + self.pos)
        return self.head(self.norm(h).mean(1))


def mnist1d_cnn(batch_norm: bool = False, width: int = 32) -> nn.Module:
    """The small 1-D CNN of the MNIST-1D benchmark and demo: input ``(batch, 1, 40)``, 10 classes.

    ``batch_norm`` puts a BatchNorm after each convolution (else an ``nn.Identity``, so that both variants
    have the same layer indices and, under one seed, the same initial weights); ``width`` is the channel
    count of every convolution (32: the benchmark's 10k-parameter net).
    """
    norm = nn.BatchNorm1d if batch_norm else (lambda _: nn.Identity())
    return nn.Sequential(
        nn.Conv1d(1, width, 5, padding=2),
        norm(width),
        nn.ReLU(),
        nn.Conv1d(width, width, 3, stride=2, padding=1),
        norm(width),
        nn.ReLU(),
        nn.Conv1d(width, width, 3, stride=2, padding=1),
        norm(width),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(width * 10, 10),
    )


MODELS = ("resnet32", "resnet32gn", "resnet20", "transformer", "mlp", "vit", "llama_lora")


def make_problem(name: str, batch: int, meta_batch: int, seed: int = 0):
    """``(model, train batch, meta batch, num_classes)`` with synthetic data (``name`` one of :data:`MODELS`).

    ``llama_lora``'s inputs are ``{"input_ids": ids}`` and its targets the ids themselves (a causal LM:
    :func:`per_sample_loss` gives its loss); ``num_classes`` is then the vocabulary size.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name in ("resnet32", "resnet32gn", "resnet20"):
        blocks = 3 if name == "resnet20" else 5
        model, k = CifarResNet(10, "group" if name == "resnet32gn" else "batch", blocks), 10
        x, xm = torch.randn(batch, 3, 32, 32, generator=g), torch.randn(meta_batch, 3, 32, 32, generator=g)
    elif name == "transformer":
        model, k = TextTransformer(), 4
        x, xm = torch.randint(0, 1000, (batch, 32), generator=g), torch.randint(0, 1000, (meta_batch, 32), generator=g)
    elif name == "mlp":
        model, k = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 10)), 10
        x, xm = torch.randn(batch, 32, generator=g), torch.randn(meta_batch, 32, generator=g)
    elif name == "vit":  # timm's ViT-Tiny (192 wide, 12 blocks) on 32x32 images, patch 4: 64 tokens
        import timm

        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10)
        x, xm = torch.randn(batch, 3, 32, 32, generator=g), torch.randn(meta_batch, 3, 32, 32, generator=g)
        k = 10
    elif name == "llama_lora":
        model, k = tiny_llama_lora(), 256
        ids, idm = torch.randint(0, k, (batch, 32), generator=g), torch.randint(0, k, (meta_batch, 32), generator=g)
        return model, ({"input_ids": ids}, ids), ({"input_ids": idm}, idm), k
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    y, ym = torch.randint(0, k, (batch,), generator=g), torch.randint(0, k, (meta_batch,), generator=g)
    return model, (x, y), (xm, ym), k


def tiny_llama_lora() -> nn.Module:
    """A 2-block random Llama (hidden 64, 4 heads, SDPA attention, vocabulary 256) with a LoRA adapter (r=8) on
    every projection: only the adapters train."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=32,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, target_modules=targets))


def per_sample_loss(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The per-sample training loss of model ``name`` on its logits: the causal LM loss of each sequence for
    ``llama_lora``, cross-entropy for the classifiers."""
    if name == "llama_lora":
        from reweight.integrations.transformers import per_sample_loss as hf_loss

        return hf_loss("causal_lm")
    return partial(F.cross_entropy, reduction="none")
