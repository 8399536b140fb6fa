"""Train the reference DSA model (ic_compile/dsa_model.py) on Python source, DeepSeek-V3.2 style, and
produce the numbers of the IndexCache results table.

Data (byte-level, vocab 256; nothing is downloaded):
  code   the Python standard library's .py files (sysconfig.get_paths()["stdlib"], no site-packages);
  prose  the docstrings and comments extracted from those same files (ast + tokenize).
  Files are split by crc32(relative path) % 10: 0 -> held-out (evaluation), 1 -> calibration (plan
  search), the rest -> training. Training batches mix code and prose windows (3:1).

Recipe (DeepSeek-V3.2 continued-pretraining stages, scaled down):
  1. dense    all causal keys attended, indexers unused; LM loss on all non-indexer weights.
  2. warm-up  indexers only (everything else frozen): KL(head-summed dense attention || softmax(I)).
  3. sparse   top-k attention; LM loss (main weights) + KL over the selected keys (indexers; the
              indexer input is detached, so the two losses train disjoint weights).
  -> CHECKPOINT/config.json ({"model_args", "recipe", "data"}) + model.safetensors,
     loadable with ic_compile.tools.models.load_checkpoint / `--model ckpt:DIR`.

--results (after training, or on --from-ckpt DIR) writes results.json:
  held-out code / prose LM loss of all-F; greedy (calibrated on code and on prose, evaluated on both)
  vs uniform plans at 1/2, 1/4, 1/8 F; and, after the same fine-tuning budget from the checkpoint,
  all-F vs training-free uniform-1/4 (all-F fine-tune, plan applied afterwards) vs training-aware
  uniform-1/4 (fine-tuned with the plan applied and multi-layer distillation).
Plans are evaluated with ic_compile.tools.evaluators: exactly what the indexcache
backend runs (see ic_compile/tools/evaluators.py).

  python examples/train_dsa.py --tiny --out runs/tiny --results            # CPU smoke, < 2 min
  python examples/train_dsa.py --device cuda --out runs/h200 --results     # H200, ~10 min
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import io
import json
import math
import sys
import sysconfig
import time
import tokenize
import zlib
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ic_compile import dsa_model as dsa  # noqa: E402
from ic_compile.tools.overlap import overlap_plan, topk_overlap, uniform_plan  # noqa: E402
from ic_compile.plan import LayerPlan  # noqa: E402
from ic_compile.tools.evaluators import Objective, make_evaluator, plan_loss  # noqa: E402
from ic_compile.tools.search import search_plan  # noqa: E402
from ic_compile.tools.training import freeze_all_but_indexers, multi_layer_distillation_loss  # noqa: E402


# ============================================================== data


def stdlib_files(max_files: int | None = None) -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts
                   and "dist-packages" not in p.parts)
    if not files:
        raise FileNotFoundError(f"no .py files under the stdlib directory {root}")
    if max_files is not None and len(files) > max_files:
        step = len(files) / max_files
        files = [files[int(i * step)] for i in range(max_files)]
    return root, files


def split_of(root: Path, path: Path) -> str:
    bucket = zlib.crc32(str(path.relative_to(root)).encode()) % 10
    return "heldout" if bucket == 0 else "calib" if bucket == 1 else "train"


def prose_of(source: str) -> str:
    """Docstrings and comments of a Python file, one paragraph each."""
    parts = []
    try:
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(doc)
    except (SyntaxError, ValueError):
        pass
    try:
        comments = [tok.string.lstrip("#").strip() for tok in
                    tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT]
        comments = [c for c in comments if len(c) > 2 and not c.startswith("!")]
        if comments:
            parts.append(" ".join(comments))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return "\n\n".join(parts)


def _read_one(path: Path) -> tuple[str, str] | None:
    try:
        source = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    return source, prose_of(source)


def load_corpus(max_files: int | None, cache_dir: Path | None = None) -> tuple[dict, str]:
    """{"code"|"prose": {"train"|"calib"|"heldout": uint8 tensor}}, sha256 of all the text.

    Prose extraction runs in a process pool for the full stdlib; the result is cached in
    cache_dir/corpus-<files>.pt (keyed by the file list) so --from-ckpt reruns skip it."""
    root, files = stdlib_files(max_files)
    key = hashlib.sha256("\n".join(f"{f}:{f.stat().st_size}" for f in files).encode()).hexdigest()[:16]
    cache = cache_dir / f"corpus-{key}.pt" if cache_dir is not None else None
    if cache is not None and cache.exists():
        saved = torch.load(cache)
        return saved["corpus"], saved["hash"]
    if len(files) > 200:
        import multiprocessing as mp
        with mp.get_context("spawn" if sys.platform == "darwin" else "fork").Pool() as pool:
            texts = pool.map(_read_one, files, chunksize=16)
    else:
        texts = [_read_one(f) for f in files]
    buckets = {d: {s: [] for s in ("train", "calib", "heldout")} for d in ("code", "prose")}
    digest = hashlib.sha256()
    for f, item in zip(files, texts):
        if item is None:
            continue
        source, prose = item
        split = split_of(root, f)
        digest.update(str(f.relative_to(root)).encode() + b"\0" + source.encode())
        buckets["code"][split].append(source)
        if prose:
            buckets["prose"][split].append(prose)
    corpus = {}
    for domain, splits in buckets.items():
        corpus[domain] = {}
        for split, texts in splits.items():
            data = "\n\n".join(texts).encode("utf-8", errors="replace")
            corpus[domain][split] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else \
                torch.zeros(0, dtype=torch.uint8)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"corpus": corpus, "hash": digest.hexdigest()}, cache)
    return corpus, digest.hexdigest()


def windows(stream: torch.Tensor, seq: int, n: int) -> torch.Tensor:
    """The first n non-overlapping windows [n, seq] (fewer if the stream is short)."""
    n = min(n, stream.numel() // seq)
    if n < 1:
        raise ValueError(f"a split holds {stream.numel()} bytes, less than one window of {seq}; "
                         "use more files or a shorter --seq")
    return stream[: n * seq].view(n, seq).long()


def random_batch(streams: list[torch.Tensor], weights: list[float], batch: int, seq: int,
                 gen: torch.Generator) -> torch.Tensor:
    choice = torch.multinomial(torch.tensor(weights), batch, replacement=True, generator=gen)
    rows = []
    for c in choice.tolist():
        s = streams[c]
        start = int(torch.randint(0, s.numel() - seq, (1,), generator=gen))
        rows.append(s[start:start + seq])
    return torch.stack(rows).long()


# ============================================================== training


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()


SHARES = {"dense": 0.45, "warmup": 0.08, "sparse": 0.25, "all_F_finetune": 0.11, "plan_finetune": 0.11}


def run_stage(model, name: str, steps: int, args, streams, weights, *, pattern: str, dense: bool,
              train_lm: bool, distill: bool, seed: int) -> dict:
    """One training stage; returns its log (mean losses of the last 10% of steps, seconds).

    With --time-budget the stage also stops when its share (SHARES) of the budget is spent."""
    if steps <= 0:
        return {"steps": 0}
    model.train()
    if train_lm:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        freeze_all_but_indexers(model)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = args.lr if train_lm else args.indexer_lr
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0 if not train_lm else 0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    forward = model.forward_aux
    if args.compile:
        forward = torch.compile(model.forward_aux, dynamic=False)
    gen = torch.Generator().manual_seed(seed)
    plan = LayerPlan(pattern)
    logs, start = [], time.perf_counter()
    max_seconds = args.time_budget * SHARES[name] if args.time_budget else None
    for step in range(steps):
        if max_seconds is not None and step > 0 and time.perf_counter() - start > max_seconds:
            print(f"  [{name}] time share {max_seconds:.0f}s spent after {step} of {steps} steps", flush=True)
            break
        ids = random_batch(streams, weights, args.batch, args.seq, gen).to(args.device, non_blocking=True)
        with autocast(args.device):
            logits, aux = forward(ids, pattern=pattern, dense=dense, with_index_scores=distill,
                                  with_probs=distill)
            loss = torch.zeros((), device=args.device)
            lm = lm_loss(logits, ids) if train_lm else None
            kl = None
            if distill:
                kl = multi_layer_distillation_loss(aux["index_scores"], aux["attention_probs"], plan,
                                                   topk_indices=None if dense else aux["topk"])
                loss = loss + kl
            if lm is not None:
                loss = loss + lm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        logs.append((lm.item() if lm is not None else float("nan"), kl.item() if kl is not None else float("nan")))
        if args.log_every and (step % args.log_every == 0 or step == steps - 1):
            print(f"  [{name}] step {step + 1}/{steps} lm {logs[-1][0]:.4f} kl {logs[-1][1]:.4f} "
                  f"({time.perf_counter() - start:.1f}s)", flush=True)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    tail = logs[-max(1, len(logs) // 10):]
    return {"steps": len(logs), "planned_steps": steps, "pattern": pattern, "dense": dense, "lm_loss": _mean([l for l, _ in tail]),
            "kl": _mean([k for _, k in tail]), "seconds": round(time.perf_counter() - start, 2)}


def _mean(xs):
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else None


# ============================================================== checkpoint


def save_checkpoint(model, directory: Path, recipe: dict, data: dict) -> None:
    from safetensors.torch import save_file
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_args": dataclasses.asdict(model.args), "recipe": recipe, "data": data}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))


# ============================================================== results


class PlanScorer:
    """Held-out LM loss of any plan on one dataset, through the search evaluator (the backend's maths)."""

    def __init__(self, model, ids: torch.Tensor, batch: int):
        self.batches = [b.to(next(model.parameters()).device) for b in ids.split(batch)]
        self.evaluator = make_evaluator(model, self.batches, "auto")
        self.objective = Objective("lm_loss")
        self.n = self.evaluator.num_layers(self.batches[0])
        self._cache: dict[str, float] = {}
        self(("F" * self.n))  # first pass: fills the prefix cache

    def __call__(self, plan) -> float:
        pattern = LayerPlan.coerce(plan, self.n).pattern
        if pattern not in self._cache:
            self._cache[pattern] = round(plan_loss(self.evaluator, self.objective, self.batches, pattern), 5)
        return self._cache[pattern]


def results(model, corpus, args, out: Path, streams, weights) -> dict:
    n = len(model.layers)
    fractions = {"1/2": 0.5, "1/4": 0.25, "1/8": 0.125}
    targets = {name: max(1, round(f * n)) for name, f in fractions.items()}
    heldout = {d: windows(corpus[d]["heldout"], args.seq, args.eval_sequences) for d in ("code", "prose")}
    calib = {d: windows(corpus[d]["calib"], args.seq, args.calib_sequences) for d in ("code", "prose")}
    t0 = time.perf_counter()
    model.eval()
    report: dict = {"num_layers": n, "seq": args.seq, "topk": model.args.index_topk,
                    "eval_tokens": {d: heldout[d].numel() for d in heldout},
                    "calib_tokens": {d: calib[d].numel() for d in calib}}
    with torch.no_grad():
        scorers = {d: PlanScorer(model, heldout[d], args.eval_batch) for d in heldout}
        report["all_F"] = {d: scorers[d]("F" * n) for d in scorers}
        searches = {}
        for d in ("code", "prose"):
            print(f"[results] greedy search calibrated on {d} ...", flush=True)
            searches[d] = search_plan(model, calib[d], num_full=min(targets.values()), objective="lm_loss",
                                      batch_size=args.eval_batch, progress=args.progress)
            report[f"search_{d}"] = {"evaluations": searches[d].evaluations,
                                     "seconds": round(searches[d].seconds, 2),
                                     "path": [s.pattern for s in searches[d].history]}
        overlap = topk_overlap(model, calib["code"], batch_size=args.eval_batch)
        report["overlap_code_calib"] = [[round(float(v), 4) for v in row] for row in overlap]
        rows = []
        for name, k in targets.items():
            uni = uniform_plan(n, k)
            ovl = overlap_plan(overlap, k)
            row = {"fraction": name, "num_full": k,
                   "uniform": {"plan": uni.pattern, **{d: scorers[d](uni) for d in scorers}},
                   "overlap_code_calibrated": {"plan": ovl.pattern, **{d: scorers[d](ovl) for d in scorers}}}
            for cal in ("code", "prose"):
                plan = searches[cal].plan_with(k)
                row[f"greedy_{cal}_calibrated"] = {"plan": plan.pattern, **{d: scorers[d](plan) for d in scorers}}
            rows.append(row)
        report["plans"] = rows
    report["training_free_seconds"] = round(time.perf_counter() - t0, 2)
    print(f"[results] training-free table done in {report['training_free_seconds']}s", flush=True)

    # training-aware vs training-free at uniform 1/4, same fine-tuning budget from the same weights
    if args.finetune_steps > 0:
        quarter = uniform_plan(n, targets["1/4"]).pattern
        start_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        aware = {}
        for tag, pattern in (("all_F_finetune", "F" * n), ("plan_finetune", quarter)):
            model.load_state_dict(start_state)
            log = run_stage(model, tag, args.finetune_steps, args, streams, weights, pattern=pattern,
                            dense=False, train_lm=True, distill=True, seed=args.seed + 7)
            with torch.no_grad():
                scorers = {d: PlanScorer(model, heldout[d], args.eval_batch) for d in heldout}
                evals = {"all_F": {d: scorers[d]("F" * n) for d in scorers},
                         "uniform_1/4": {d: scorers[d](quarter) for d in scorers}}
            aware[tag] = {"train": log, "eval": evals}
        model.load_state_dict(start_state)
        report["finetune"] = {
            "steps": args.finetune_steps, "plan": quarter,
            "all_F": aware["all_F_finetune"]["eval"]["all_F"],
            "training_free_uniform_1/4": aware["all_F_finetune"]["eval"]["uniform_1/4"],
            "training_aware_uniform_1/4": aware["plan_finetune"]["eval"]["uniform_1/4"],
            "runs": aware}
    report["seconds"] = round(time.perf_counter() - t0, 2)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    return report


def print_table(report: dict) -> None:
    print(f"\n{'held-out LM loss (nats/byte)':44s} code     prose")
    print(f"{'all F':44s} {report['all_F']['code']:.4f}   {report['all_F']['prose']:.4f}")
    for row in report["plans"]:
        for key in ("uniform", "overlap_code_calibrated", "greedy_code_calibrated", "greedy_prose_calibrated"):
            r = row[key]
            print(f"{row['fraction'] + ' ' + key + ' ' + r['plan']:44s} {r['code']:.4f}   {r['prose']:.4f}")
    if "finetune" in report:
        ft = report["finetune"]
        for key in ("all_F", "training_free_uniform_1/4", "training_aware_uniform_1/4"):
            print(f"{'fine-tuned: ' + key:44s} {ft[key]['code']:.4f}   {ft[key]['prose']:.4f}")


# ============================================================== main


PRESETS = {
    # CPU smoke test: whole pipeline in well under 2 minutes.
    "tiny": dict(dim=64, layers=8, seq=128, topk=16, batch=4, max_files=80, dense_steps=60, warmup_steps=20,
                 sparse_steps=30, finetune_steps=20, eval_sequences=16, calib_sequences=8, eval_batch=8,
                 model="tiny", lr=3e-3, indexer_lr=3e-3),
    # H200: seq 2048, top-k 256 (= seq/8), 8 layers so that 1/8 F is one layer; ~10 minutes end to end.
    "gpu": dict(dim=256, layers=8, seq=2048, topk=256, batch=8, max_files=None, dense_steps=600,
                warmup_steps=100, sparse_steps=200, finetune_steps=100, eval_sequences=64,
                calib_sequences=16, eval_batch=8, model="small", lr=1.5e-3, indexer_lr=1e-3),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke preset (< 2 min with --results)")
    p.add_argument("--out", default="runs/dsa", help="output dir (checkpoint + results.json)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--results", action="store_true", help="also produce results.json (the results table)")
    p.add_argument("--from-ckpt", help="skip training: load this checkpoint dir and run --results")
    for name, kind in (("dim", int), ("layers", int), ("seq", int), ("topk", int), ("batch", int),
                       ("max_files", int), ("dense_steps", int), ("warmup_steps", int), ("sparse_steps", int),
                       ("finetune_steps", int), ("eval_sequences", int), ("calib_sequences", int),
                       ("eval_batch", int), ("lr", float), ("indexer_lr", float)):
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for all training stages together (default 420 on GPU, none with --tiny); "
                        "each stage stops early when its share is spent")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument("--progress", action="store_true", help="tqdm bars during plan search")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default 1 with --tiny: tiny ops gain nothing from more, and a busy "
                        "machine makes multi-threaded tiny ops much slower)")
    args = p.parse_args(argv)
    preset = PRESETS["tiny" if args.tiny else "gpu"]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.time_budget is None and not args.tiny:
        args.time_budget = 420.0
    if args.time_budget is not None and args.time_budget <= 0:
        args.time_budget = None
    if args.log_every is None:
        args.log_every = 5 if args.tiny else 50
    if args.topk > args.seq:
        p.error(f"--topk {args.topk} > --seq {args.seq}")
    return args


