"""fusedopt with automatic mixed precision: torch.autocast + torch.amp.GradScaler.

The model, data and comparison of train_digits.py, trained with torch.optim and with
fusedopt under autocast: float16 on CUDA, bfloat16 on the CPU. float16 needs the
GradScaler; bfloat16 has float32's exponent range and does not, but the scaler runs on
the CPU too, so the path fp16 training relies on (GradScaler hands the optimizer
grad_scale and found_inf instead of unscaling the grads itself) is exercised on any
machine. Exits non-zero if the two runs disagree beyond what low-precision
rounding explains.

    python examples/amp_training.py --epochs 20 --optimizer adamw
"""
import copy
import sys

import torch
from torch import nn

from train_digits import (OPTIMIZERS, Tolerance, compare, digits_datasets, make_model,
                          make_scheduler, parse_args, train_loader, use_one_thread_on_cpu)

AUTOCAST_DTYPE = {"cuda": torch.float16, "cpu": torch.bfloat16}
# Under autocast a last-bit gap between the runs' float32 weights flips roundings of
# their half-precision copies, and (Adam's normalised steps most of all) the runs drift
# apart: torch.optim's own for-loop and fused Adam(W) end up 1-3% apart (relative L2)
# after 20-60 epochs, their losses up to ~2.5% apart once they fall near 0.01.
# These bounds leave room for that; train_digits.py is the strict check.
AMP_TOLERANCE = Tolerance(loss_rtol=2e-2, loss_atol=1e-3, weight_rtol=0.1)


def train_amp(model: nn.Module, optimizer, dataset, epochs: int, device: torch.device) -> list[float]:
    """The AMP recipe's loop; returns the mean loss of each epoch."""
    scheduler = make_scheduler(optimizer, epochs)
    scaler = torch.amp.GradScaler(device.type)
    loader = train_loader(dataset)
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    for _ in range(epochs):
        total = 0.0
        for images, labels in loader:
            optimizer.zero_grad()
            with torch.autocast(device.type, dtype=AUTOCAST_DTYPE[device.type]):
                loss = loss_fn(model(images), labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)  # skips the step if the scaled grads overflowed
            scaler.update()
            total += loss.item() * len(labels)
        scheduler.step()
        losses.append(total / len(dataset))
    return losses


def main() -> int:
    args = parse_args("Train an MLP on digits under autocast with torch.optim and with "
                      "fusedopt; compare.")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_one_thread_on_cpu(device)
    torch_cls, fusedopt_cls, hyperparameters = OPTIMIZERS[args.optimizer]
    train_set, test_set = digits_datasets(device)
    reference = make_model(device)
    candidate = copy.deepcopy(reference)  # identical initial weights

    print(f"autocast to {AUTOCAST_DTYPE[device.type]} on {device.type}, with GradScaler")
    curves = (train_amp(reference, torch_cls(reference.parameters(), **hyperparameters),
                        train_set, args.epochs, device),
              train_amp(candidate, fusedopt_cls(candidate.parameters(), **hyperparameters),
                        train_set, args.epochs, device))
    names = (f"torch.optim.{torch_cls.__name__}", f"fusedopt.{fusedopt_cls.__name__}")
    agree = compare(names, curves, (reference, candidate), test_set, AMP_TOLERANCE)
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
