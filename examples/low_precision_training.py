"""Training in bfloat16 with fewer bytes per parameter: what rounding does to the loss.

A small MLP learns a fixed random teacher MLP (synthetic regression, CPU, well under a
minute) four ways, all with fusedopt.AdamW and the same data:

* fp32: float32 params and state (torch.optim's trajectory);
* bf16, round to nearest: bf16 params and bf16 state, every store rounded to nearest.
  Late in training Adam's updates are smaller than half a bf16 ulp of the weights, so
  rounding to nearest drops them and the run stalls;
* bf16, stochastic rounding: the same bytes, rounded up or down at random with the
  right odds, so the updates survive on average;
* bf16, master weights: bf16 params for the forward pass, a float32 master copy (and
  float32 moments) in the optimizer, which follows the fp32 run.

Prints the final losses and the optimizer's bytes per parameter for each mode, and
with --plot writes the loss curves (docs/low-precision.png in the repository).

    python examples/low_precision_training.py --plot docs/low-precision.png
"""
import argparse
import time

import torch
from torch import nn

import fusedopt

MODES = {
    "fp32": (torch.float32, {}),
    "bf16, round to nearest": (torch.bfloat16, {}),
    "bf16, stochastic rounding": (torch.bfloat16, {"stochastic_rounding": True}),
    "bf16, master weights": (torch.bfloat16, {"master_weights": True}),
}
INPUTS, HIDDEN = 32, 256


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(INPUTS, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(),
                         nn.Linear(HIDDEN, 1))


def batches(steps: int, batch: int):
    """The same inputs and teacher targets for every mode."""
    teacher = mlp(seed=1)
    generator = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x = torch.randn(batch, INPUTS, generator=generator)
        with torch.no_grad():
            y = teacher(x)
        yield x, y


def train(dtype: torch.dtype, options: dict, steps: int, batch: int, lr: float) -> tuple[list[float], fusedopt.AdamW]:
    model = mlp(seed=0).to(dtype)
    optimizer = fusedopt.AdamW(model.parameters(), lr=lr, weight_decay=0.0, **options)
    torch.manual_seed(3)  # stochastic rounding draws its random bits from torch's generator
    losses = []
    for x, y in batches(steps, batch):
        loss = (model(x.to(dtype)).float() - y).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, optimizer


def bytes_per_parameter(optimizer: fusedopt.AdamW) -> float:
    """The param and every state tensor the optimizer keeps, per parameter element."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    total = sum(p.numel() * p.element_size() for p in params)
    total += sum(v.numel() * v.element_size() for p in params for k, v in optimizer.state[p].items()
                 if torch.is_tensor(v) and k != "step")
    return total / sum(p.numel() for p in params)


def smoothed(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--plot", default=None, help="write the loss curves to this PNG")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small matmuls: threads cost more than they give

    curves, rows = {}, []
    for name, (dtype, options) in MODES.items():
        start = time.perf_counter()
        losses, optimizer = train(dtype, options, args.steps, args.batch, args.lr)
        curves[name] = losses
        final = sum(losses[-100:]) / 100
        rows.append((name, final, bytes_per_parameter(optimizer), time.perf_counter() - start))

    print(f"AdamW lr={args.lr}, {args.steps} steps of {args.batch}; final loss = mean of the last 100 steps")
    print(f"{'mode':<28}{'final loss':>12}{'vs fp32':>9}{'bytes/param':>13}{'seconds':>9}")
    fp32_final = rows[0][1]
    for name, final, nbytes, seconds in rows:
        print(f"{name:<28}{final:>12.3e}{final / fp32_final:>8.2f}x{nbytes:>13.1f}{seconds:>9.1f}")
    print("bytes/param: the param plus the optimizer's state (Adam's two moments; with master "
          "weights also the float32 copy); grads add the param's size.")

    if args.plot:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8, 4.5), layout="constrained")
        ax = fig.subplots()
        # fp32 dotted on top: the two bf16 modes that track it lie under it.
        looks = [("black", ":", 2.2, 3), ("#d55e00", "-", 1.6, 2), ("#0072b2", "-", 1.6, 2), ("#009e73", "--", 1.6, 2)]
        for (name, losses), (colour, style, width, order) in zip(curves.items(), looks):
            final = sum(losses[-100:]) / 100
            ax.plot(smoothed(losses, 50), color=colour, linestyle=style, linewidth=width, zorder=order,
                    label=f"{name}: final {final:.2e}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (MSE, mean of 50 steps)")
        ax.set_title(f"fusedopt.AdamW (lr={args.lr}) on a teacher-student MLP: bf16 params and state",
                     fontsize=10, loc="left")
        ax.legend(frameon=False)
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
