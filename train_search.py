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
The run's settings are a SearchConfig (config.py; the flags in search_flags.py), the
data halves are in data.py, the network in model_search.py, the pruning and derivation
rules in derivation.py, the checkpoint and its resume in checkpoint.py, the run folder in
runs.py (docs/layout.md lists every module).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import (
    restore_search_stage,
    resume_search,
    save_search,
    search_complete,
    search_state,
    warn_old_schedule,
)
from config import DROPOUT_DECAY, RANDOM, SearchConfig
from data import SearchData, build_search_data, check_search_batch, describe_split, search_split
from derivation import (
    CollapseMonitor,
    Switches,
    all_on_switches,
    derive_genotype,
    final_cells,
    ops_on,
    prune_after_stage,
    random_space_switches,
    replay_stages,
    softmax_rows,
)
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
    PRIMITIVES,
    Genotype,
    format_genotype,
    genotype_to_dict,
    load_genotype_file,
    primitives_problem,
)
from loop import (
    batch_norm_updates,
    check_finite,
    check_finite_state,
    evaluate,
    stop_if_nonfinite,
    to_device,
    validation_warning,
)
from memory import plan_memory, report_out_of_memory
from model_search import STEM_REDUCTION, Network
from plots import plot_run_safely
from run_files import ARCH_STATE, BUDGETS, CHECKPOINT, GENOTYPE, METRICS, SEARCH_PREFIX, stage_genotype
from runs import (
    MetricsWriter,
    log_run_start,
    open_run_dir,
    register_run,
    release_run_locks,
    run_main,
    setup_logging,
    truncate_metrics,
    write_arch_state,
)
from search_flags import parse_args, resolve_cell_layout  # the flags: search_flags.py
from speed import autocast, check_amp, grad_scaler, loss_precision, prepare_model
from utils import (
    AverageMeter,
    Progress,
    accuracy,
    cosine_lr,
    logger,
    peak_memory_mb,
    reset_peak_memory,
    seed_everything,
    seed_for,
)
from visualize import draw_safely

# ---------------------------------------------------------------------------------------
# The algorithm's constants (paper Sec. 4.1.1)
# ---------------------------------------------------------------------------------------

# The stages' op counts (8, 5, 3 ops per edge, keeping 5, 3, 1) are the stage plans of
# config.py; the pruning that uses them is in derivation.py.
# Faithful to the release: the alpha half is validated when `epochs - epoch < 5`, i.e. in
# the last 4 epochs of a stage (21-24 of 25).
VALID_LAST_EPOCHS = 4
# The dropout decay (0.2: p = rate * exp(-(e - W) * 0.2) after the warm-up) is the plan's
# --dropout_decay (config.DROPOUT_DECAY).


# ---------------------------------------------------------------------------------------
# Schedules (pure functions, checked against SPEC's formulas by the tests)
# ---------------------------------------------------------------------------------------

def learning_rate(epoch: int, epochs: int, lr0: float, lr_min: float,
                  stepped_before_epoch: bool = True) -> float:
    """The weights' rate in ``epoch`` (0-based) of a stage: the release's cosine annealing,
    its scheduler stepped before each epoch, so epoch 0 trains at 0.024901 and the last
    epoch at ``lr_min`` (see ``utils.cosine_lr``)."""
    return cosine_lr(lr0, epoch, epochs, lr_min, stepped_before_epoch)


def skip_dropout_rate(epoch: int, epochs: int, rate: float, warmup: int,
                      decay: float = DROPOUT_DECAY) -> float:
    """Skip-connect dropout rate for an epoch (paper Sec. 3.3): a linear decay during the
    weights-only warm-up, then an exponential one (``decay``: the paper's 0.2)."""
    if epoch < warmup:
        return rate * (epochs - epoch - 1) / epochs
    return rate * math.exp(-(epoch - warmup) * decay)


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


