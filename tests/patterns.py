"""The pattern zoo: tiny models in the idioms real models write (squeeze-excitation, channel shuffles, grouped
convs, norms, MLP-Mixer, inception...), read by tests/test_patterns.py and tests/test_fuse.py."""
import torch
import torch.nn.functional as F
from torch import nn

from conftest import HEADS, randomised

TASKS = ("a", "b", "c")
SHAPE = (1, 12, 12)


class ScalarOps(nn.Module):
    """Per-channel arithmetic with Python scalars and clamping activations, as MobileNet-style code writes them."""
    through = ("conv1", "conv2", "fc")   # the hidden spaces the pattern runs through

    def __init__(self, classes):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.hardsigmoid = nn.Hardsigmoid()
        self.conv2 = nn.Conv2d(6, 8, 3)
        self.act = nn.Hardtanh(-2.0, 2.0)
        self.fc = nn.Linear(8 * 4 * 4, 12)
        self.softplus = nn.Softplus(beta=2.0)
        self.mish = nn.Mish()
        self.head = nn.Linear(12, classes)

    def forward(self, x):
        x = self.conv1(x) * 0.5 + 1
        x = torch.clamp(x, 0, 6) - 3
        x = F.max_pool2d(self.hardsigmoid(x / 6), 2)
        x = F.dropout(F.hardtanh(self.conv2(x).clamp(min=0)), 0.2, training=self.training)
        x = F.hardsigmoid(self.act(1 - x)).flatten(1)
        x = 2 * self.mish(self.softplus(self.fc(x))).mul(3)
        return self.head(x)


class LogSoftmaxHead(nn.Module):
    """A classifier whose output is log-probabilities (trained with NLLLoss)."""
    through = ("conv1", "fc1")

    def __init__(self, classes):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3)
        self.fc1 = nn.Linear(6 * 5 * 5, 16)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return F.log_softmax(self.head(x), dim=1)


class ReshapeByShape(nn.Module):
    """Flattening with the batch size read off the tensor, as most tutorials write it."""
    through = ("conv1", "conv2", "fc1")

    def __init__(self, classes):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3)
        self.conv2 = nn.Conv2d(6, 8, 3)
        self.fc1 = nn.Linear(8 * 3 * 3, 16)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = F.relu(self.conv2(F.max_pool2d(F.relu(self.conv1(x)), 2)))
        x = F.relu(self.fc1(x.reshape(x.shape[0], -1)))
        return self.head(x.view(x.size(0), -1))


class ReusedStateless(nn.Module):
    """One activation and one pooling module called after every layer: they hold no weights, so nothing is tied."""
    through = ("conv1", "conv2", "fc1")

    def __init__(self, classes):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 3 * 3, 16)
        self.head = nn.Linear(16, classes)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        x = self.pool(self.act(self.conv1(x)))
        x = self.pool(self.act(self.conv2(x)))
        return self.head(self.act(self.fc1(torch.flatten(x, 1))))


