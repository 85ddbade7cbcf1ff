"""P-DARTS architecture search: three progressive stages (SPEC section 2, paper Sec. 3).

    python train_search.py --demo                    # the whole algorithm on built-in data, CPU, ~3-4 min
    python train_search.py --tmp_data_dir DATA --save LOG --add_layers 6 --add_layers 12 \\
        --dropout_rate 0.1 --dropout_rate 0.4 --dropout_rate 0.7 --note NOTE [--cifar100]
    torchrun --nproc_per_node 4 train_search.py ...  # data-parallel; --batch_size stays global
    python train_search.py --resume RUN_DIR          # continue after the last completed epoch
    python train_search.py --derive RUN_DIR/arch_state.json --max_skip 3   # re-derive, no training

Stage s builds a fresh search network of ``--layers + add_layers[s]`` cells with the ops
still switched on (8, 5, then 3 per edge) and fresh alphas, trains only the weights for
``--arch_warmup_epochs`` epochs, then alternates one first-order alpha step (on the alpha
half of the training split) and one weight step (on the weight half). After the stage
the lowest-weighted ops of every edge are switched off. After the last stage the cell
keeps the 2 strongest non-``none`` edges per node, and the normal cell is refined to at
most ``--max_skip`` skip-connects. The last line on stdout is the ``Genotype(...)`` line.

The file reads top-down as the algorithm: schedules, the search step, an epoch, a stage
(warm-up, alpha steps, validation, pruning), the final derivation and refinement, main.
The flags and their paper defaults are in search_flags.py, the data halves in data.py,
the network and the derivation rules in model_search.py, the run folder in runs.py
(docs/layout.md lists every module).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from checkpoint import save_atomic
from data import SearchData, build_search_data, check_search_batch, describe_split, search_split
from distributed import (
    DistInfo,
    average_gradients,
    barrier,
    broadcast_model,
    gather,
    init_distributed,
    sync_buffers,
)
from divergence import DivergenceMonitor
from errors import UserError, load_json, write_json_atomic
from genotypes import (
    GENOTYPE_FILE,
    PRIMITIVES,
    Genotype,
    format_genotype,
    genotype_to_dict,
    primitives_problem,
)
from memory import plan_memory, report_out_of_memory
from model_search import (
    DROPS_PER_STAGE,
    NUM_STAGES,
    OPS_PER_STAGE,
    STEM_REDUCTION,
    CollapseMonitor,
    Network,
    Switches,
    all_on_switches,
    batch_norm_updates,
    derive_genotype,
    final_cells,
    ops_on,
    prune_after_stage,
    replay_stages,
    softmax_rows,
    validation_warning,
)
from plots import plot_run_safely
from runs import (
    BUDGETS,
    CHECKPOINT,
    METRICS,
    MetricsWriter,
    load_search_resume,
    log_run_start,
    open_run_dir,
    register_run,
    release_run_locks,
    report_complete,
    run_main,
    search_complete,
    setup_logging,
    truncate_metrics,
    write_arch_state,
)
from search_flags import (  # the flags: search_flags.py
    RUNTIME_FLAGS,
    build_parser,
    parse_args,
    search_stem,
)
from speed import autocast, check_amp, grad_scaler, loss_precision, prepare_input, prepare_model
from utils import (
    LR_SCHEDULE,
    AverageMeter,
    Progress,
    accuracy,
    check_finite,
    check_finite_state,
    cosine_lr,
    get_rng_state,
    logger,
    peak_memory_mb,
    reset_peak_memory,
    schedule_of_checkpoint,
    seed_everything,
    seed_for,
    set_rng_state,
)
from visualize import draw_safely

# ---------------------------------------------------------------------------------------
# The algorithm's constants (paper Sec. 4.1.1)
# ---------------------------------------------------------------------------------------

# The stages' op counts (NUM_STAGES, OPS_PER_STAGE: 8, 5, 3 ops per edge; DROPS_PER_STAGE)
# live in model_search.py with the pruning that uses them.
# Faithful to the release: the alpha half is validated when `epochs - epoch < 5`, i.e. in
# the last 4 epochs of a stage (21-24 of 25).
VALID_LAST_EPOCHS = 4
DROPOUT_DECAY = 0.2         # p = rate * exp(-(e - W) * 0.2) after the warm-up


# ---------------------------------------------------------------------------------------
# Schedules (pure functions, checked against SPEC's formulas by the tests)
# ---------------------------------------------------------------------------------------

def learning_rate(epoch: int, epochs: int, lr0: float, lr_min: float,
                  stepped_before_epoch: bool = True) -> float:
    """The weights' rate in ``epoch`` (0-based) of a stage: the release's cosine annealing,
    its scheduler stepped before each epoch, so epoch 0 trains at 0.024901 and the last
    epoch at ``lr_min`` (see ``utils.cosine_lr``)."""
    return cosine_lr(lr0, epoch, epochs, lr_min, stepped_before_epoch)


def skip_dropout_rate(epoch: int, epochs: int, rate: float, warmup: int) -> float:
    """Skip-connect dropout rate for an epoch (paper Sec. 3.3): a linear decay during the
    weights-only warm-up, then an exponential one."""
    if epoch < warmup:
        return rate * (epochs - epoch - 1) / epochs
    return rate * math.exp(-(epoch - warmup) * DROPOUT_DECAY)


def is_validation_epoch(epoch: int, epochs: int) -> bool:
    """Validation accuracy is reported in the last VALID_LAST_EPOCHS (4) epochs of a stage."""
    return epoch >= epochs - VALID_LAST_EPOCHS


# ---------------------------------------------------------------------------------------
# One step, one epoch, validation
# ---------------------------------------------------------------------------------------

def search_step(model: Network, batch_w: tuple[torch.Tensor, torch.Tensor],
                batch_a: tuple[torch.Tensor, torch.Tensor] | None,
                w_opt: torch.optim.Optimizer, a_opt: torch.optim.Optimizer, grad_clip: float,
                update_arch: bool, world_size: int = 1, forward: nn.Module | None = None,
                amp: str = "none", scaler=None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One search step: with ``update_arch`` first one first-order alpha step on
    ``batch_a`` (the gradient of its loss at the current weights, for the alphas only),
    then one weight step on ``batch_w`` (alphas held fixed). Returns the weight batch's
    logits and loss and the alpha batch's loss, detached, on the device (no host sync).

    ``forward`` is the module to call (``model`` itself, or its torch.compile wrapper);
    ``amp`` autocasts the forward passes (the loss of half-precision logits is taken in
    float32; float64 stays float64); ``scaler`` is
    the GradScaler of ``--amp fp16``, shared by both optimizers."""
    forward = model if forward is None else forward
    alphas = model.arch_parameters()
    weights = w_opt.param_groups[0]["params"]
    loss_a = None
    if update_arch:
        x_a, y_a = batch_a
        with autocast(x_a.device, amp):
            logits_a = forward(x_a)
        loss_a = F.cross_entropy(loss_precision(logits_a), y_a)
        # Gradients for the alphas only: autograd skips every weight gradient. An alpha
        # matrix no cell uses (a network too shallow for normal cells) keeps no gradient.
        grads = torch.autograd.grad(loss_a if scaler is None else scaler.scale(loss_a), alphas,
                                    allow_unused=True)
        for p, g in zip(alphas, grads):
            p.grad = g
        if world_size > 1:
            average_gradients(alphas, world_size)
        if scaler is not None:
            scaler.unscale_(a_opt)
        nn.utils.clip_grad_norm_(alphas, grad_clip)
        if scaler is not None:
            scaler.step(a_opt)
        else:
            a_opt.step()
        loss_a = loss_a.detach()

    x_w, y_w = batch_w
    w_opt.zero_grad(set_to_none=True)
    for a in alphas:  # the weight step sees the alphas as constants: no graph through them
        a.requires_grad_(False)
    try:
        with autocast(x_w.device, amp):
            logits = forward(x_w)
        loss_w = F.cross_entropy(loss_precision(logits), y_w)
        (loss_w if scaler is None else scaler.scale(loss_w)).backward()
    finally:
        for a in alphas:
            a.requires_grad_(True)
    if world_size > 1:
        average_gradients(weights, world_size)
    if scaler is not None:
        scaler.unscale_(w_opt)
    nn.utils.clip_grad_norm_(weights, grad_clip)
    if scaler is not None:
        scaler.step(w_opt)
        scaler.update()
    else:
        w_opt.step()
    return logits.detach(), loss_w.detach(), loss_a