def train_epoch(model: Network, data: SearchData, w_opt: torch.optim.Optimizer,
                a_opt: torch.optim.Optimizer, cfg: SearchConfig, update_arch: bool,
                env: DistInfo, desc: str = "train", forward: nn.Module | None = None,
                scaler=None) -> dict[str, float]:
    """One epoch of the search. Returns averages over all ranks: ``train_loss``,
    ``train_acc``, ``arch_loss`` (None without alpha steps) and ``images`` (all ranks)."""
    model.train()
    meters = {"loss": AverageMeter(), "acc": AverageMeter(), "arch_loss": AverageMeter()}
    alpha_batches = iter(data.alphas) if update_arch else None
    progress = Progress(len(data.weights), desc, cfg.report_freq, enabled=env.is_main)
    images = 0
    for step, batch in enumerate(data.weights, 1):
        batch_w = to_device(batch, env.device, cfg.channels_last)
        batch_a = to_device(next(alpha_batches), env.device, cfg.channels_last) if update_arch else None
        logits, loss_w, loss_a = search_step(model, batch_w, batch_a, w_opt, a_opt,
                                             cfg.grad_clip, update_arch, env.world_size,
                                             forward, cfg.amp, scaler)
        n = batch_w[1].shape[0]
        meters["loss"].update(loss_w, n)
        meters["acc"].update(accuracy(logits, batch_w[1])[0], n)
        images += n
        if loss_a is not None:
            meters["arch_loss"].update(loss_a, batch_a[1].shape[0])
            images += batch_a[1].shape[0]
        if step % cfg.report_freq == 0:
            stop_if_nonfinite(meters["loss"], "training loss")
        progress.update(step, {"loss": meters["loss"], "acc": meters["acc"]})
    for m in meters.values():
        m.all_reduce()
    check_finite(meters["loss"].avg, "training loss")
    if update_arch:
        check_finite(meters["arch_loss"].avg, "alpha-step loss")
    return {"train_loss": meters["loss"].avg, "train_acc": meters["acc"].avg,
            "arch_loss": meters["arch_loss"].avg if update_arch else None,
            "images": images * env.world_size}


def validate(forward: nn.Module, data: SearchData, cfg: SearchConfig,
             env: DistInfo) -> dict[str, float]:
    """The alpha half's loss and accuracy (eval mode, all ranks)."""
    stats = evaluate(forward, data.valid, nn.CrossEntropyLoss(), env.device, show=False,
                     amp=cfg.amp, channels_last=cfg.channels_last)
    return {"valid_loss": stats["loss"], "valid_acc": stats["top1"]}


# ---------------------------------------------------------------------------------------
# Re-derivation from saved alphas (--derive) and reporting of cells
# ---------------------------------------------------------------------------------------

def run_derive(cfg: SearchConfig) -> int:
    """``--derive FILE``: print the cell for every skip budget, then the chosen one last."""
    try:
        with open(cfg.derive, encoding="utf-8") as f:
            state = load_json(f)
    except UnicodeDecodeError:
        raise UserError(f"{cfg.derive} is not an arch_state.json file (it is not text)") from None
    except OSError as e:
        raise UserError(f"cannot read {cfg.derive}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg.derive} is not valid JSON ({e})") from None
    if not isinstance(state, dict) or "stages" not in state:
        raise UserError(f"{cfg.derive}: expected a JSON object with a top-level 'stages' list")
    if primitives_problem(state):   # the alpha columns follow the file's op order
        raise UserError(f"{cfg.derive}: {primitives_problem(state)}")
    if state.get("stem", "cifar") != "cifar":
        # The cell does not depend on the stem; where it was found does (train it with
        # train_imagenet.py, whose network has the same stem).
        print(f"searched with the {state['stem']} stem (train the cell with train_imagenet.py)")
    switches = replay_stages(state["stages"], cfg.derive)
    sw_n, sw_r = switches[-1]
    last = state["stages"][-1]
    # The budget: the one given, else the run's own (a finished search's file has it),
    # else the default.
    saved = state.get("max_skip")
    if "max_skip" in cfg.given:
        max_skip, whose = cfg.max_skip, "given"
    elif isinstance(saved, int) and not isinstance(saved, bool) and -1 <= saved <= 8:
        max_skip, whose = saved, "the run's"
    else:
        max_skip, whose = cfg.max_skip, "the default; the file names none"
    if "genotype" not in state:
        print(f"{cfg.derive} holds {len(state['stages'])} finished stage(s) and no final cell (the "
              f"search did not finish): the cell below is derived from stage "
              f"{len(state['stages'])}'s alphas")
    chosen, unrestricted, num_skips, budgets = final_cells(
        sw_n, sw_r, softmax_rows(last["alphas_normal"]), softmax_rows(last["alphas_reduce"]),
        max_skip)
    print(f"unrestricted cell ({num_skips} skip-connects in the normal cell): "
          f"{format_genotype(unrestricted)}")
    for m, g in budgets:
        print(f"max_skip {m}: {format_genotype(g)}")
    if cfg.out:
        write_json_atomic({**genotype_to_dict(chosen), "metadata": {
            "stem": state.get("stem", "cifar"), "derived_from": os.path.abspath(cfg.derive),
            "max_skip": max_skip}}, cfg.out)
        print(f"wrote {cfg.out} (train it: python train_cifar.py --arch {cfg.out})")
    print(f"final cell at max_skip {'none' if max_skip < 0 else max_skip} ({whose}):")
    print(format_genotype(chosen))
    return 0


