"""step() under torch.compile: one fusedopt op per part inside the graph, with the
bookkeeping run eagerly while dynamo traces, as torch.optim's _init_group is."""
from __future__ import annotations

import torch

from .flat_buffer import local_of
from .clipping import GradTransform


class CompiledStep:
    """The FusedOptimizer half that dynamo traces."""

    def _traced_step(self, transform: GradTransform) -> None:
        """step() as dynamo traces it: one fusedopt op per part, nothing else. The
        bookkeeping is _init_group's, which dynamo runs eagerly while tracing (as for
        torch.optim's own optimizers) and then guards on: every parameter and state tensor
        it returns, the grads, the param groups. When any of them changes the step
        recompiles, and the new trace re-synchronises the cache: the compiled step follows
        the public objects as the eager one does."""
        self._pending_grad_multiplier = None
        guarded: list[torch.Tensor] = []
        layout = self._init_group(guarded)  # first: see _init_group
        for t in guarded:  # realised, so that dynamo installs its guards
            t.shape
        for index, k, positions in layout:
            group = self.param_groups[index]
            part = self._plans[index].parts[k]
            buf = part.buf
            rows = [part.rows[j] for j in positions]
            grads = [part.params[j].grad for j in positions]
            grads = [local_of(g) for g in grads]
            buf.before_kernel()
            self._update_buffer(group, buf, buf.kernel_params(rows), buf.segments(rows),
                                buf.kernel_grads(rows, grads, False), transform.on(buf.device))
            buf.after_kernel()

    def _init_group(self, guarded: list[torch.Tensor]) -> tuple[tuple[int, int, tuple[int, ...]], ...]:
        """The eager half of a traced step (see _traced_step): the whole per-step check and
        re-synchronisation, before any graph runs, and the state torch.optim creates at a
        first step. Called before the traced code touches ``param_groups``: once dynamo
        has wrapped a parameter it holds a reference to its storage, and the parameter
        would no longer look movable into a flat buffer (``may_move``). Appends to
        ``guarded`` the parameters with grads and their state tensors (dynamo guards on
        the identity of what this returns in a list: replacing one recompiles). Returns,
        per part with grads, (its group's index, its index in the group's plan, the
        positions of its rows with grads)."""
        work = self._collect_work()
        index_of = {id(group): i for i, group in enumerate(self.param_groups)}
        layout = []
        for c in work:
            self._ensure_state(c.part, c.rows)
            c.part.buf.segments(c.buffer_rows())  # cached now (with its params), not made inside the graph
            for p in c.updated_params():
                guarded.append(p)
                guarded.extend(v for v in self.state.get(p, {}).values() if torch.is_tensor(v))
            index = index_of[id(c.group)]
            layout.append((index, self._plans[index].parts.index(c.part), tuple(c.rows)))
        return tuple(layout)