class SqueezeHead(nn.Module):
    """SqueezeNet's classifier: a 1x1 conv with one channel per class, then ReLU, global pooling and flatten."""
    through = ("conv1", "conv2")

    def __init__(self, classes):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(8, classes, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        x = F.relu(self.conv2(F.max_pool2d(F.relu(self.conv1(x)), 2)))
        return torch.flatten(self.classifier(x), 1)


class SqueezeExcite(nn.Module):
    """A block gated by torchvision's SqueezeExcitation: x * sigmoid(fc2(relu(fc1(pool(x))))), fc1 / fc2 1x1 convs."""
    through = ("conv1", "conv2", "fc1")   # conv2's space holds fc2's output too: the gate is per channel of x

    def __init__(self, classes):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        x = F.relu(self.conv2(F.max_pool2d(F.relu(self.conv1(x)), 2)))
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.head((x * scale).mean((2, 3)))


class LinearSqueezeExcite(nn.Module):
    """The SENet paper's code: the gate from Linear layers, reshaped with view(b, c, 1, 1)."""
    through = ("conv1", "conv2", "fc1")

    def __init__(self, classes):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(8, 4, bias=False)
        self.fc2 = nn.Linear(4, 8, bias=False)
        self.head = nn.Linear(8 * 4 * 4, classes)

    def forward(self, x):
        x = F.relu(self.conv2(F.max_pool2d(F.relu(self.conv1(x)), 2)))
        b, c, _, _ = x.size()
        y = self.pool(x).view(b, c)
        y = torch.sigmoid(self.fc2(F.relu(self.fc1(y)))).view(b, c, 1, 1)
        return self.head(torch.flatten(x * y, 1))


class CatThenMean(nn.Module):
    """Two branches concatenated on channels, then a global mean (an Inception block's readout)."""
    through = ("conv1", "left", "right")

    def __init__(self, classes):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.left = nn.Conv2d(6, 4, 1)
        self.right = nn.Conv2d(6, 3, 3, padding=1)
        self.head = nn.Linear(7, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = torch.cat([self.left(x), self.right(x)], 1)
        return self.head(F.relu(x).mean((2, 3)))


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation, as MobileNetV3 uses it."""

    def __init__(self, channels, squeezed):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, input):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(input)))))
        return scale * input


class MobileNetV3Block(nn.Module):
    """A MobileNetV3 inverted residual (expand, depthwise, SE, project, `result += x`) between a stem and a
    Hardswish / Dropout classifier, the way torchvision writes them."""
    through = ("stem_0", "block_expand_0", "block_se_fc1", "classifier_0")

    def __init__(self, classes):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.Hardswish())
        self.block = nn.Module()
        self.block.expand = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.block.depthwise = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),
                                             nn.BatchNorm2d(16), nn.Hardswish())
        self.block.se = SqueezeExcitation(16, 4)
        self.block.project = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(8, 16), nn.Hardswish(inplace=True), nn.Dropout(0.2, inplace=True),
                                        nn.Linear(16, classes))

    def forward(self, x):
        x = self.stem(x)
        result = self.block.project(self.block.se(self.block.depthwise(self.block.expand(x))))
        result += x
        return self.classifier(torch.flatten(self.avgpool(result), 1))


def channel_shuffle(x, groups):
    """torchvision's shufflenetv2.channel_shuffle."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, -1, height, width)


class ShuffleNetV2Block(nn.Module):
    """ShuffleNetV2's units: a downsampling unit (two branches, concat, shuffle), then a basic unit (chunk in two,
    one half through a branch, concat, shuffle), written as torchvision writes them."""
    through = ("stem_0", "down_left_1", "down_right_0", "basic_0", "basic_4")

    def __init__(self, classes):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.down_left = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1, groups=8, bias=False), nn.Conv2d(8, 6, 1), nn.ReLU())
        self.down_right = nn.Sequential(nn.Conv2d(8, 6, 1), nn.ReLU(), nn.Conv2d(6, 6, 3, 2, 1, groups=6), nn.ReLU())
        self.basic = nn.Sequential(nn.Conv2d(6, 6, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                                   nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Conv2d(6, 6, 1), nn.ReLU())
        self.head = nn.Linear(12, classes)

    def forward(self, x):
        x = self.stem(x)
        x = channel_shuffle(torch.cat((self.down_left(x), self.down_right(x)), dim=1), 2)
        x1, x2 = x.chunk(2, dim=1)
        x = channel_shuffle(torch.cat((x1, self.basic(x2)), dim=1), 2)
        return self.head(x.mean([2, 3]))


class GroupedConvs(nn.Module):
    """A ResNeXt bottleneck (1x1, grouped 3x3, 1x1, residual add) and a depthwise conv with a channel multiplier."""
    through = ("stem", "reduce", "grouped", "stem", "widen")

    def __init__(self, classes):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.reduce = nn.Conv2d(8, 8, 1, bias=False)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.expand = nn.Conv2d(8, 8, 1)
        self.widen = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=8)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        out = F.relu(self.bn(self.grouped(F.relu(self.reduce(x)))))
        x = F.relu(self.expand(out) + x)
        return self.head(F.relu(self.widen(x)).mean((2, 3)))