def _names(row: Sequence[bool]) -> str:
    return ",".join(PRIMITIVES[k] for k in ops_on(row))


def _log_switches(stage: int, sw_n: Switches, sw_r: Switches) -> None:
    for kind, sw in (("normal", sw_n), ("reduce", sw_r)):
        logger.info("stage %d %s cell, ops kept per edge:", stage, kind)
        for e, row in enumerate(sw):
            logger.info("  edge %2d: %s", e, _names(row))


def report_complete(run_dir: str, cfg: SearchConfig, is_main: bool) -> int:
    """``--resume`` of a finished search: say so and print its cell; nothing is re-run,
    re-derived or appended."""
    path = os.path.join(run_dir, GENOTYPE)
    genotype = load_genotype_file(path)
    if is_main:
        print(f"the search in {os.path.abspath(run_dir)} is complete (all {cfg.num_stages} "
              f"stages): nothing to resume. Its cell ({path}; re-derive at another skip budget "
              f"with --derive {os.path.join(run_dir, ARCH_STATE)} --max_skip M):", flush=True)
        print(format_genotype(genotype), flush=True)
    return 0


# ---------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------

@dataclass
class SearchRun:
    """What every stage of one run shares."""
    cfg: SearchConfig
    env: DistInfo
    data: SearchData
    num_classes: int
    run_dir: str
    metrics: MetricsWriter
    split_digest: str = ""                                  # weight/alpha division
    stages_done: list[dict] = field(default_factory=list)   # arch_state.json's "stages"


def resume_position(stage: int, epochs_done: int, epochs: int) -> str:
    """Where a resumed search continues, in the 0-based epoch numbers of the epoch lines
    (``stage 2 epoch 1/5``); a checkpoint's ``epoch`` counts the epochs done in its stage."""
    if epochs_done >= epochs:
        return f"at the end of stage {stage + 1} (all {epochs} epochs of this stage done)"
    return (f"at stage {stage + 1}, epoch {epochs_done} ({epochs_done} of {epochs} epochs of "
            "this stage done)")


