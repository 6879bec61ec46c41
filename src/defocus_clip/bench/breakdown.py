"""Where a tower's training step spends its time, measured inside ordinary steps (hooks, no profiler).

Forward: pre/post hooks on every module give each call's inclusive time; a module's *self* time is that minus the
time of its hooked children, so functional code in a module's `forward` (a fused kernel called from the mixer, say)
counts to that module and nothing counts twice. Backward: before each backward pass a prehook and a hook go on every
node of the new graph; a node's time runs from the first to the second, keyed by the node's name and the shape of
the gradient it receives (in_proj's and out_proj's `MmBackward0` differ there). What no hook covers (the autograd
engine between nodes, the loss, `zero_grad`) is reported as the rest.

Why not torch.profiler (`--profile`, `--gemms`): on these CPUs it changes what it measures. A profiled De-focus
Mamba-B/32 step took 4.85 s against 3.0-3.2 s unprofiled, and its in_proj forward 46 ms per call at 164 GFLOP/s,
where the same product takes 21-22 ms in an unprofiled step and 19.5 ms alone (session 14, docs/benchmarks.md).
The hooks cost a few microseconds per module call and node, ~1000 per step: well under 1% of a B/32 step.

    python -m defocus_clip.bench.towers --breakdown --steps 4 [--models ViT-B-32 DeFocus-Mamba-B-32]
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch
import torch.nn as nn

_ACCUMULATE = "torch::autograd::AccumulateGrad"


def module_key(module: nn.Module) -> str:
    """A row of the forward table: the module's class, with the sizes that tell apart the linears of one block."""
    name = type(module).__name__
    if isinstance(module, nn.Linear):
        return f"{name} {module.in_features}->{module.out_features}"
    return name


def node_key(node, grad_outputs) -> str:
    """A row of the backward table: the node's name and the shape of the (first) gradient it receives; the
    AccumulateGrad nodes of all parameters in one row."""
    name = node.name()
    if name == _ACCUMULATE:
        return name
    shape = next((tuple(g.shape) for g in grad_outputs if g is not None), None)
    return f"{name} {list(shape) if shape is not None else '-'}"