def build_model(args):
    margs = dsa.ModelArgs.from_name(args.model, dim=args.dim, n_layers=args.layers, index_topk=args.topk,
                                    max_seq_len=max(args.seq, 64))
    model = dsa.init_weights(dsa.Transformer(margs), seed=args.seed)
    return model.to(args.device)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads or args.tiny:
        torch.set_num_threads(args.threads or 1)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    corpus, data_hash = load_corpus(args.max_files, None if args.tiny else out / "cache")
    sizes = {d: {s: int(t.numel()) for s, t in v.items()} for d, v in corpus.items()}
    print(f"data: stdlib {sizes} bytes, sha256 {data_hash[:16]} ({time.perf_counter() - t0:.1f}s)", flush=True)
    streams = [corpus["code"]["train"], corpus["prose"]["train"]]
    weights = [3.0, 1.0]
    summary = {"data": {"hash": data_hash, "bytes": sizes}}

    if args.from_ckpt:
        from ic_compile.tools.models import load_checkpoint
        model = load_checkpoint(args.from_ckpt).to(args.device)
        args.seq = min(args.seq, model.args.max_seq_len)
    else:
        model = build_model(args)
        n = len(model.layers)
        all_f = "F" * n
        nparams = sum(p.numel() for p in model.parameters())
        print(f"model: {nparams / 1e6:.2f}M params, {n} layers, dim {args.dim}, seq {args.seq}, "
              f"top-k {args.topk}, device {args.device}", flush=True)
        stages = {}
        stages["dense"] = run_stage(model, "dense", args.dense_steps, args, streams, weights, pattern=all_f,
                                    dense=True, train_lm=True, distill=False, seed=args.seed + 1)
        stages["warmup"] = run_stage(model, "warmup", args.warmup_steps, args, streams, weights, pattern=all_f,
                                     dense=True, train_lm=False, distill=True, seed=args.seed + 2)
        stages["sparse"] = run_stage(model, "sparse", args.sparse_steps, args, streams, weights, pattern=all_f,
                                     dense=False, train_lm=True, distill=True, seed=args.seed + 3)
        recipe = {"stages": stages, "batch": args.batch, "seq": args.seq, "lr": args.lr,
                  "indexer_lr": args.indexer_lr, "seed": args.seed, "preset": "tiny" if args.tiny else "gpu",
                  "mix": {"code": weights[0], "prose": weights[1]}}
        save_checkpoint(model, out, recipe,
                        {"hash": data_hash, "source": "python stdlib (code) + its docstrings/comments (prose)",
                         "bytes": sizes, "split": "crc32(relpath) % 10: 0 heldout, 1 calib, else train"})
        summary["stages"] = stages
        print(f"checkpoint written to {out} ({time.perf_counter() - t0:.1f}s)", flush=True)
    if args.results or args.from_ckpt:
        summary["results"] = results(model, corpus, args, out, streams, weights)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    print(f"done in {summary['seconds']}s", flush=True)
    return summary


if __name__ == "__main__":
    main()