def search_stage(run: SearchRun, stage: int, switches_n: Switches, switches_r: Switches,
                 ckpt: dict | None = None) -> Network:
    """Train one stage (resuming from ``ckpt`` if given) and return its network."""
    cfg, env = run.cfg, run.env
    plan = cfg.stages[stage]
    # Every stage starts afresh: new network, new alphas, new optimizers; only the
    # switches carry over (paper Sec. 3.2).
    # Deviation: seeded per stage (the release seeds once) so a resume rebuilds it.
    torch.manual_seed(seed_for(cfg.seed, stage))
    model = Network(plan.init_channels, run.num_classes, plan.layers, switches_n, switches_r,
                    drop_rate=plan.dropout_rate, stem=cfg.stem,
                    cell_layout=cfg.cell_layout).to(env.device)
    if env.distributed:
        broadcast_model(model)
        if env.rank > 0:  # different dropout masks and augmentations per rank
            torch.manual_seed(seed_for(cfg.seed, stage, env.rank))
    w_opt = torch.optim.SGD(model.weight_parameters(), lr=cfg.learning_rate,
                            momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True)
    a_opt = torch.optim.Adam(model.arch_parameters(), lr=cfg.arch_learning_rate,
                             betas=(0.5, 0.999), weight_decay=cfg.arch_weight_decay, foreach=True)
    scaler = grad_scaler(env.device, cfg.amp)
    first_epoch = 0
    if ckpt is not None:
        first_epoch = restore_search_stage(ckpt, model, w_opt, a_opt, scaler, env)
    if cfg.compile:
        torch._dynamo.reset()   # the previous stage's network leaves its compiled graphs
    model.checkpoint_cells = cfg.checkpoint_cells
    forward = prepare_model(model, cfg.channels_last, cfg.compile)
    reset_peak_memory(env.device)
    logger.info("=== stage %d/%d: %d cells, C=%d, %d ops per edge%s, skip dropout %.2f, "
                "%.3fM weights ===", stage + 1, cfg.num_stages, plan.layers, plan.init_channels,
                plan.ops, " (a random space)" if plan.space == RANDOM else "", plan.dropout_rate,
                sum(p.numel() for p in model.weight_parameters()) / 1e6)
    # A smaller batch in the advice scales the weights' SGD rate (linear scaling); Adam's
    # alpha rate does not depend on the gradient's scale and stays.
    memory_plan = plan_memory(model, [w_opt, a_opt], (3, cfg.image_size, cfg.image_size),
                              cfg.batch_size // env.world_size, cfg.batch_size, env.world_size,
                              {"--learning_rate": cfg.learning_rate}, model.checkpoint_cells,
                              env.device, cfg.amp)

    collapse = CollapseMonitor(stage + 1, cfg.arch_warmup_epochs, env.is_main)
    divergence = DivergenceMonitor(run.num_classes, "the search", "a lower --learning_rate or "
                                   "--arch_learning_rate", " (warned once per stage)")
    for epoch in range(first_epoch, cfg.epochs):
        t0 = time.time()
        lr = learning_rate(epoch, cfg.epochs, cfg.learning_rate, cfg.learning_rate_min,
                           cfg.lr_stepped_before_epoch)
        for group in w_opt.param_groups:
            group["lr"] = lr
        drop = skip_dropout_rate(epoch, cfg.epochs, plan.dropout_rate, cfg.arch_warmup_epochs,
                                 cfg.dropout_decay)
        model.set_drop_rate(drop)
        update_arch = epoch >= cfg.arch_warmup_epochs
        run.data.set_epoch(stage, epoch)
        logger.info("stage %d epoch %d/%d lr %.6e skip-dropout %.4f %s", stage + 1, epoch,
                    cfg.epochs, lr, drop, "weights+alphas" if update_arch else "weights only")
        with report_out_of_memory(memory_plan, f"stage {stage + 1} epoch {epoch}",
                                  os.path.join(run.run_dir, CHECKPOINT)):
            stats = train_epoch(model, run.data, w_opt, a_opt, cfg, update_arch, env,
                                desc=f"stage {stage + 1} epoch {epoch}", forward=forward,
                                scaler=scaler)
            valid = {"valid_loss": None, "valid_acc": None}
            if is_validation_epoch(epoch, cfg.epochs):
                # Faithful to the release: the alpha half is validated with the training
                # augmentation (it is the same dataset object).
                # Every process validates with rank 0's batch-norm statistics, so the figures
                # do not depend on how the batches were split over the processes.
                sync_buffers(model)
                valid = validate(forward, run.data, cfg, env)
                check_finite(valid["valid_loss"], "validation loss")
                warning = validation_warning(
                    stage + 1, epoch, epoch == cfg.epochs - 1, valid["valid_acc"],
                    stats["train_acc"], run.num_classes, *batch_norm_updates(model))
                if warning:
                    logger.warning(warning)
        check_finite_state(model)   # batch-norm statistics and alphas: nothing non-finite is saved
        seconds = time.time() - t0
        probs_n, probs_r = model.arch_probs()
        record = {
            "stage": stage + 1, "epoch": epoch, "lr": lr, "skip_dropout": drop,
            "layers": plan.layers, "init_channels": plan.init_channels, "ops_per_edge": plan.ops,
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
        state = search_state(
            cfg, env, stage=stage, epochs_done=epoch + 1, switches_normal=switches_n,
            switches_reduce=switches_r,
            model_args={"C": plan.init_channels, "num_classes": run.num_classes,
                        "layers": plan.layers, "stem": cfg.stem},
            model=model, w_opt=w_opt, a_opt=a_opt, scaler=scaler, lr=lr, skip_dropout=drop,
            stages_done=run.stages_done, split_digest=run.split_digest,
            data_stats=run.data.stats)
        if env.is_main:
            run.metrics.write(record)   # a resume drops lines after its checkpoint
            save_search(run.run_dir, state)
    return model


def end_stage(run: SearchRun, stage: int, model: Network, switches_n: Switches,
              switches_r: Switches) -> tuple[Switches, Switches]:
    """Record the stage (alphas, switches, its cell, peak memory) and switch off the
    lowest-weighted ops of every edge; return the next stage's switches."""
    cfg, env = run.cfg, run.env
    plan = cfg.stages[stage]
    probs_n, probs_r = model.arch_probs()
    peak = peak_memory_mb(env.device)
    logger.info("stage %d peak device memory: %s", stage + 1,
                f"{peak:.0f} MiB" if env.device.type == "cuda" else "n/a on CPU")
    stage_cell = derive_genotype(switches_n, switches_r, probs_n, probs_r,
                                 None if cfg.max_skip < 0 else cfg.max_skip)
    logger.info("stage %d cell (derived with the final rule): %s", stage + 1,
                format_genotype(stage_cell))
    # What the stage used beyond the paper's plan is said only where it differs, so that a
    # run of the paper's plan writes the arch_state.json it always wrote.
    differs = {**({"space": plan.space} if plan.space == RANDOM else {}),
               **({"dropout_decay": cfg.dropout_decay} if cfg.dropout_decay != DROPOUT_DECAY else {})}
    run.stages_done.append({
        "stage": stage + 1, "layers": plan.layers, "init_channels": plan.init_channels,
        "ops_per_edge": plan.ops, "dropout_rate": plan.dropout_rate, **differs,
        "alphas_normal": model.alphas_normal.detach().float().cpu().tolist(),
        "alphas_reduce": model.alphas_reduce.detach().float().cpu().tolist(),
        "switches_normal": switches_n, "switches_reduce": switches_r,
        "genotype": genotype_to_dict(stage_cell), "peak_memory_mb": round(peak, 1),
    })
    last = stage == cfg.num_stages - 1
    logger.info("------ dropping %d ops per edge%s ------", plan.drops, " (none first)" if last else "")
    new_n, new_r = prune_after_stage(switches_n, switches_r, probs_n, probs_r, plan.drops, last)
    _log_switches(stage + 1, new_n, new_r)
    if env.is_main:
        write_arch_state(run.run_dir, run.stages_done)
        # The stage's cell, trainable as the paper's Figure 3 cells: train_cifar.py --arch.
        write_json_atomic(cell_file(cfg, stage_cell, stage + 1),
                          os.path.join(run.run_dir, stage_genotype(stage + 1)))
        draw_safely(stage_cell, run.run_dir, f"stage{stage + 1}_")
    return new_n, new_r


def cell_file(cfg: SearchConfig, genotype: Genotype, stage: int | None = None) -> dict:
    """A genotype file's content: the cell and how it was found (training scripts ignore
    the metadata; the cell is the same either way)."""
    metadata = {"stem": cfg.stem, "image_size": cfg.image_size, "dataset": cfg.dataset}
    return {**genotype_to_dict(genotype),
            "metadata": metadata if stage is None else {**metadata, "stage": stage}}


def finish_search(run: SearchRun, model: Network, switches_n: Switches,
                  switches_r: Switches) -> Genotype:
    """The final cell from the last stage's switches and weights: 2 strongest non-none
    edges per node, then the skip-connect refinement of the normal cell (paper Sec. 3.3).
    Writes genotype.json, the cells per skip budget, arch_state.json and the diagrams."""
    cfg, env = run.cfg, run.env
    probs_n, probs_r = model.arch_probs()
    # Deviation: the last stage's pruned switches are only logged; the final cell is
    # derived from its 3-op switches and weights, which gives the release's cell.
    chosen, unrestricted, num_skips, budgets = final_cells(
        switches_n, switches_r, probs_n, probs_r, cfg.max_skip)
    logger.info("unrestricted cell (%d skip-connects in the normal cell): %s", num_skips,
                format_genotype(unrestricted))
    logger.info("------ restricting skip-connects ------")
    if not budgets:
        logger.info("the normal cell has %d skip-connect(s): no budget from 8 down is exceeded",
                    num_skips)
    for m, g in budgets:
        logger.info("max_skip %d: %s", m, format_genotype(g))
    logger.info("final cell (max_skip %s): %s", "none" if cfg.max_skip < 0 else cfg.max_skip,
                format_genotype(chosen))
    lines = gather(format_genotype(chosen), env)
    if len(set(lines)) != 1:
        raise RuntimeError(f"ranks derived different cells: {lines}")
    if env.distributed:
        logger.info("all %d processes derived this same cell", env.world_size)
    cell = cell_file(cfg, chosen)
    if env.is_main:
        write_json_atomic(cell, os.path.join(run.run_dir, GENOTYPE))
        write_json_atomic({"num_skip_connects": num_skips, "unrestricted": genotype_to_dict(unrestricted),
                           "by_max_skip": {str(m): genotype_to_dict(g) for m, g in budgets}},
                          os.path.join(run.run_dir, BUDGETS))
        write_arch_state(run.run_dir, run.stages_done,
                         {"max_skip": cfg.max_skip, "genotype": cell, "stem": cfg.stem})
        draw_safely(chosen, run.run_dir, "")
    return chosen


def log_plan(cfg: SearchConfig) -> None:
    """The stages the run will search, one line each (the plan of paper Sec. 4.1.1 by
    default)."""
    if cfg.random_space:
        logger.info("plan %s with --random_space: only its last stage is run, on a search space "
                    "drawn at random (seed %d) from the full one, %d ops per edge (none and %d "
                    "drawn from the other 7 on every edge)", cfg.plan, cfg.seed, cfg.stages[0].ops,
                    cfg.stages[0].ops - 1)
    else:
        logger.info("plan %s: %d stage(s), %d epochs each (%d weights-only), skip-dropout decay %g",
                    cfg.plan, cfg.num_stages, cfg.epochs, cfg.arch_warmup_epochs, cfg.dropout_decay)
    for s, plan in enumerate(cfg.stages):
        logger.info("  stage %d: %d cells, C=%d, %d ops per edge -> keeps %d, skip dropout %.2f%s",
                    s + 1, plan.layers, plan.init_channels, plan.ops, plan.keep, plan.dropout_rate,
                    " (random space)" if plan.space == RANDOM else "")


def main(cfg: SearchConfig) -> int:
    """The search (or --derive); the run folder is locked while it runs."""
    try:
        return _main(cfg)
    finally:
        release_run_locks()


def _main(cfg: SearchConfig) -> int:
    if cfg.derive:
        return run_derive(cfg)
    env = init_distributed(cfg.device, cfg.dist_timeout)
    cfg, ckpt = resume_search(cfg)
    if ckpt is None:    # a resumed run keeps the layout it saved
        cfg = resolve_cell_layout(cfg, env.device, env.world_size)
    if ckpt is not None:
        if search_complete(cfg.resume, ckpt, cfg):
            return report_complete(cfg.resume, cfg, env.is_main)
        if ckpt["world_size"] != env.world_size:
            logger.warning("resuming a %d-process run with %d processes: the data order and "
                           "random streams differ from the original run", ckpt["world_size"],
                           env.world_size)
    # After the resume: a resumed run keeps its own --threads (--demo's 1) unless given
    # again; set before it, --resume RUN_DIR alone ran on every core and summed in
    # another order than the run it continues.
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.batch_size % env.world_size:
        raise UserError(f"--batch_size {cfg.batch_size} does not divide evenly over "
                        f"{env.world_size} processes")
    check_amp(env.device, cfg.amp)
    # Read the data before creating the run folder: a wrong path leaves nothing behind.
    dataset, num_classes, description = build_search_data(cfg, (ckpt or {}).get("data_stats"))
    split = search_split(dataset, cfg, (ckpt or {}).get("split_digest"))
    check_search_batch(cfg, split)
    # Faithful to the release: --save is a prefix, the folder is {save}search-{note}-{time}.
    run_dir = open_run_dir(cfg.save, SEARCH_PREFIX, cfg.note, env.is_main, cfg.resume)
    setup_logging(run_dir if env.is_main else None, env.is_main)
    register_run(run_dir, CHECKPOINT, "train_search.py")
    logger.info("run folder %s", os.path.abspath(run_dir))
    seed_everything(cfg.seed, cfg.deterministic)
    log_run_start(cfg, env.device)
    if env.device.type == "cpu":    # the sums' order depends on it: a resume must match
        logger.info("CPU threads: %d", torch.get_num_threads())
    cells_at = cfg.image_size // STEM_REDUCTION[cfg.stem]
    logger.info("stem: %s (%s); the first cells see %dx%d maps",
                cfg.stem, cfg.stem_reason, cells_at, cells_at)
    if env.distributed:
        logger.info("data-parallel over %d processes: batch %d = %d x %d per process (gradients "
                    "averaged, as one process with batch %d); batch-norm statistics are per "
                    "process", env.world_size, cfg.batch_size, env.world_size,
                    cfg.batch_size // env.world_size, cfg.batch_size)
    data = SearchData(dataset, cfg, env, split)
    logger.info("data: %s; %d train the weights, %d the alphas", description, *data.sizes)
    for reason in getattr(dataset, "skipped", []):
        logger.warning("left out: %s", reason)
    for note in getattr(dataset, "notes", []):   # files not read, single-colour images
        logger.warning("warning: %s", note)
    logger.info("split %s%s, images per class weight/alpha half: %s", split.rule,
                f" with seed {cfg.seed}" if split.rule != "in order" else "",
                describe_split(dataset, split))
    if data.on_device:
        logger.info("input pipeline: images on the GPU as uint8, augmented there in batches")
    logger.info("cell layout: %s, channels_last %s (%s)", cfg.cell_layout, cfg.channels_last,
                cfg.cell_layout_reason)
    if cfg.amp != "none" or cfg.channels_last or cfg.compile:
        logger.info("speed options: amp %s, channels_last %s, compile %s (each changes float "
                    "rounding)", cfg.amp, cfg.channels_last, cfg.compile)
    run = SearchRun(cfg, env, data, num_classes, run_dir,
                    MetricsWriter(os.path.join(run_dir, METRICS) if env.is_main else None),
                    split.digest)

    log_plan(cfg)
    switches_n, switches_r = all_on_switches(), all_on_switches()
    if cfg.random_space:
        switches_n, switches_r = random_space_switches(cfg.stages[0].ops, cfg.seed)
    start_stage = 0
    if ckpt is not None:
        switches_n, switches_r = ckpt["switches_normal"], ckpt["switches_reduce"]
        run.stages_done = ckpt["stages_done"]
        start_stage = ckpt["stage"]
        if not cfg.lr_stepped_before_epoch:
            warn_old_schedule(partial(learning_rate, epochs=cfg.epochs, lr0=cfg.learning_rate,
                                      lr_min=cfg.learning_rate_min), cfg.epochs, 0)
        logger.info("resuming %s %s", run_dir, resume_position(start_stage, ckpt["epoch"], cfg.epochs))
        if env.is_main:
            truncate_metrics(os.path.join(run_dir, METRICS), ckpt["epoch"], start_stage, cfg.epochs)

    search_start = time.time()
    for stage in range(start_stage, cfg.num_stages):
        model = search_stage(run, stage, switches_n, switches_r,
                             ckpt if stage == start_stage else None)
        next_n, next_r = end_stage(run, stage, model, switches_n, switches_r)
        if stage < cfg.num_stages - 1:
            switches_n, switches_r = next_n, next_r
    genotype = finish_search(run, model, switches_n, switches_r)
    if env.device.type == "cuda":
        logger.info("peak device memory per stage: %s", ", ".join(
            f"{s['peak_memory_mb']:.0f} MiB" for s in run.stages_done))
    logger.info("search done in %.1f min; outputs in %s", (time.time() - search_start) / 60, run_dir)
    barrier()
    if env.is_main:     # the other ranks' cells were checked equal in finish_search
        plot_run_safely(run_dir, cfg.plot_format)
        print(format_genotype(genotype), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, parse_args()))
