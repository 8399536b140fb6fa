"""How plan search measures a plan: evaluators that run the model under any plan, and the objective.

Two evaluators, both exact (what the backend runs):

  "graph"   `GraphEvaluator`: the model is captured once by Dynamo (one compile per batch shape); every
            candidate plan is applied to its graph(s) with `ic_compile.rewrite.rewrite(gm, plan, layout=...)`
            and the rewritten graphs are run as is — the code path of `options={"lowering": "eager"}`. Any
            model, graph breaks included: each fragment is bound as the backend binds it, top-k crossing
            fragments through an index store, and every indexer is checked to have run rewritten.
  "prefix"  `PrefixEvaluator`, reference model (ic_compile/dsa_model.py) only. Changing layer i from F to
            S cannot change layers 0..i-1, so the hidden state and top-k entering each layer under the
            current plan are cached per batch, and a candidate is run from layer i onwards only (S layers
            skip their indexer). On average this halves the work per candidate.
  "auto"    "prefix" for the reference model (when its cache fits `cache_limit_bytes`), else "graph".

`Objective`: "lm_loss" (next-token cross entropy) or "kl" (KL(all-F || plan), label-free), token-weighted
over the calibration set; `plan_loss(evaluator, objective, batches, pattern)` is one plan's value.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..capture import GraphRecorder, fragment_recompiles, indexer_results, runnable
from ..index_store import IndexStore
from ..plan import FULL, SHARED, LayerPlan, PlanError
from ..rewrite import RewriteResult, rewrite
from .calibration import as_batches, to_device
from .models import vocab_size


OBJECTIVES = ("lm_loss", "kl")


EVALUATORS = ("auto", "graph", "prefix")


def is_hf_model(model: nn.Module) -> bool:
    return hasattr(model, "config") and not hasattr(model, "tok_embeddings")


def forward_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """logits [B, L, V] for the reference model (forward(idx)) and HF causal LMs alike."""
    if is_hf_model(model):
        return model(input_ids=ids, use_cache=False).logits
    return model(ids)


def is_reference_model(model: nn.Module) -> bool:
    return (hasattr(model, "tok_embeddings") and hasattr(model, "layers") and hasattr(model, "rope_cos")
            and all(hasattr(layer, "attn") for layer in model.layers))


class GraphEvaluator:
    """Runs the model's Dynamo graph(s), rewritten by `rewrite(gm, plan, layout=...)`, for any plan.

    One `torch.compile` with a recording backend; its compiled function dispatches to the rewritten
    graph of the plan currently selected, so changing plans never recompiles. With graph breaks, S
    layers read top-k written by other fragments from one index store per plan, as the backend's."""

    name = "graph"

    def __init__(self, model: nn.Module):
        self.model = model
        self.pattern: str | None = None
        self._recorder = GraphRecorder(runner=self._forward_for)  # dispatches to the selected plan's graph
        self._rewritten: dict[tuple[int, str], tuple[RewriteResult, object]] = {}
        self._stores: dict[str | None, IndexStore] = {}
        self._ran: list[int] = []  # slots run in the current model call
        self._layers: int | None = None  # the model's indexer layers, once num_layers has counted them
        self._compiled = torch.compile(model, backend=self._recorder, dynamic=False)

    def _forward_for(self, slot: int):
        self._ran.append(slot)
        return self._rewrite(slot, self.pattern)[1]

    def _rewrite(self, slot: int, pattern: str | None) -> tuple[RewriteResult, object]:
        key = (slot, pattern)
        if key not in self._rewritten:
            result = rewrite(self._recorder.graphs[slot], pattern, strict=True, layout=self._recorder.layouts[slot])
            store = self._stores.setdefault(pattern, IndexStore(str(result.plan)))
            self._rewritten[key] = result, runnable(result, store)
        return self._rewritten[key]

    def num_layers(self, example: torch.Tensor) -> int:
        if not self._recorder.graphs:
            self.logits(example, None)
        found = indexer_results([self._rewrite(slot, None)[0] for slot in range(len(self._recorder.graphs))],
                                "search", "nothing to search")
        self._layers = sum(len(r.detection.matches) for r in found)
        return self._layers

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, pattern: str | None, batch_index: int | None = None) -> torch.Tensor:
        self.pattern, self._ran = pattern, []
        with fragment_recompiles():
            logits = forward_logits(self._compiled, ids)
        self._check_all_rewritten()
        return logits

    def _check_all_rewritten(self) -> None:
        """Exactness: the call ran every indexer in a rewritten graph, once (a frame Dynamo ran
        uncompiled would run its S layers' indexers in full), and no top-k was left unread."""
        if self._layers is None:
            return  # the first, capturing call: nothing counted yet
        results = [self._rewrite(slot, self.pattern)[0] for slot in self._ran]
        ran = sorted(p for r in results if r.detection.matches
                     for p in (r.fragment.layers if r.fragment is not None else range(len(r.detection.matches))))
        pending = self._stores[self.pattern].pending() if self.pattern in self._stores else {}
        if ran != list(range(self._layers)) or pending:
            raise PlanError(f"search: the model call ran indexer layers {ran} rewritten (of {self._layers}), leaving "
                            f"top-k unread {pending}: a graph Dynamo ran uncompiled, or the model skipped a layer; "
                            "its loss would not be the plan's")

    def accept(self, pattern: str) -> None:  # no per-plan state to refresh
        pass