def reference_search_step(model: Network, batch_w: tuple[torch.Tensor, torch.Tensor],
                          batch_a: tuple[torch.Tensor, torch.Tensor] | None,
                          w_opt: torch.optim.Optimizer, a_opt: torch.optim.Optimizer,
                          grad_clip: float, update_arch: bool) -> tuple[float, float | None]:
    """The plain path: the straightforward search step (SPEC section 2), single process.
    Each backward pass fills every gradient, weights' and alphas' alike; clipping goes
    parameter by parameter; both losses are read back every step. Build ``model`` with
    ``batched=False, skip_zero=False`` (the release's per-edge cells, `none` computed) and the optimizers with
    ``foreach=False``. Benchmarks and equivalence tests compare ``search_step`` with it."""
    loss_a = (_plain_update(model, batch_a, a_opt, model.arch_parameters(), grad_clip)
              if update_arch else None)
    loss_w = _plain_update(model, batch_w, w_opt, model.weight_parameters(), grad_clip)
    return loss_w, loss_a


def _plain_update(model: Network, batch: tuple[torch.Tensor, torch.Tensor],
                  optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                  grad_clip: float) -> float:
    x, y = batch
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    nn.utils.clip_grad_norm_(params, grad_clip, foreach=False)
    optimizer.step()
    return loss.item()


