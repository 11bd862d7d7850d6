"""Online EWC on P-MNIST written as the official DER code (Mammoth's ``ewc_on``) does it, without lifelong.

An independent check of docs/experiments.md's P-MNIST oEWC row: plain PyTorch and torchvision's MNIST, 20 permutations,
MLP 784-100-100-10 (Xavier-uniform, zero biases), pixels in [0, 1], plain SGD at batch 128, 1 epoch a task.
At each task end the Fisher is taken per sample, each squared gradient of log p(y|x) weighted by p(y|x), and
divided by (number of batches x batch size); the Fisher sums over tasks (gamma 1) and the anchor is the latest
weights. While training, 2 * lambda * F * (theta - theta*) is added to the gradient (the official penalty is
lambda * sum F (theta - theta*)^2, without lifelong's 1/2). The per-sample gradients come from ``torch.func``
instead of the official one-sample loop: the same numbers, faster.

    python scripts/oewc_official_check.py --seeds 0 --e-lambda 0.7 --lr 0.1     # the official best setting
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

BATCH = 128


def mlp() -> nn.Sequential:
    net = nn.Sequential(nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))
    for layer in net:
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    return net


def weighted_fisher(net: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """sum_n p(y_n|x_n) (d log p(y_n|x_n) / d theta)^2 / (batches x batch size), as the official end_task."""
    params = {n: p.detach() for n, p in net.named_parameters()}

    def log_likelihood(p: dict[str, Tensor], xn: Tensor, onehot: Tensor) -> Tensor:
        return (F.log_softmax(functional_call(net, p, (xn[None],)), 1)[0] * onehot).sum()

    per_sample = vmap(grad(log_likelihood), in_dims=(None, 0, 0))
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    with torch.no_grad():
        for i in range(0, len(x), 2000):
            xb, yb = x[i : i + 2000], y[i : i + 2000]
            grads = per_sample(params, xb, F.one_hot(yb, 10).float())
            prob = F.softmax(net(xb), 1).gather(1, yb[:, None])[:, 0]
            for n in fisher:
                fisher[n] += torch.einsum("b,b...->...", prob, grads[n] ** 2)
    batches = (len(x) + BATCH - 1) // BATCH
    return {n: f / (batches * BATCH) for n, f in fisher.items()}


def run(seed: int, e_lambda: float, lr: float, tasks: int, root: str) -> list[float]:
    """One seed; the test accuracy on every task after the last."""
    torch.manual_seed(seed)
    train = torchvision.datasets.MNIST(root, train=True, download=False)
    test = torchvision.datasets.MNIST(root, train=False, download=False)
    x_train, y_train = train.data.float().div(255).view(-1, 784), train.targets
    x_test, y_test = test.data.float().div(255).view(-1, 784), test.targets
    net = mlp()
    perms = [torch.randperm(784) for _ in range(tasks)]
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    fisher: dict[str, Tensor] = {}
    anchor: dict[str, Tensor] = {}
    for t in range(tasks):
        x = x_train[:, perms[t]]
        order = torch.randperm(len(x))
        for i in range(0, len(x), BATCH):
            idx = order[i : i + BATCH]
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y_train[idx]).backward()
            with torch.no_grad():
                for n, p in net.named_parameters():
                    if anchor and p.grad is not None:
                        p.grad += 2 * e_lambda * fisher[n] * (p - anchor[n])
            opt.step()
        new = weighted_fisher(net, x, y_train)
        fisher = {n: fisher[n] + new[n] for n in new} if fisher else new
        anchor = {n: p.detach().clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        return [float((net(x_test[:, p]).argmax(1) == y_test).float().mean()) for p in perms]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--e-lambda", type=float, default=0.7, help="the official lambda (ours is twice it)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--root", default=os.environ.get("LIFELONG_DATA_DIR", "data"), help="holds MNIST/raw")
    args = parser.parse_args()
    for seed in args.seeds:
        accs = run(seed, args.e_lambda, args.lr, args.tasks, args.root)
        print(f"seed {seed}: average accuracy {100 * sum(accs) / len(accs):.2f} %", flush=True)


if __name__ == "__main__":
    main()
