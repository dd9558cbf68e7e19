"""Where a GLEAN model's certified radius on CMNIST's test domain comes from (issue 14 item 7).

    python benchmarks/glean_margins.py                       # the data's geometry only
    python benchmarks/glean_margins.py --checkpoint PATH     # and a trained model's margin function

GLEAN's deterministic radius of an example is its latent margin m(x) = (w.Psi(x) + b) / ||w|| (w, b: the
difference of the head's two rows), divided by L = 1; the Monte-Carlo radius is that margin capped at 0.457
(sigma 0.12, n = 100,000). Three figures say what limits it:

1. The data's geometry: for each 14x14 digit (CMNIST's striding) the distance to the nearest training digit of the
   other class (0-4 vs 5-9, true digits). A 1-Lipschitz classifier that gets both right cannot have margins
   summing to more than that distance, so it caps what any model could certify.
2. The model's use of its Lipschitz budget: ||grad_x m(x)|| (1 = every unit of input distance moves the margin by
   one unit, the most a 1-Lipschitz encoder allows), and the share of that gradient on the empty colour channel.
3. The colour part of the margin: |m(x) - m(swap x)| / 2 with the two colour channels exchanged. On the test
   domain colour disagrees with the label for 90% of the examples, so this much of the margin is lost there.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from trainables import checkpoint  # noqa: E402
from trainables.data import load_dataset  # noqa: E402

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def quantiles(v: torch.Tensor) -> str:
    return "  ".join(f"q{int(q * 100)} {torch.quantile(v.double(), q).item():.3f}" for q in QUANTILES)


def strided_digits(split, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k digits of an MNIST split as CMNIST builds them ([::2, ::2], [k, 196]) and their class (< 5)."""
    xs, ys = zip(*[(split[i][0], int(split[i][1])) for i in range(min(k, len(split)))])
    x = torch.stack(xs)[:, 0, ::2, ::2].flatten(1)
    return x, torch.tensor(ys) < 5


def geometry(data_root: str | None, examples: int) -> None:
    splits = load_dataset("mnist", data_root, seed=0, download=False)
    test, yt = strided_digits(splits.test, examples)
    train, ytr = strided_digits(splits.train, 50_000)
    d = torch.cdist(test, train)
    other = d.masked_fill(yt[:, None] == ytr[None, :], float("inf")).min(1).values
    print(f"data: {len(test)} test digits, {len(train)} training digits, 14x14 (||x|| median "
          f"{test.norm(dim=1).median():.2f})")
    print(f"  distance to the nearest training digit of the other class: {quantiles(other)}")
    print(f"  share with that distance >= 2 x 0.45 (room for margin 0.45 on both sides): "
          f"{(other >= 0.9).double().mean():.3f}")


def margin_function(path: str, data_root: str | None, examples: int) -> None:
    trainable, _ = checkpoint.load(path)
    net = trainable.net.frozen().double()
    split = load_dataset("cmnist", data_root, seed=0, download=False).test
    x = torch.stack([split[i][0] for i in range(min(examples, len(split)))]).double()
    w = net.head.weight[1] - net.head.weight[0]
    b = net.head.bias[1] - net.head.bias[0]
    xg = x.clone().requires_grad_(True)
    m = (net.encoder(xg) @ w + b) / w.norm()
    grad, = torch.autograd.grad(m.sum(), xg)
    digit = (x[:, 1].flatten(1).sum(1) > x[:, 0].flatten(1).sum(1)).long()
    rows = torch.arange(len(x))
    empty = grad[rows, 1 - digit].flatten(1).norm(dim=1)
    with torch.no_grad():
        swapped = (net.encoder(torch.flip(x, dims=[1])) @ w + b) / w.norm()
    print(f"model {path}: {len(x)} test-domain examples, L = {net.lipschitz():.5f}")
    print(f"  |margin|                        {quantiles(m.detach().abs())}")
    print(f"  ||grad_x margin||               {quantiles(grad.flatten(1).norm(dim=1))}")
    print(f"  its norm on the empty channel   {quantiles(empty)}")
    print(f"  colour part |m(x)-m(swap x)|/2  {quantiles((m.detach() - swapped).abs() / 2)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--checkpoint", help="a GLEAN cmnist checkpoint (model.pt, e.g. a run's checkpoint artifact)")
    p.add_argument("--examples", type=int, default=1000, help="test examples to measure (default 1000)")
    p.add_argument("--data-root", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    geometry(args.data_root, args.examples)
    if args.checkpoint:
        margin_function(args.checkpoint, args.data_root, args.examples)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