def _to(batch, device: torch.device, channels_last: bool = False):
    x, y = batch
    return prepare_input(x.to(device, non_blocking=True), channels_last), y.to(device, non_blocking=True)


def _stop_if_nonfinite(meter: AverageMeter, what: str, device: torch.device, world_size: int) -> None:
    """Raise NonFiniteLossError on every rank at once if any rank's running loss is not
    finite (one host sync; called at report points and at the end of an epoch)."""
    value = meter.avg
    if world_size > 1:
        t = torch.tensor([value], dtype=torch.float64,
                         device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        value = float(t.item())
    check_finite(value, what)


def train_epoch(model: Network, data: SearchData, w_opt: torch.optim.Optimizer,
                a_opt: torch.optim.Optimizer, args: argparse.Namespace, update_arch: bool,
                env: DistInfo, desc: str = "train", forward: nn.Module | None = None,
                scaler=None) -> dict[str, float]:
    """One epoch of the search. Returns averages over all ranks: ``train_loss``,
    ``train_acc``, ``arch_loss`` (None without alpha steps) and ``images`` (all ranks)."""
    model.train()
    meters = {"loss": AverageMeter(), "acc": AverageMeter(), "arch_loss": AverageMeter()}
    alpha_batches = iter(data.alphas) if update_arch else None
    progress = Progress(len(data.weights), desc, args.report_freq, enabled=env.is_main)
    images = 0
    for step, batch in enumerate(data.weights, 1):
        batch_w = _to(batch, env.device, args.channels_last)
        batch_a = _to(next(alpha_batches), env.device, args.channels_last) if update_arch else None
        logits, loss_w, loss_a = search_step(model, batch_w, batch_a, w_opt, a_opt,
                                             args.grad_clip, update_arch, env.world_size,
                                             forward, args.amp, scaler)
        n = batch_w[1].shape[0]
        meters["loss"].update(loss_w, n)
        meters["acc"].update(accuracy(logits, batch_w[1])[0], n)
        images += n
        if loss_a is not None:
            meters["arch_loss"].update(loss_a, batch_a[1].shape[0])
            images += batch_a[1].shape[0]
        if step % args.report_freq == 0:
            _stop_if_nonfinite(meters["loss"], "training loss", env.device, env.world_size)
        progress.update(step, {"loss": meters["loss"], "acc": meters["acc"]})
    for m in meters.values():
        m.all_reduce()
    check_finite(meters["loss"].avg, "training loss")
    if update_arch:
        check_finite(meters["arch_loss"].avg, "alpha-step loss")
    return {"train_loss": meters["loss"].avg, "train_acc": meters["acc"].avg,
            "arch_loss": meters["arch_loss"].avg if update_arch else None,
            "images": images * env.world_size}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: str = "none",
             channels_last: bool = False) -> dict[str, float]:
    """Loss and top-1 accuracy in eval mode (averaged over all ranks). ``model`` may be
    a torch.compile wrapper."""
    model.eval()
    loss, acc = AverageMeter(), AverageMeter()
    for batch in loader:
        x, y = _to(batch, device, channels_last)
        with autocast(device, amp):
            logits = loss_precision(model(x))
        loss.update(F.cross_entropy(logits, y), y.shape[0])
        acc.update(accuracy(logits, y)[0], y.shape[0])
    loss.all_reduce()
    acc.all_reduce()
    model.train()
    return {"valid_loss": loss.avg, "valid_acc": acc.avg}


