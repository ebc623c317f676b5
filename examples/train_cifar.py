"""Train a CIFAR-10 network of He et al. 2015 (residual or plain) on the fused blocks.

The paper's recipe (section 4.2): SGD with momentum 0.9, weight decay 1e-4, batch 128, learning
rate 0.1 divided by 10 at 50% and 75% of training (its 32k and 48k of 64k iterations), 4-pixel
padding + random 32x32 crops + horizontal flips. Data: the python-pickle CIFAR-10 directory given
by --data (nothing is downloaded), or a synthetic learnable task of the same shape.

Writes DIR/log.csv (train/test loss and error per epoch), DIR/weights.pt (the state_dict, for
``python -m fusedres responses|lesion --weights``) and DIR/curves.png (with matplotlib).
The degradation experiment (Fig. 6), one command per model:

    python examples/train_cifar.py --model plain20 --data ~/data/cifar-10-batches-py
    python examples/train_cifar.py --model plain56 --data ~/data/cifar-10-batches-py
    python examples/train_cifar.py --model resnet56 --data ~/data/cifar-10-batches-py \\
        --compare runs/plain20/log.csv runs/plain56/log.csv
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

from fusedres import models
from fusedres.models.cifar_data import load_cifar10, synthetic_cifar10

FIELDS = ("epoch", "lr", "train_loss", "train_error", "test_loss", "test_error", "seconds")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20", choices=models.CIFAR_MODELS)
    parser.add_argument("--data", metavar="PATH", help="cifar-10-batches-py directory (default: synthetic task)")
    parser.add_argument("--synthetic-size", type=int, default=5000,
                        help="training images of the synthetic task (the test split has a fifth as many)")
    parser.add_argument("--epochs", type=int, default=164, help="default 164: the paper's 64k iterations")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--warmup-iters", type=int, default=0,
                        help="iterations at lr/10 first (the paper uses 400 for resnet110)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", metavar="DIR", help="output directory (default: runs/MODEL)")
    parser.add_argument("--compare", nargs="+", default=[], metavar="CSV",
                        help="log.csv files of other runs to draw in the same plot")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def augment(images: torch.Tensor) -> torch.Tensor:
    """Random 32x32 crops of the 4-pixel zero-padded images, each flipped with probability 1/2."""
    n, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (4, 4, 4, 4))
    top, left = torch.randint(0, 9, (2, n, 1), device=device)
    rows = (top + torch.arange(h, device=device)).view(n, 1, h, 1)
    cols = (left + torch.arange(w, device=device)).view(n, 1, 1, w)
    crops = padded[torch.arange(n, device=device).view(n, 1, 1, 1), torch.arange(c, device=device).view(1, c, 1, 1),
                   rows, cols]
    flip = torch.rand(n, 1, 1, 1, device=device) < 0.5
    return torch.where(flip, crops.flip(3), crops)


def learning_rate(args: argparse.Namespace, epoch: int, iteration: int) -> float:
    if iteration < args.warmup_iters:
        return args.lr / 10
    milestones = (args.epochs // 2, args.epochs * 3 // 4)
    return args.lr * 0.1 ** sum(epoch >= m for m in milestones)


def progress(epoch: int, epochs: int, done: int, total: int, loss: float, error: float) -> None:
    width = 30
    filled = width * done // total
    sys.stderr.write(f"\repoch {epoch}/{epochs} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
                     f"  loss {loss:.3f}  error {100 * error:5.1f}%")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def train_epoch(model, optimizer, images, labels, args, epoch: int, iteration: int) -> tuple[float, float, int]:
    """One pass over the shuffled training set; returns (mean loss, error, next iteration)."""
    model.train()
    order = torch.randperm(len(images), device=images.device)
    batches = order.split(args.batch_size)
    loss_sum = wrong = seen = 0
    for i, index in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args, epoch, iteration)
        x = augment(images[index]).contiguous(memory_format=torch.channels_last)
        logits = model(x)
        loss = F.cross_entropy(logits, labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        iteration += 1
        loss_sum += loss.item() * len(index)
        wrong += (logits.argmax(1) != labels[index]).sum().item()
        seen += len(index)
        if i + 1 == len(batches) or i % max(1, len(batches) // 30) == 0:
            progress(epoch + 1, args.epochs, i + 1, len(batches), loss_sum / seen, wrong / seen)
    return loss_sum / seen, wrong / seen, iteration


@torch.no_grad()
def evaluate(model, images, labels, batch_size: int = 500) -> tuple[float, float]:
    """(mean loss, error) in eval mode, i.e. on the fused path with BatchNorm folded."""
    model.eval()
    loss_sum = wrong = 0.0
    for x, y in zip(images.split(batch_size), labels.split(batch_size)):
        logits = model(x.contiguous(memory_format=torch.channels_last))
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        wrong += (logits.argmax(1) != y).sum().item()
    return loss_sum / len(images), wrong / len(images)


def read_log(path: pathlib.Path) -> dict[str, list[float]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {field: [float(row[field]) for row in rows] for field in FIELDS}


def plot_curves(runs: dict[str, dict[str, list[float]]], path: pathlib.Path) -> None:
    """The paper's Fig. 6 style: training error dashed, test error bold. Needs matplotlib."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for name, log in runs.items():
        line, = ax.plot(log["epoch"], [100 * e for e in log["test_error"]], linewidth=2, label=name)
        ax.plot(log["epoch"], [100 * e for e in log["train_error"]], "--", color=line.get_color(), linewidth=1)
    ax.set(xlabel="epoch", ylabel="error (%)",
           title="CIFAR-10 training (He et al. 2015, Fig. 6 style)\ndashed: training error, bold: test error")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    out = pathlib.Path(args.out or f"runs/{args.model}")
    out.mkdir(parents=True, exist_ok=True)
    if args.data:
        try:
            train, test = load_cifar10(args.data, "train"), load_cifar10(args.data, "test")
        except FileNotFoundError as exc:
            raise SystemExit(f"train_cifar.py: error: --data: {args.data} is not a cifar-10-batches-py directory "
                             f"(missing {exc.filename}); get it from https://www.cs.toronto.edu/~kriz/cifar.html "
                             "(python version)") from None
    else:
        train = synthetic_cifar10(args.synthetic_size, "train")
        test = synthetic_cifar10(max(1, args.synthetic_size // 5), "test")
    (train_x, train_y), (test_x, test_y) = [(x.to(device), y.to(device)) for x, y in (train, test)]
    model = models.CIFAR_MODELS[args.model]().to(device=device, memory_format=torch.channels_last)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {params / 1e6:.2f}M parameters, {len(train_x)} training and {len(test_x)} test images "
          f"({'CIFAR-10' if args.data else 'synthetic'}) on {device}; writing {out}/")
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    log_path = out / "log.csv"
    with open(log_path, "w", newline="") as f:
        log = csv.DictWriter(f, FIELDS)
        log.writeheader()
        iteration = 0
        for epoch in range(args.epochs):
            start = time.perf_counter()
            lr = learning_rate(args, epoch, iteration)
            train_loss, train_error, iteration = train_epoch(model, optimizer, train_x, train_y, args, epoch, iteration)
            test_loss, test_error = evaluate(model, test_x, test_y)
            seconds = time.perf_counter() - start
            log.writerow(dict(zip(FIELDS, (epoch + 1, lr, train_loss, train_error, test_loss, test_error, seconds))))
            f.flush()
            print(f"epoch {epoch + 1}: train error {100 * train_error:.2f}%, test error {100 * test_error:.2f}% "
                  f"(loss {train_loss:.3f} / {test_loss:.3f}), {seconds:.1f} s")
    torch.save(model.state_dict(), out / "weights.pt")
    runs = {args.model: read_log(log_path)}
    runs.update({pathlib.Path(p).parent.name: read_log(pathlib.Path(p)) for p in args.compare})
    try:
        plot_curves(runs, out / "curves.png")
        print(f"wrote {log_path}, {out / 'weights.pt'} and {out / 'curves.png'}")
    except ImportError:
        print(f"wrote {log_path} and {out / 'weights.pt'}; matplotlib is not installed: no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
