"""Where a fusedopt step's time goes on many small parameters: the kernel op by itself,
the op's argument passing (a call that GradScaler's found_inf makes return before the
kernel), the per-step check of every row (``_collect_work``: ``_C.sync_check`` and the
plans), and the rest. torch's fused step is timed in the same loop, interleaved, and so
are torch's and fusedopt's steps over one tensor of as many elements: the same bytes
moved with no per-parameter work. A step over the many that moves those bytes no faster
than torch's one-tensor step cannot beat torch fused by more than torch fused's time over
the many divided by its time over the one (the "ceiling" line).

    python benchmarks/host_cost.py [--algo sgd|adam|adamw] [--count 3000] [--size 2048]
                                   [--shared-memory] [--parameters] [--reps 200]

With --shared-memory the params stay where share_memory_() put them, so the op gets one
tensor per row instead of the flat buffer. Medians in microseconds; the parts are timed
separately and need not add up to the step (caches are warmer when a part runs alone).
"""
import argparse
import statistics
import time

import torch

import fusedopt
from fusedopt import adam, sgd

ALGOS = {"sgd": (torch.optim.SGD, fusedopt.SGD, sgd, "sgd_step_", dict(lr=0.01, momentum=0.9)),
         "adam": (torch.optim.Adam, fusedopt.Adam, adam, "adam_step_", dict(lr=1e-3)),
         "adamw": (torch.optim.AdamW, fusedopt.AdamW, adam, "adam_step_", dict(lr=1e-3))}


def median_us(fn, reps):
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algo", choices=ALGOS, default="sgd")
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--shared-memory", action="store_true")
    parser.add_argument("--parameters", action="store_true", help="nn.Parameter objects, as models hold")
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args()
    torch_cls, fused_cls, module, op_name, kwargs = ALGOS[args.algo]
    torch.manual_seed(0)
    params = [torch.randn(args.size) for _ in range(args.count)]
    torch_params = [p.clone() for p in params]  # torch's memory of its own, as the bench gives it
    if args.shared_memory:
        for p in (*params, *torch_params):
            p.share_memory_()
    params, torch_params = ([torch.nn.Parameter(p) if args.parameters else p.requires_grad_() for p in ps]
                            for ps in (params, torch_params))
    fused = fused_cls(params, **kwargs)
    for p, q in zip(params, torch_params):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    fused.step()
    reference = torch_cls(torch_params, fused=True, **kwargs)
    for p, q in zip(params, torch_params):
        reference.state[q] = {key: value.clone() for key, value in fused.state[p].items()}

    op = getattr(module.ops, op_name)
    calls = []
    setattr(module.ops, op_name, lambda *a: (calls.append(a), op(*a))[1])
    fused.step()
    setattr(module.ops, op_name, op)
    call = calls[0]
    skipped = list(call)  # the same call with found_inf set: it returns before the kernel
    names = [a.name for a in getattr(torch.ops.fusedopt, op_name).default._schema.arguments]
    skipped[names.index("found_inf")] = torch.ones(())

    one = torch.nn.Parameter(torch.randn(args.count * args.size))  # fusedopt moves it into its buffer
    one.grad = torch.randn_like(one)
    one_torch = torch.nn.Parameter(one.detach().clone())
    one_torch.grad = one.grad.clone()
    steps = {"torch fused step": reference.step, "fusedopt step": fused.step,
             "torch fused step, one tensor of as many elements": torch_cls([one_torch], fused=True, **kwargs).step,
             "fusedopt step, one tensor of as many elements": fused_cls([one], **kwargs).step}
    for step in steps.values():
        step()  # the one-tensor optimizers' first step makes their state
    times = {name: [] for name in steps}
    for _ in range(args.reps):  # round robin, as the bench: no step finds its data left in the caches
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    rows = [(name, 1e6 * statistics.median(values)) for name, values in times.items()]
    def run(op, *args):  # as the step calls the op
        with torch.no_grad():
            module.ops.run(op, *args)
    rows += [("kernel op alone", median_us(lambda: run(op, *call), args.reps)),
             ("op argument passing (returns before the kernel)", median_us(lambda: run(op, *skipped), args.reps)),
             ("per-step check (_collect_work)", median_us(fused._collect_work, args.reps))]
    setattr(module.ops, op_name, lambda *a: None)
    rows.append(("step with the op stubbed out", median_us(fused.step, args.reps)))
    setattr(module.ops, op_name, op)
    where = "shared memory" if args.shared_memory else "moved into fusedopt's buffer"
    kind = "nn.Parameter" if args.parameters else "tensors"
    print(f"{args.algo}, {args.count} {kind} of {args.size}, {where}; {len(call[0])} param tensor(s) to the op")
    for name, us in rows:
        print(f"  {name:50s} {us:9.1f} us")
    median = dict(rows)
    ceiling = median["torch fused step"] / median["torch fused step, one tensor of as many elements"]
    print(f"  ceiling: torch fused's step over these tensors / over one tensor of as many elements = {ceiling:.2f}x"
          f" (a step with no per-parameter cost at torch's own speed over the bytes; fusedopt's: "
          f"{median['torch fused step'] / median['fusedopt step']:.2f}x)")


if __name__ == "__main__":
    main()