# ---------------------------------------------------------------------------------------
# Re-derivation from saved alphas (--derive) and reporting of cells
# ---------------------------------------------------------------------------------------

def run_derive(args: argparse.Namespace) -> int:
    """``--derive FILE``: print the cell for every skip budget, then the chosen one last."""
    try:
        with open(args.derive, encoding="utf-8") as f:
            state = load_json(f)
    except UnicodeDecodeError:
        raise UserError(f"{args.derive} is not an arch_state.json file (it is not text)") from None
    except OSError as e:
        raise UserError(f"cannot read {args.derive}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{args.derive} is not valid JSON ({e})") from None
    if not isinstance(state, dict) or "stages" not in state:
        raise UserError(f"{args.derive}: expected a JSON object with a top-level 'stages' list")
    if primitives_problem(state):   # the alpha columns follow the file's op order
        raise UserError(f"{args.derive}: {primitives_problem(state)}")
    if state.get("stem", "cifar") != "cifar":
        # The cell does not depend on the stem; where it was found does (train it with
        # train_imagenet.py, whose network has the same stem).
        print(f"searched with the {state['stem']} stem (train the cell with train_imagenet.py)")
    switches = replay_stages(state["stages"], args.derive)
    sw_n, sw_r = switches[-1]
    last = state["stages"][-1]
    chosen, unrestricted, num_skips, budgets = final_cells(
        sw_n, sw_r, softmax_rows(last["alphas_normal"]), softmax_rows(last["alphas_reduce"]),
        args.max_skip)
    print(f"unrestricted cell ({num_skips} skip-connects in the normal cell): "
          f"{format_genotype(unrestricted)}")
    for m, g in budgets:
        print(f"max_skip {m}: {format_genotype(g)}")
    print(format_genotype(chosen))
    return 0


def _names(row: Sequence[bool]) -> str:
    return ",".join(PRIMITIVES[k] for k in ops_on(row))


def _log_switches(stage: int, sw_n: Switches, sw_r: Switches) -> None:
    for kind, sw in (("normal", sw_n), ("reduce", sw_r)):
        logger.info("stage %d %s cell, ops kept per edge:", stage, kind)
        for e, row in enumerate(sw):
            logger.info("  edge %2d: %s", e, _names(row))


# ---------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------

@dataclass
class SearchRun:
    """What every stage of one run shares."""
    args: argparse.Namespace
    env: DistInfo
    data: SearchData
    num_classes: int
    run_dir: str
    metrics: MetricsWriter
    split_digest: str = ""                                  # weight/alpha division
    stages_done: list[dict] = field(default_factory=list)   # arch_state.json's "stages"
    epochs_run: int = 0                                     # epochs run by this process
    lr_stepped_before_epoch: bool = True                    # False: a run begun before the fix


def resume_position(stage: int, epochs_done: int, epochs: int) -> str:
    """Where a resumed search continues, in the 0-based epoch numbers of the epoch lines
    (``stage 2 epoch 1/5``); a checkpoint's ``epoch`` counts the epochs done in its stage."""
    if epochs_done >= epochs:
        return f"at the end of stage {stage + 1} (all {epochs} epochs of this stage done)"
    return (f"at stage {stage + 1}, epoch {epochs_done} ({epochs_done} of {epochs} epochs of "
            "this stage done)")


