"""PyTorch definitions of the built-in image models, written the way the widely used CIFAR code
writes them (ResNet-18 with the CIFAR stem; WideResNet with pre-activation blocks), for
runner/worker/tests/models.rs.

Reads {"dir", "seed", "classes", "norm"} on stdin. For each model: random weights (and random
BatchNorm running statistics) saved as <name>.safetensors, a fixed input batch and the model's
logits in evaluation mode and in training mode (batch statistics), and its parameter count.
"""

import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

req = json.load(sys.stdin)
torch.manual_seed(req["seed"])


def norm(c):
    if req["norm"] == "group":
        g = max(d for d in range(1, min(32, c) + 1) if c % d == 0)
        return nn.GroupNorm(g, c)
    return nn.BatchNorm2d(c)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = norm(64)
        cin, layers = 64, []
        for i, c in enumerate([64, 128, 256, 512]):
            blocks = [BasicBlock(cin, c, 1 if i == 0 else 2), BasicBlock(c, c, 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = c
        self.linear = nn.Linear(512, classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        for i in range(4):
            out = getattr(self, f"layer{i + 1}")(out)
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class WideBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        a = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return (x if self.equal else self.convShortcut(a)) + out


class NetworkBlock(nn.Module):
    def __init__(self, n, cin, cout, stride):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth, k, classes):
        super().__init__()
        n = (depth - 4) // 6
        w = [16, 16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(3, w[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, w[0], w[1], 1)
        self.block2 = NetworkBlock(n, w[1], w[2], 2)
        self.block3 = NetworkBlock(n, w[2], w[3], 2)
        self.bn1 = norm(w[3])
        self.fc = nn.Linear(w[3], classes)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


x = torch.randn(4, 3, 32, 32)
out = {"input": x.flatten().tolist()}
for name, net in [("resnet18", ResNet18(req["classes"])), ("wrn", WideResNet(16, 2, req["classes"]))]:
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, os.path.join(req["dir"], f"{name}.safetensors"))
    net.eval()
    with torch.no_grad():
        ev = net(x)
    net.train()
    with torch.no_grad():
        tr = net(x)
    out[name] = {"eval": ev.flatten().tolist(), "train": tr.flatten().tolist(),
                 "params": sum(p.numel() for p in net.parameters())}
print(json.dumps(out))