class PReLUs(nn.Module):
    """A PReLU with one slope per channel after a conv and one shared slope after a Linear layer."""
    through = ("conv1", "fc1")

    def __init__(self, classes):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3)
        self.act1 = nn.PReLU(6)
        self.fc1 = nn.Linear(6 * 5 * 5, 12)
        self.act2 = nn.PReLU(init=0.1)
        self.head = nn.Linear(12, classes)
        with torch.no_grad():   # slopes that differ by channel and by model
            self.act1.weight.uniform_(-0.5, 0.5)
            self.act2.weight.uniform_(-0.5, 0.5)

    def forward(self, x):
        x = F.max_pool2d(self.act1(self.conv1(x)), 2)
        return self.head(self.act2(self.fc1(torch.flatten(x, 1))))


class Norms(nn.Module):
    """GroupNorm after convs (one of them on a residual sum) and LayerNorm over Linear features, as ResNet-GN and MLP
    heads write them."""
    through = ("conv1", "fc1")   # conv2 makes units of conv1's space (the residual add)

    def __init__(self, classes):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.gn1 = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.gn2 = nn.GroupNorm(4, 8, eps=1e-3)
        self.fc1 = nn.Linear(8, 12)
        self.ln = nn.LayerNorm(12)
        self.head = nn.Linear(12, classes)
        with torch.no_grad():   # affine parameters that differ by channel and by model
            for norm in (self.gn1, self.gn2, self.ln):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.gn1(self.conv1(x))), 2)
        x = F.relu(self.gn2(self.conv2(x) + x))
        return self.head(F.relu(self.ln(self.fc1(x.mean((2, 3))))))


class MixerBlock(nn.Module):
    """An MLP-Mixer block on tokens [batch, tokens, channels]: token mixing (transpose, a Linear over the tokens, back)
    and channel mixing (Linear over the channels), each after a LayerNorm and added to its input."""

    def __init__(self, tokens, channels, token_hidden, channel_hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.token_fc1 = nn.Linear(tokens, token_hidden)
        self.token_fc2 = nn.Linear(token_hidden, tokens)
        self.norm2 = nn.LayerNorm(channels)
        self.channel_fc1 = nn.Linear(channels, channel_hidden)
        self.channel_fc2 = nn.Linear(channel_hidden, channels)

    def forward(self, x):
        y = self.norm1(x).transpose(1, 2)
        x = x + self.token_fc2(F.gelu(self.token_fc1(y))).transpose(1, 2)
        return x + self.channel_fc2(F.gelu(self.channel_fc1(self.norm2(x))))


class MlpMixer(nn.Module):
    """A small MLP-Mixer: a patch-embedding conv, `x.flatten(2).transpose(1, 2)` to tokens, one Mixer block, a
    LayerNorm, the mean over tokens and a head."""
    through = ("stem", "block_channel_fc1")   # channel_fc2 makes units of the stem's space (the residual add)

    def __init__(self, classes):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 4, stride=4)
        self.block = MixerBlock(9, 8, 6, 12)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, classes)
        with torch.no_grad():   # affine parameters that differ by channel and by model
            for norm in (self.block.norm1, self.block.norm2, self.norm):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.block(x)).mean(dim=1))


class CatJoins(nn.Module):
    """A residual add and a squeeze-excitation gate applied to a torch.cat (Inception / DenseNet style): the
    shortcut's and the gate's channels are units of the concatenated branches."""
    through = ("stem", "left", "right", "squeeze")

    def __init__(self, classes):
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.left = nn.Conv2d(6, 4, 1)
        self.right = nn.Conv2d(6, 3, 3, padding=1)
        self.shortcut = nn.Conv2d(6, 7, 1, bias=False)
        self.bn = nn.BatchNorm2d(7)
        self.squeeze = nn.Linear(7, 3)
        self.excite = nn.Linear(3, 7)
        self.head = nn.Linear(7, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem(x)), 2)
        y = F.relu(torch.cat([self.left(x), F.relu(self.right(x))], 1) + self.bn(self.shortcut(x)))
        b, c, _, _ = y.size()
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(y.mean((2, 3)))))).view(b, c, 1, 1)
        return self.head((y * gate).mean((2, 3)))