def search_stage(run: SearchRun, stage: int, switches_n: Switches, switches_r: Switches,
                 ckpt: dict | None = None) -> Network | None:
    """Train one stage (resuming from ``ckpt`` if given) and return its network, or None
    when --stop_after_epochs stopped the run."""
    args, env = run.args, run.env
    layers = args.layers + args.add_layers[stage]
    C = args.init_channels + args.add_width[stage]
    rate = args.dropout_rate[stage]
    # Every stage starts afresh: new network, new alphas, new optimizers; only the
    # switches carry over (paper Sec. 3.2).
    # Deviation: seeded per stage (the release seeds once) so a resume rebuilds it.
    torch.manual_seed(seed_for(args.seed, stage))
    model = Network(C, run.num_classes, layers, switches_n, switches_r, drop_rate=rate,
                    stem=search_stem(args)).to(env.device)
    if env.distributed:
        broadcast_model(model)
        if env.rank > 0:  # different dropout masks and augmentations per rank
            torch.manual_seed(seed_for(args.seed, stage, env.rank))
    w_opt = torch.optim.SGD(model.weight_parameters(), lr=args.learning_rate,
                            momentum=args.momentum, weight_decay=args.weight_decay, foreach=True)
    a_opt = torch.optim.Adam(model.arch_parameters(), lr=args.arch_learning_rate,
                             betas=(0.5, 0.999), weight_decay=args.arch_weight_decay, foreach=True)
    scaler = grad_scaler(env.device, args.amp)
    first_epoch = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        w_opt.load_state_dict(ckpt["w_opt"])
        a_opt.load_state_dict(ckpt["a_opt"])
        rng = ckpt["rng"]
        set_rng_state(rng[env.rank] if len(rng) == env.world_size else rng[0])
        first_epoch = ckpt["epoch"]
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
    if args.compile:
        torch._dynamo.reset()   # the previous stage's network leaves its compiled graphs
    model.checkpoint_cells = getattr(args, "checkpoint_cells", False)  # absent in older runs
    forward = prepare_model(model, args.channels_last, args.compile)
    reset_peak_memory(env.device)
    logger.info("=== stage %d/%d: %d cells, C=%d, %d ops per edge, skip dropout %.2f, "
                "%.3fM weights ===", stage + 1, NUM_STAGES, layers, C, OPS_PER_STAGE[stage],
                rate, sum(p.numel() for p in model.weight_parameters()) / 1e6)
    # A smaller batch in the advice scales the weights' SGD rate (linear scaling); Adam's
    # alpha rate does not depend on the gradient's scale and stays.
    memory_plan = plan_memory(model, [w_opt, a_opt], (3, args.image_size, args.image_size),
                              args.batch_size // env.world_size, args.batch_size, env.world_size,
                              {"--learning_rate": args.learning_rate}, model.checkpoint_cells,
                              env.device, args.amp)

    collapse = CollapseMonitor(stage + 1, args.arch_warmup_epochs, env.is_main)
    divergence = DivergenceMonitor(run.num_classes, "the search", "a lower --learning_rate or "
                                   "--arch_learning_rate", " (warned once per stage)")
    for epoch in range(first_epoch, args.epochs):
        t0 = time.time()
        lr = learning_rate(epoch, args.epochs, args.learning_rate, args.learning_rate_min,
                           run.lr_stepped_before_epoch)
        for group in w_opt.param_groups:
            group["lr"] = lr
        drop = skip_dropout_rate(epoch, args.epochs, rate, args.arch_warmup_epochs)
        model.set_drop_rate(drop)
        update_arch = epoch >= args.arch_warmup_epochs
        run.data.set_epoch(stage, epoch)
        logger.info("stage %d epoch %d/%d lr %.6e skip-dropout %.4f %s", stage + 1, epoch,
                    args.epochs, lr, drop, "weights+alphas" if update_arch else "weights only")
        with report_out_of_memory(memory_plan, f"stage {stage + 1} epoch {epoch}",
                                  os.path.join(run.run_dir, CHECKPOINT)):
            stats = train_epoch(model, run.data, w_opt, a_opt, args, update_arch, env,
                                desc=f"stage {stage + 1} epoch {epoch}", forward=forward,
                                scaler=scaler)
            valid = {"valid_loss": None, "valid_acc": None}
            if is_validation_epoch(epoch, args.epochs):
                # Faithful to the release: the alpha half is validated with the training
                # augmentation (it is the same dataset object).
                # Every process validates with rank 0's batch-norm statistics, so the figures
                # do not depend on how the batches were split over the processes.
                sync_buffers(model)
                valid = evaluate(forward, run.data.valid, env.device, args.amp, args.channels_last)
                check_finite(valid["valid_loss"], "validation loss")
                warning = validation_warning(
                    stage + 1, epoch, epoch == args.epochs - 1, valid["valid_acc"],
                    stats["train_acc"], run.num_classes, *batch_norm_updates(model))
                if warning:
                    logger.warning(warning)
        check_finite_state(model)   # batch-norm statistics and alphas: nothing non-finite is saved
        seconds = time.time() - t0
        probs_n, probs_r = model.arch_probs()
        record = {
            "stage": stage + 1, "epoch": epoch, "lr": lr, "skip_dropout": drop,
            "train_loss": stats["train_loss"], "train_acc": stats["train_acc"],
            "arch_loss": stats["arch_loss"], **valid, "epoch_time_s": round(seconds, 3),
            "images_per_s": round(stats["images"] / max(seconds, 1e-9), 2),
            "peak_memory_mb": round(peak_memory_mb(env.device), 1),
            "alphas_normal_softmax": probs_n.tolist(), "alphas_reduce_softmax": probs_r.tolist(),
            **collapse.check(epoch, switches_n, probs_n),
        }
        logger.info("stage %d epoch %d: train_acc %.2f train_loss %.4f%s, %.1fs, %.0f img/s",
                    stage + 1, epoch, stats["train_acc"], stats["train_loss"],
                    "" if valid["valid_acc"] is None else
                    f", valid_acc {valid['valid_acc']:.2f} valid_loss {valid['valid_loss']:.4f}",
                    seconds, record["images_per_s"])
        warning = divergence.check(f"stage {stage + 1} epoch {epoch}", {
            "training loss": stats["train_loss"], "alpha-step loss": stats["arch_loss"],
            "validation loss": valid["valid_loss"]})
        if warning and env.is_main:
            logger.warning(warning)
        state = {
            "kind": "pdarts-search", "version": 1, "args": vars(args),
            "stage": stage, "epoch": epoch + 1, "world_size": env.world_size,
            "switches_normal": switches_n, "switches_reduce": switches_r,
            "model_args": {"C": C, "num_classes": run.num_classes, "layers": layers,
                           "stem": search_stem(args)},
            "model": model.state_dict(), "w_opt": w_opt.state_dict(), "a_opt": a_opt.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "lr": lr, "skip_dropout": drop, "stages_done": run.stages_done,
            "split_digest": run.split_digest, "data_stats": run.data.stats,
            "lr_schedule": LR_SCHEDULE if run.lr_stepped_before_epoch else None,
            "rng": gather(get_rng_state(), env),
        }
        if env.is_main:
            run.metrics.write(record)   # a resume drops lines after its checkpoint
            save_atomic(state, os.path.join(run.run_dir, CHECKPOINT), resume_hint=run.run_dir)
        run.epochs_run += 1
        if args.stop_after_epochs is not None and run.epochs_run >= args.stop_after_epochs:
            logger.info("stopping after %d epoch(s) as asked (--stop_after_epochs); continue "
                        "with --resume %s", run.epochs_run, run.run_dir)
            return None
    return model