class StepBreakdown:
    """Hooks on one tower that split each `step(images)` (forward, `square().mean()`, backward, gradients freed, as
    `towers.train_step`) into module self times (forward) and node times (backward); `totals()` per step."""

    def __init__(self, tower: nn.Module):
        self.tower = tower
        self.forward_s: dict[str, float] = defaultdict(float)
        self.backward_s: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.steps: list[tuple[float, float]] = []  # (forward, backward) seconds
        self._stack: list[list[float]] = []  # per open module call: [start, seconds of hooked children]
        self._started: dict = {}  # backward node -> when it started
        self._accumulators: set = set()  # AccumulateGrad nodes outlive a step: hooked once (held here)
        for module in tower.modules():  # for the tower's life: it is built for this measurement
            module.register_forward_pre_hook(self._pre)
            module.register_forward_hook(self._post)

    def _pre(self, module, args) -> None:
        self._stack.append([time.perf_counter(), 0.0])

    def _post(self, module, args, output) -> None:
        start, children = self._stack.pop()
        inclusive = time.perf_counter() - start
        key = module_key(module)
        self.forward_s[key] += inclusive - children
        self.calls[key] += 1
        if self._stack:
            self._stack[-1][1] += inclusive

    def _prehook(self, node) -> None:
        self._started[node] = time.perf_counter()

    def _hook(self, node, grad_outputs) -> None:
        key = node_key(node, grad_outputs)
        self.backward_s[key] += time.perf_counter() - self._started.pop(node)
        self.calls[key] += 1

    def _hook_graph(self, root) -> None:
        """Hook every node of this step's graph (a new graph each step; a parameter's AccumulateGrad node once)."""
        seen, todo = set(), [root]
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            todo.extend(fn for fn, _ in node.next_functions)
            if node.name() == _ACCUMULATE:
                if node in self._accumulators:
                    continue
                self._accumulators.add(node)
            node.register_prehook(lambda grad_outputs, node=node: self._prehook(node))
            node.register_hook(lambda grad_inputs, grad_outputs, node=node: self._hook(node, grad_outputs))

    def step(self, images: torch.Tensor) -> None:
        t0 = time.perf_counter()
        loss = self.tower(images).float().square().mean()
        t1 = time.perf_counter()
        self._hook_graph(loss.grad_fn)
        t2 = time.perf_counter()
        loss.backward()
        self.tower.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        self.steps.append((t1 - t0, t3 - t2))

    def reset(self) -> None:
        """Forget what was measured (after the warm-up steps)."""
        self.forward_s.clear()
        self.backward_s.clear()
        self.calls.clear()
        self.steps.clear()

    def totals(self) -> dict:
        """Per step, means over the measured steps: forward, backward, whole step and the two tables (rows: seconds,
        calls), so that the step minus the rows is exactly the time outside every hook."""
        n = len(self.steps)
        if not n:
            raise ValueError("no step measured")
        fwd, bwd = (statistics.fmean(s[i] for s in self.steps) for i in range(2))

        def table(seconds: dict[str, float]) -> dict[str, list]:
            rows = {k: [s / n, self.calls[k] // n] for k, s in seconds.items()}
            return dict(sorted(rows.items(), key=lambda kv: -kv[1][0]))

        return {"step_s": fwd + bwd, "forward_s": fwd, "backward_s": bwd, "forward": table(self.forward_s),
                "backward": table(self.backward_s)}


def bench_breakdown(models: list[str] | None = None, batch_size: int = 32, image_size: int = 224, steps: int = 4,
                    warmup: int = 2, threads: int | None = None, keep_memory: bool = True) -> dict:
    """Every tower's step split by `StepBreakdown`, in one process, the towers' steps alternating (rotating order) so
    that the two tables describe steps taken seconds apart; `keep_memory`: glibc keeps freed memory, as the trainer."""
    from ..train.host import keep_freed_memory
    from .measure import machine_info, time_interleaved
    from .towers import BASELINE, GOAL_MODEL, build_tower, resolve_spec

    kept = keep_freed_memory() if keep_memory else False
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    specs = [resolve_spec(m) for m in models] if models else [BASELINE, GOAL_MODEL]
    images = torch.randn(batch_size, 3, image_size, image_size)
    splits = {spec: StepBreakdown(build_tower(spec, image_size)) for spec in specs}
    time_interleaved(lambda spec: splits[spec].step(images), specs, 0, warmup)
    for split in splits.values():
        split.reset()
    time_interleaved(lambda spec: splits[spec].step(images), specs, steps, 0)
    return {"batch_size": batch_size, "image_size": image_size, "steps": steps, "threads": torch.get_num_threads(),
            "kept_freed_memory": kept, "machine": machine_info(),
            "models": {spec: split.totals() for spec, split in splits.items()}}


def format_breakdown(result: dict, rows: int = 12) -> str:
    from .towers import malloc_words

    m = result["machine"]
    lines = [f"where a training step goes, measured in the steps (hooks, no profiler): batch {result['batch_size']}, "
             f"{result['image_size']} px, fp32, {result['threads']} threads, {result['steps']} steps each, towers "
             f"alternating, {malloc_words(result.get('kept_freed_memory', False))}",
             f"  {m['cpu']} ({m['cpu_count']} CPUs, {m['cpu_capability']}), torch {m['torch']}"]
    for spec, r in result["models"].items():
        step = r["step_s"]
        hooked = sum(s for s, _ in r["forward"].values()) + sum(s for s, _ in r["backward"].values())
        lines += ["", f"{spec}: step {step:.3f} s = forward {r['forward_s']:.3f} s + backward {r['backward_s']:.3f} s; "
                      f"outside every hook {step - hooked:.3f} s",
                  f"  {'s/step':>7} {'share':>6} {'calls':>5}  forward: module self time"]
        for key, (seconds, calls) in list(r["forward"].items())[:rows]:
            lines.append(f"  {seconds:7.3f} {seconds / step:6.1%} {calls:5d}  {key}")
        lines.append(f"  {'s/step':>7} {'share':>6} {'calls':>5}  backward: autograd node [gradient it receives]")
        for key, (seconds, calls) in list(r["backward"].items())[:rows]:
            lines.append(f"  {seconds:7.3f} {seconds / step:6.1%} {calls:5d}  {key}")
    return "\n".join(lines)