class SEResNetBlock(nn.Module):
    """SE-ResNet: a basic residual block whose second BatchNorm's output is gated (SENet's Linear gate) before the
    shortcut is added, then global pooling and a head."""
    through = ("stem_0", "conv1", "se_fc1")   # conv2 and the gate's se_fc2 make units of the stem's space

    def __init__(self, classes):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.se_fc1 = nn.Linear(8, 2, bias=False)
        self.se_fc2 = nn.Linear(2, 8, bias=False)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        x = self.stem(x)
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        b, c, _, _ = out.size()
        y = torch.sigmoid(self.se_fc2(F.relu(self.se_fc1(F.adaptive_avg_pool2d(out, 1).view(b, c)))))
        out = F.relu(out * y.view(b, c, 1, 1).expand_as(out) + x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class Fire(nn.Module):
    """SqueezeNet's fire module: a 1x1 squeeze, then 1x1 and 3x3 expands concatenated."""

    def __init__(self, inplanes, squeeze, expand1x1, expand3x3):
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    """SqueezeNet as torchvision writes it, two fire modules: features, then a dropout / 1x1 conv / ReLU / global
    pooling classifier and a flatten."""
    through = ("features_0", "features_3_squeeze", "features_3_expand1x1", "features_4_expand3x3")

    def __init__(self, classes):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, ceil_mode=True), Fire(8, 4, 4, 4), Fire(8, 4, 6, 6))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(12, classes, 1), nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d((1, 1)))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


class Inception(nn.Module):
    """An Inception block (1x1; 1x1 then 3x3; 3x3 pooling then 1x1) concatenated, twice, then global pooling."""
    through = ("stem", "block1_branch1", "block1_branch2_1", "block2_pool_proj")

    def __init__(self, classes):
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.block1 = InceptionBlock(6, 4, (3, 4), 2)
        self.block2 = InceptionBlock(10, 3, (4, 5), 3)
        self.head = nn.Linear(11, classes)

    def forward(self, x):
        x = self.block2(self.block1(F.max_pool2d(F.relu(self.stem(x)), 2)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InceptionBlock(nn.Module):
    def __init__(self, inplanes, ones, threes, pooled):
        super().__init__()
        self.branch1 = nn.Conv2d(inplanes, ones, 1)
        self.branch2_0 = nn.Conv2d(inplanes, threes[0], 1)
        self.branch2_1 = nn.Conv2d(threes[0], threes[1], 3, padding=1)
        self.pool_proj = nn.Conv2d(inplanes, pooled, 1)

    def forward(self, x):
        branches = [self.branch1(x), self.branch2_1(F.relu(self.branch2_0(x))),
                    self.pool_proj(F.max_pool2d(x, 3, stride=1, padding=1))]
        return F.relu(torch.cat(branches, 1))


PATTERNS = {"scalar": ScalarOps, "log_softmax": LogSoftmaxHead, "reshape": ReshapeByShape,
            "reused_stateless": ReusedStateless, "squeeze_head": SqueezeHead, "squeeze_excite": SqueezeExcite,
            "linear_squeeze_excite": LinearSqueezeExcite, "cat_then_mean": CatThenMean,
            "mobilenet_v3_block": MobileNetV3Block, "shufflenet_v2": ShuffleNetV2Block, "grouped_convs": GroupedConvs,
            "prelu": PReLUs, "norms": Norms, "mlp_mixer": MlpMixer, "cat_joins": CatJoins,
            "se_resnet": SEResNetBlock, "squeezenet": SqueezeNet, "inception": Inception}


def models_of(pattern: str, tasks=TASKS) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {t: randomised(PATTERNS[pattern](HEADS[t]), i) for i, t in enumerate(tasks)}


def inputs(n=6, seed=0):
    return torch.randn((n,) + SHAPE, generator=torch.Generator().manual_seed(seed))


def originals(models):
    return lambda x: {t: m(x) for t, m in models.items()}