def end_stage(run: SearchRun, stage: int, model: Network, switches_n: Switches,
              switches_r: Switches) -> tuple[Switches, Switches]:
    """Record the stage (alphas, switches, its cell, peak memory) and switch off the
    lowest-weighted ops of every edge; return the next stage's switches."""
    args, env = run.args, run.env
    probs_n, probs_r = model.arch_probs()
    peak = peak_memory_mb(env.device)
    logger.info("stage %d peak device memory: %s", stage + 1,
                f"{peak:.0f} MiB" if env.device.type == "cuda" else "n/a on CPU")
    stage_cell = derive_genotype(switches_n, switches_r, probs_n, probs_r,
                                 None if args.max_skip < 0 else args.max_skip)
    logger.info("stage %d cell (derived with the final rule): %s", stage + 1,
                format_genotype(stage_cell))
    run.stages_done.append({
        "stage": stage + 1, "layers": args.layers + args.add_layers[stage],
        "init_channels": args.init_channels + args.add_width[stage],
        "ops_per_edge": OPS_PER_STAGE[stage], "dropout_rate": args.dropout_rate[stage],
        "alphas_normal": model.alphas_normal.detach().float().cpu().tolist(),
        "alphas_reduce": model.alphas_reduce.detach().float().cpu().tolist(),
        "switches_normal": switches_n, "switches_reduce": switches_r,
        "genotype": genotype_to_dict(stage_cell), "peak_memory_mb": round(peak, 1),
    })
    last = stage == NUM_STAGES - 1
    logger.info("------ dropping %d ops per edge%s ------", DROPS_PER_STAGE[stage],
                " (none first)" if last else "")
    new_n, new_r = prune_after_stage(stage, switches_n, switches_r, probs_n, probs_r)
    _log_switches(stage + 1, new_n, new_r)
    if env.is_main:
        write_arch_state(run.run_dir, run.stages_done)
        draw_safely(stage_cell, run.run_dir, f"stage{stage + 1}_")
    return new_n, new_r


