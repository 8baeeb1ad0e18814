"""fusedopt as a drop-in for torch.optim in the classic training loop.

Trains a small MLP on scikit-learn's bundled digits (8x8 images, no download) twice,
from the same seed and initial weights: once with torch.optim, once with fusedopt.
Prints both loss curves side by side and exits non-zero if they, or the final
weights, differ by more than float32 rounding can explain.

    python examples/train_digits.py --epochs 20 --optimizer adamw
"""
import argparse
import copy
import sys
from dataclasses import dataclass

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fusedopt

SEED = 0
BATCH_SIZE = 64
# name: (torch.optim class, fusedopt class, hyperparameters)
OPTIMIZERS = {
    "adamw": (torch.optim.AdamW, fusedopt.AdamW, {"lr": 3e-3, "weight_decay": 0.01}),
    "adam": (torch.optim.Adam, fusedopt.Adam, {"lr": 3e-3}),
    "sgd": (torch.optim.SGD, fusedopt.SGD, {"lr": 0.05, "momentum": 0.9}),
}


@dataclass(frozen=True)
class Tolerance:
    loss_rtol: float    # per epoch: |a - b| <= loss_rtol * max(|a|, |b|) + loss_atol
    loss_atol: float
    weight_rtol: float  # final weights: ||a - b|| / ||a|| over all of them


# The two runs do the same float32 math, possibly in another order inside a kernel;
# last-bit differences grow over training (to ~2e-7 relative here), far below these.
FLOAT32_TOLERANCE = Tolerance(loss_rtol=1e-4, loss_atol=1e-6, weight_rtol=1e-5)


def use_one_thread_on_cpu(device: torch.device) -> None:
    # 64x128 matmuls are too small to split: on a busy CPU, waiting for a second
    # thread costs far more than the work it would take over.
    if device.type == "cpu":
        torch.set_num_threads(1)


def digits_datasets(device: torch.device) -> tuple[TensorDataset, TensorDataset]:
    """80/20 train/test split of the 1797 digits, pixels scaled to [0, 1]."""
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float32, device=device)
    y = torch.tensor(labels, dtype=torch.long, device=device)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SEED)).to(device)
    split = int(0.8 * len(x))
    train, test = order[:split], order[split:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def train_loader(dataset: TensorDataset) -> DataLoader:
    # Seeded afresh for each run: both runs see the same batches in the same order.
    return DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True,
                      generator=torch.Generator().manual_seed(SEED))


def make_model(device: torch.device) -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(),
                         nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10)).to(device)


def make_scheduler(optimizer, epochs: int):
    # Halve the learning rate three times over the run.
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, epochs // 4), gamma=0.5)


def train(model: nn.Module, optimizer, dataset: TensorDataset, epochs: int) -> list[float]:
    """The loop as the PyTorch tutorials teach it; returns the mean loss of each epoch."""
    scheduler = make_scheduler(optimizer, epochs)
    loader = train_loader(dataset)
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    for _ in range(epochs):
        total = 0.0
        for images, labels in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(images), labels)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(labels)
        scheduler.step()
        losses.append(total / len(dataset))
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, dataset: TensorDataset) -> float:
    images, labels = dataset.tensors
    return (model(images).argmax(dim=1) == labels).float().mean().item()


def weight_differences(a: nn.Module, b: nn.Module) -> tuple[float, float]:
    """(max |a - b| over all weights, ||a - b|| / ||a|| over all weights together)."""
    pairs = [(pa.detach().float(), pb.detach().float())
             for pa, pb in zip(a.parameters(), b.parameters())]
    max_abs = max((pa - pb).abs().max().item() for pa, pb in pairs)
    gap_norm = sum(((pa - pb) ** 2).sum() for pa, pb in pairs).sqrt()
    norm = sum((pa ** 2).sum() for pa, _ in pairs).sqrt()
    return max_abs, (gap_norm / norm).item()


def compare(names: tuple[str, str], curves: tuple[list[float], list[float]],
            models: tuple[nn.Module, nn.Module], test: TensorDataset,
            tolerance: Tolerance) -> bool:
    """Prints the curves side by side and the final weights' gap; True if both are
    within tolerance."""
    print(f"{'epoch':>5}  {names[0]:>20}  {names[1]:>20}  {'|diff|':>9}")
    for epoch, (ours, theirs) in enumerate(zip(*curves), start=1):
        print(f"{epoch:>5}  {ours:>20.7f}  {theirs:>20.7f}  {abs(ours - theirs):>9.2e}")
    for name, model in zip(names, models):
        print(f"test accuracy {name}: {accuracy(model, test):.4f}")
    max_abs, relative = weight_differences(*models)
    print(f"final weights: max |difference| {max_abs:.3e}, "
          f"relative L2 difference {relative:.3e} (tolerance {tolerance.weight_rtol:.2g})")
    curves_agree = all(abs(a - b) <= tolerance.loss_rtol * max(abs(a), abs(b)) + tolerance.loss_atol
                       for a, b in zip(*curves))
    agree = curves_agree and relative <= tolerance.weight_rtol
    print(f"agree: {'yes' if agree else 'NO'} "
          f"(losses: rtol {tolerance.loss_rtol:.2g}, atol {tolerance.loss_atol:.2g})")
    return agree


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--epochs", type=int, default=20, help="default: 20")
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adamw",
                        help="default: adamw")
    return parser.parse_args()


def main() -> int:
    args = parse_args("Train an MLP on digits with torch.optim and with fusedopt; compare.")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_one_thread_on_cpu(device)
    torch_cls, fusedopt_cls, hyperparameters = OPTIMIZERS[args.optimizer]
    train_set, test_set = digits_datasets(device)
    reference = make_model(device)
    candidate = copy.deepcopy(reference)  # identical initial weights

    curves = (train(reference, torch_cls(reference.parameters(), **hyperparameters),
                    train_set, args.epochs),
              train(candidate, fusedopt_cls(candidate.parameters(), **hyperparameters),
                    train_set, args.epochs))
    names = (f"torch.optim.{torch_cls.__name__}", f"fusedopt.{fusedopt_cls.__name__}")
    agree = compare(names, curves, (reference, candidate), test_set, FLOAT32_TOLERANCE)
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