class PrefixEvaluator:
    """Reference model only: caches each layer's input under the current plan, runs candidates from
    the first changed layer. S layers skip their indexer (as the rewritten graph does)."""

    name = "prefix"

    def __init__(self, model: nn.Module, batches: list[torch.Tensor]):
        if not is_reference_model(model):
            raise ValueError("evaluator='prefix' needs the reference model of ic_compile/dsa_model.py; "
                             "use evaluator='graph' for other models")
        missing = [i for i, layer in enumerate(model.layers) if layer.attn.indexer is None]
        if missing:
            raise PlanError(f"search needs a model whose every layer has its indexer (all F); layers "
                            f"{missing} have none. Build it with index_topk_pattern=None.")
        self.model, self.batches = model, batches
        self.current: str | None = None
        self.cache: list[list[tuple[torch.Tensor, torch.Tensor | None]]] = [[] for _ in batches]

    def num_layers(self, example) -> int:
        return len(self.model.layers)

    @contextlib.contextmanager
    def _shared(self, layer):
        attn = layer.attn
        indexer = attn.indexer
        attn._modules["indexer"] = None
        try:
            yield
        finally:
            attn._modules["indexer"] = indexer

    def _run(self, batch_index: int, pattern: str, start: int, record: bool) -> torch.Tensor:
        model = self.model
        ids = self.batches[batch_index]
        positions = torch.arange(ids.shape[1], device=ids.device)
        cos, sin = model.rope_cos[positions], model.rope_sin[positions]
        if start == 0:
            x, topk = model.tok_embeddings(ids), None
        else:
            x, topk = self.cache[batch_index][start]
        entries = self.cache[batch_index]
        for i in range(start, len(model.layers)):
            layer = model.layers[i]
            if record:
                if len(entries) <= i:
                    entries.append((x, topk))
                else:
                    entries[i] = (x, topk)
            ctx = self._shared(layer) if pattern[i] == SHARED else contextlib.nullcontext()
            with ctx:
                x, topk = layer(x, cos, sin, positions, topk, False)
        return model.output(model.norm(x))

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, pattern: str, batch_index: int) -> torch.Tensor:
        if self.current is None:  # first call: all-F pass that fills the cache
            self.current = pattern
            return self._run(batch_index, pattern, 0, record=True)
        if batch_index is None:
            raise ValueError("prefix evaluator needs the batch index")
        diff = [i for i, (a, b) in enumerate(zip(self.current, pattern)) if a != b]
        if not self.cache[batch_index]:
            return self._run(batch_index, pattern, 0, record=(pattern == self.current))
        start = diff[0] if diff else 0
        return self._run(batch_index, pattern, start, record=False)

    @torch.no_grad()
    def accept(self, pattern: str) -> None:
        """Make `pattern` the current plan: refresh the cached layer inputs from its first change."""
        if self.current is None:
            self.current = pattern
            return
        diff = [i for i, (a, b) in enumerate(zip(self.current, pattern)) if a != b]
        self.current = pattern
        if not diff:
            return
        for b in range(len(self.batches)):
            if self.cache[b]:
                self._run(b, pattern, diff[0], record=True)


CACHE_LIMIT_BYTES = 8 << 30  # prefix-cache and KL-reference budgets (each)


def prefix_cache_bytes(model: nn.Module, batches: list[torch.Tensor]) -> int:
    """What PrefixEvaluator would hold: every layer's input for every calibration token."""
    tokens = sum(b.numel() for b in batches)
    dim = model.args.dim
    elem = next(model.parameters()).element_size()
    return tokens * dim * elem * len(model.layers)