def finish_search(run: SearchRun, model: Network, switches_n: Switches,
                  switches_r: Switches) -> Genotype:
    """The final cell from the last stage's switches and weights: 2 strongest non-none
    edges per node, then the skip-connect refinement of the normal cell (paper Sec. 3.3).
    Writes genotype.json, the cells per skip budget, arch_state.json and the diagrams."""
    args, env = run.args, run.env
    probs_n, probs_r = model.arch_probs()
    # Deviation: the last stage's pruned switches are only logged; the final cell is
    # derived from its 3-op switches and weights, which gives the release's cell.
    chosen, unrestricted, num_skips, budgets = final_cells(
        switches_n, switches_r, probs_n, probs_r, args.max_skip)
    logger.info("unrestricted cell (%d skip-connects in the normal cell): %s", num_skips,
                format_genotype(unrestricted))
    logger.info("------ restricting skip-connects ------")
    if not budgets:
        logger.info("the normal cell has %d skip-connect(s): no budget from 8 down is exceeded",
                    num_skips)
    for m, g in budgets:
        logger.info("max_skip %d: %s", m, format_genotype(g))
    logger.info("final cell (max_skip %s): %s", "none" if args.max_skip < 0 else args.max_skip,
                format_genotype(chosen))
    lines = gather(format_genotype(chosen), env)
    if len(set(lines)) != 1:
        raise RuntimeError(f"ranks derived different cells: {lines}")
    if env.distributed:
        logger.info("all %d processes derived this same cell", env.world_size)
    # How the cell was found; training scripts ignore it (the cell is the same either way).
    cell = {**genotype_to_dict(chosen), "metadata": {
        "stem": search_stem(args), "image_size": args.image_size, "dataset": args.dataset}}
    if env.is_main:
        write_json_atomic(cell, os.path.join(run.run_dir, GENOTYPE_FILE))
        write_json_atomic({"num_skip_connects": num_skips, "unrestricted": genotype_to_dict(unrestricted),
                     "by_max_skip": {str(m): genotype_to_dict(g) for m, g in budgets}},
                    os.path.join(run.run_dir, BUDGETS))
        write_arch_state(run.run_dir, run.stages_done,
                         {"max_skip": args.max_skip, "genotype": cell, "stem": search_stem(args)})
        draw_safely(chosen, run.run_dir, "")
    return chosen


def main(args: argparse.Namespace) -> int:
    """The search (or --derive); the run folder is locked while it runs."""
    try:
        return _main(args)
    finally:
        release_run_locks()


def _main(args: argparse.Namespace) -> int:
    if args.derive:
        return run_derive(args)
    env = init_distributed(args.device, args.dist_timeout)
    ckpt = None
    if args.resume:
        args, ckpt = load_search_resume(args, RUNTIME_FLAGS, vars(build_parser().parse_args([])))
        if search_complete(args.resume, ckpt, args.epochs):
            return report_complete(args.resume, env.is_main)
        if ckpt["world_size"] != env.world_size:
            logger.warning("resuming a %d-process run with %d processes: the data order and "
                           "random streams differ from the original run", ckpt["world_size"],
                           env.world_size)
    # After the resume: a resumed run keeps its own --threads (--demo's 1) unless given
    # again; set before it, --resume RUN_DIR alone ran on every core and summed in
    # another order than the run it continues.
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size % env.world_size:
        raise UserError(f"--batch_size {args.batch_size} does not divide evenly over "
                        f"{env.world_size} processes")
    check_amp(env.device, args.amp)
    # Read the data before creating the run folder: a wrong path leaves nothing behind.
    dataset, num_classes, description = build_search_data(args, (ckpt or {}).get("data_stats"))
    split = search_split(dataset, args, ckpt)
    check_search_batch(args, split)
    # Faithful to the release: --save is a prefix, the folder is {save}search-{note}-{time}.
    run_dir = open_run_dir(args.save, "search", args.note, env.is_main, args.resume)
    setup_logging(run_dir if env.is_main else None, env.is_main)
    register_run(run_dir, CHECKPOINT, "train_search.py")
    logger.info("run folder %s", os.path.abspath(run_dir))
    seed_everything(args.seed, args.deterministic)
    log_run_start(args, env.device)
    if env.device.type == "cpu":    # the sums' order depends on it: a resume must match
        logger.info("CPU threads: %d", torch.get_num_threads())
    stem = search_stem(args)
    cells_at = args.image_size // STEM_REDUCTION[stem]
    logger.info("stem: %s (%s); the first cells see %dx%d maps",
                stem, getattr(args, "stem_reason", "the run's"), cells_at, cells_at)
    if env.distributed:
        logger.info("data-parallel over %d processes: batch %d = %d x %d per process (gradients "
                    "averaged, as one process with batch %d); batch-norm statistics are per "
                    "process", env.world_size, args.batch_size, env.world_size,
                    args.batch_size // env.world_size, args.batch_size)
    data = SearchData(dataset, args, env, split)
    logger.info("data: %s; %d train the weights, %d the alphas", description, *data.sizes)
    for reason in getattr(dataset, "skipped", []):
        logger.warning("left out: %s", reason)
    for note in getattr(dataset, "notes", []):   # files not read, single-colour images
        logger.warning("warning: %s", note)
    logger.info("split %s%s, images per class weight/alpha half: %s", split.rule,
                f" with seed {args.seed}" if split.rule != "in order" else "",
                describe_split(dataset, split))
    if data.on_device:
        logger.info("input pipeline: images on the GPU as uint8, augmented there in batches")
    if args.amp != "none" or args.channels_last or args.compile:
        logger.info("speed options: amp %s, channels_last %s, compile %s (float rounding "
                    "differs from the default float32 path)", args.amp, args.channels_last,
                    args.compile)
    run = SearchRun(args, env, data, num_classes, run_dir,
                    MetricsWriter(os.path.join(run_dir, METRICS) if env.is_main else None),
                    split.digest)

    switches_n, switches_r = all_on_switches(), all_on_switches()
    start_stage = 0
    if ckpt is not None:
        switches_n, switches_r = ckpt["switches_normal"], ckpt["switches_reduce"]
        run.stages_done = ckpt["stages_done"]
        start_stage = ckpt["stage"]
        run.lr_stepped_before_epoch = schedule_of_checkpoint(ckpt)
        if not run.lr_stepped_before_epoch:
            logger.warning("this run began before the learning-rate schedule was corrected to "
                           "the release's (epoch e at cos(pi*(e+1)/E)); it continues on the "
                           "schedule it began with (cos(pi*e/E))")
        logger.info("resuming %s %s", run_dir, resume_position(start_stage, ckpt["epoch"], args.epochs))
        if env.is_main:
            truncate_metrics(os.path.join(run_dir, METRICS), ckpt["epoch"], start_stage, args.epochs)

    search_start = time.time()
    for stage in range(start_stage, NUM_STAGES):
        model = search_stage(run, stage, switches_n, switches_r,
                             ckpt if stage == start_stage else None)
        if model is None:       # --stop_after_epochs
            barrier()
            return 0
        next_n, next_r = end_stage(run, stage, model, switches_n, switches_r)
        if stage < NUM_STAGES - 1:
            switches_n, switches_r = next_n, next_r
    genotype = finish_search(run, model, switches_n, switches_r)
    if env.device.type == "cuda":
        logger.info("peak device memory per stage: %s", ", ".join(
            f"{s['peak_memory_mb']:.0f} MiB" for s in run.stages_done))
    logger.info("search done in %.1f min; outputs in %s", (time.time() - search_start) / 60, run_dir)
    barrier()
    if env.is_main:     # the other ranks' cells were checked equal in finish_search
        plot_run_safely(run_dir, getattr(args, "plot_format", "png"))  # older runs lack the flag
        print(format_genotype(genotype), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, parse_args()))