def make_evaluator(model: nn.Module, batches: list[torch.Tensor], evaluator: str = "auto",
                   cache_limit_bytes: int = CACHE_LIMIT_BYTES):
    """"auto": the prefix evaluator for the reference model when its cache fits cache_limit_bytes."""
    if evaluator not in EVALUATORS:
        raise ValueError(f"evaluator={evaluator!r} is not one of {EVALUATORS}")
    if evaluator == "auto":
        evaluator = ("prefix" if is_reference_model(model)
                     and prefix_cache_bytes(model, batches) <= cache_limit_bytes else "graph")
    return PrefixEvaluator(model, batches) if evaluator == "prefix" else GraphEvaluator(model)


class Objective:
    """Token-weighted mean over the calibration set of next-token CE or KL(all-F || candidate).

    KL: the all-F log-probabilities are cached when tokens · vocab · 4 bytes fit cache_limit_bytes,
    else recomputed for every evaluation (twice the work, no memory)."""

    def __init__(self, kind: str, cache_limit_bytes: int = CACHE_LIMIT_BYTES):
        if kind not in OBJECTIVES:
            raise ValueError(f"objective={kind!r} is not one of {OBJECTIVES}")
        self.kind = kind
        self.cache_limit_bytes = cache_limit_bytes
        self.reference: list[torch.Tensor] = []  # all-F log-probs per batch (kl only)
        self.cached_bytes = 0
        self.recompute = None  # batch_index -> all-F logits, once the cache is over its limit

    def batch_sum(self, logits: torch.Tensor, ids: torch.Tensor, batch_index: int) -> tuple[float, int]:
        if self.kind == "lm_loss":
            logits = logits[:, :-1].float()
            target = ids[:, 1:]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
            return loss.item(), target.numel()
        logp = logits.float().log_softmax(-1)
        if self.recompute is None and len(self.reference) <= batch_index:  # first (all-F) pass
            self.cached_bytes += logp.numel() * logp.element_size()
            if self.cached_bytes <= self.cache_limit_bytes:
                self.reference.append(logp)
            else:
                self.reference.clear()
                self.recompute = True
        if self.recompute is True:  # still in the all-F pass: KL(all-F || all-F) = 0
            return 0.0, logp.shape[0] * logp.shape[1]
        if self.recompute is not None:
            ref = self.recompute(batch_index).float().log_softmax(-1)
        else:
            ref = self.reference[batch_index]
        kl = (ref.exp() * (ref - logp)).sum(-1)  # [B, L]
        return kl.sum().item(), kl.numel()


def evaluate_plan(model: nn.Module, calibration, plan, *, objective: str = "lm_loss",
                  batch_size: int = 8, evaluator: str = "auto",
                  cache_limit_bytes: int = CACHE_LIMIT_BYTES) -> float:
    """The objective of one plan (for "kl" relative to the all-F model) on the calibration set."""
    batches = to_device(as_batches(calibration, batch_size, vocab_size=vocab_size(model)), model)
    with eval_mode(model):
        ev = make_evaluator(model, batches, evaluator, cache_limit_bytes)
        n = ev.num_layers(batches[0])
        plan = LayerPlan.coerce(plan, n)
        obj = Objective(objective, cache_limit_bytes)
        if objective == "kl":
            plan_loss(ev, obj, batches, FULL * n)
        return plan_loss(ev, obj, batches, plan.pattern)


def plan_loss(ev, obj: Objective, batches, pattern: str) -> float:
    if obj.recompute is True:  # KL reference over its cache limit: recompute all-F logits per batch
        n = len(pattern)
        obj.recompute = lambda b: ev.logits(batches[b], "F" * n, b)
    total, count = 0.0, 0
    for b, ids in enumerate(batches):
        s, c = obj.batch_sum(ev.logits(ids, pattern, b), ids, b)
        total, count = total + s, count + c
    return total / count


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Search measures the deployed (eval-mode, no dropout) model; the mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


__all__ = ["CACHE_LIMIT_BYTES", "EVALUATORS", "GraphEvaluator", "OBJECTIVES", "Objective", "PrefixEvaluator",
           "eval_mode", "evaluate_plan", "forward_logits", "is_hf_model", "is_reference_model", "make_evaluator",
           "plan_loss", "prefix_cache_bytes"]
