"""The training loop. Read it top to bottom:

    Trainer(cfg)   launch env -> process group -> data -> model -> DeepSpeed engine -> resume
    fit()          for each step: train_step() (micro-batches: forward, backward; safeguards; optimizer
                   step), then at named points: skip report or rollback -> evaluation -> metrics record
                   -> stop on a signal -> checkpoint -> fault injection; at the end a checkpoint and a sample

Exit status of fit(): 0 when train.max_steps is reached, REQUEUE_EXIT_CODE (75) after a
SIGTERM/SIGUSR1 checkpoint, CHECKPOINT_WRITE_EXIT_CODE (74) when a checkpoint cannot be written; a step
that hangs ends the process with WATCHDOG_EXIT_CODE (76, watchdog.py).
"""

from __future__ import annotations

import math
import resource
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from synergy_dist.checkpoint import store as ckpt
from synergy_dist.config import Config, has_moe_layers, save_config, set_expert_parallel_size, validate_for_world
from synergy_dist.evaluate import evaluate_share
from synergy_dist.model.accounting import flops_per_byte
from synergy_dist.model.chunking import set_router_warmup
from synergy_dist.model.moe.expert_parallel import get_expert_parallel_group, init_expert_parallel_groups
from synergy_dist.model.moe.layer import MoEFeedForward, moe_param_groups, update_moe_biases
from synergy_dist.model.statistics import ModelStatistics, bits_per_byte
from synergy_dist.model.synergy import SynergyLM
from synergy_dist.train.compile import compile_blocks, compile_counts
from synergy_dist.train.data import (
    build_dataset,
    check_shard_sets,
    collective_read,
    data_sources,
    next_step_batches,
)
from synergy_dist.train.distributed import (
    CHECKPOINT_WRITE_EXIT_CODE,
    REQUEUE_EXIT_CODE,
    detect_env,
    init_distributed,
    peak_flops_per_second,
    resolve_dtype,
)
from synergy_dist.train.ds_config import build_ds_config
from synergy_dist.train.fault_injection import FaultInjector
from synergy_dist.train.metrics import MetricsLogger
from synergy_dist.train.optimizer import GatedAdamW
from synergy_dist.train.phases import PhaseClock
from synergy_dist.train.safeguards import Safeguards, Verdict
from synergy_dist.train.schedule import lr_at
from synergy_dist.train.seeding import rank_seed, seed_everything
from synergy_dist.train.watchdog import Watchdog

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # checkpoint, then exit with REQUEUE_EXIT_CODE


@dataclass
class StepResult:
    """What one Trainer.train_step() did."""

    loss: float  # training loss (the optimised objective), mean over ranks and micro-batches
    bpb: float  # bits per byte of the step's byte targets: summed bits / summed bytes over micro-batches and ranks
    lr: float  # base learning rate of the step (before each group's lr_mult)
    grad_norm: float  # global gradient norm (inf when non-finite)
    verdict: Verdict  # the safeguards' decision: applied, skipped (and why), rollback wanted
    stats: ModelStatistics  # router and MoE statistics, mean over the micro-batches (this rank)
    phases: dict[str, float]  # PhaseClock.summary(): wall and CPU seconds per phase (time_*_s, cpu_*_s)
    replaced_windows: int = 0  # windows moved off corrupt shards (data.on_corrupt=skip), summed over ranks


@contextmanager
def stop_signal_handlers(handler: Callable[[int, object], None]) -> Iterator[None]:
    """`handler` for SIGTERM and SIGUSR1 inside the block; the previous handlers again after it,
    whether the block returns or raises."""
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)  # None: installed outside Python


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.env = detect_env()
        validate_for_world(cfg, self.env.world_size, self.env.device_type)  # before any compute
        init_distributed(self.env, cfg.distributed.timeout_s)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.rank, self.world = self.env.rank, self.env.world_size
        self.dtype = resolve_dtype(cfg.precision.dtype, self.env.device_type)
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            print(f"synergy-train: {self.world} rank(s), {self.env.device}, {self.dtype}, launcher "
                  f"{self.env.launcher}\n--- config ---\n{(self.run_dir / 'config.yaml').read_text()}--------------",
                  flush=True)
        self.micro_steps = cfg.grad_accumulation_steps(self.world)
        self.global_batch = cfg.global_batch_sequences()

        # Data: the sources, or the bundled sample corpus.
        train_sources, valid_sources = data_sources(cfg, self.env.is_main)
        self.train_data = build_dataset(cfg, train_sources, rank=self.rank, world=self.world,
                                        global_batch=self.global_batch)
        self.valid_sources = valid_sources if cfg.train.eval_every_steps else []
        check_shard_sets(self.valid_sources, self.world)  # a bad validation set stops the run now, not at step N

        # Model, identical on every rank (same seed), then DeepSpeed.
        self.model = self._build_model()
        self.engine = self._build_engine()
        seed_everything(rank_seed(cfg.seed, self.rank))  # per-rank stream (MoE jitter, dropout)

        self.guards = Safeguards(cfg.safeguards)
        self.faults = FaultInjector(cfg.debug, self.rank)
        self.metrics = MetricsLogger(self.run_dir, self.env.is_main, cfg.train.max_steps,
                                     cfg.log.tensorboard, cfg.log.console,
                                     cfg.log.wandb_project if cfg.log.wandb else None, cfg.log.wandb_run_name)
        self.step = 0  # optimizer steps done (applied or skipped)
        self.data_offset = 0  # samples skipped past by rollbacks
        self.replaced_windows = 0  # windows moved off corrupt shards so far (data.on_corrupt=skip), all ranks
        self.stop_signal: int | None = None
        self.last_checkpoint: Path | None = None
        self.last_alarms: set[str] = set()
        self.peak_flops = peak_flops_per_second(self.env.device_type, self.dtype) * self.world  # for MFU
        self.flops_per_byte: float | None = None  # for MFU, from the first logged step's compression
        if cfg.checkpoint.resume:
            self._resume()

    # ------------------------------------------------------------------ building
    def _build_model(self) -> torch.nn.Module:
        ep = self.cfg.deepspeed.expert_parallel_size
        set_expert_parallel_size(self.cfg, ep)
        if has_moe_layers(self.cfg.model):
            init_expert_parallel_groups(ep)  # DeepSpeed's expert groups must exist before the model
        seed_everything(self.cfg.seed)
        model = SynergyLM(self.cfg.model)
        model.set_activation_checkpointing(self.cfg.deepspeed.activation_checkpointing)
        if self.cfg.train.compile:
            compile_blocks(model, self.cfg.train.compile_backend)
        if self.dtype == torch.float16:
            model = model.to(self.dtype)  # DeepSpeed's fp16 mode (plain byte models only); bf16 runs under autocast
        return model.to(self.env.device)

    def _build_engine(self):
        import deepspeed  # after synergy_dist.accelerator's policy, which the model modules apply on import

        groups = self.model.param_groups(self.cfg.optim.weight_decay)
        if has_moe_layers(self.cfg.model):
            groups = moe_param_groups(groups)
        self.optimizer = GatedAdamW(groups, lr=self.cfg.train.lr, betas=tuple(self.cfg.optim.betas),
                                    eps=self.cfg.optim.eps, weight_decay=self.cfg.optim.weight_decay)
        self.ds_config = build_ds_config(self.cfg, self.world, self.dtype)
        engine, _, _, _ = deepspeed.initialize(model=self.model, optimizer=self.optimizer, config=self.ds_config)
        return engine

    # ------------------------------------------------------------------ resume / checkpoint
    def _trainer_state(self) -> dict:
        consumed = self.samples_consumed()
        return {"step": self.step, "data_offset": self.data_offset, "samples_consumed": consumed,
                "data_state": self.train_data.state_at(consumed), "safeguards": self.guards.state_dict(),
                "replaced_windows": self.replaced_windows,
                "world_size": self.world, "config": self.cfg.to_dict()}

    def _agreed_latest(self) -> Path | None:
        """Rank 0 finds the newest complete checkpoint; every rank uses the same one."""
        found = [None]
        if self.env.is_main:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                path = ckpt.find_latest_complete(self.ckpt_root, self.cfg.checkpoint.verify)
            for w in caught:
                self.metrics.event(f"warning: {w.message}")
            found = [str(path) if path else None]
        if self.world > 1:
            dist.broadcast_object_list(found, src=0)
        return Path(found[0]) if found[0] else None

    def _resume(self) -> None:
        path = self._agreed_latest()
        if path is None:
            return
        state = ckpt.load_checkpoint(self.engine, path, self.rank, self.world, self.cfg.deepspeed.expert_parallel_size)
        if state["world_size"] != self.world:
            seed_everything(rank_seed(self.cfg.seed, self.rank, state["step"]))
        self.step, self.data_offset = state["step"], state["data_offset"]
        self.replaced_windows = state.get("replaced_windows", 0)
        self.guards.load_state_dict(state["safeguards"])
        self.last_checkpoint = path
        self.metrics.event(f"resumed from {path} at step {self.step} "
                           f"({state['world_size']} -> {self.world} ranks)")

    def save(self) -> None:
        c = self.cfg.checkpoint
        self.last_checkpoint = ckpt.save_checkpoint(self.engine, self.ckpt_root, self.step, self._trainer_state(),
                                                    self.rank, self.world,
                                                    on_rank_files_written=self.faults.on_save(self.step))
        if self.env.is_main:
            ckpt.prune(self.ckpt_root, c.keep_last, c.keep_every)
            self.metrics.event(f"checkpoint saved: {self.last_checkpoint}")

    def _rollback(self) -> None:
        """Too many spikes in a row: restore the last good checkpoint, skip past the data since then."""
        path = self._agreed_latest()
        if path is None:
            self.metrics.event(f"step {self.step}: spike rollback wanted but no checkpoint exists; continuing")
            return
        at_step, skipped_to = self.step, self.samples_consumed()
        guard_state = self.guards.state_dict()
        state = ckpt.load_checkpoint(self.engine, path, self.rank, self.world, self.cfg.deepspeed.expert_parallel_size)
        self.step = state["step"]
        self.data_offset = skipped_to - self.step * self.global_batch  # continue after the offending data
        self.guards.load_state_dict(guard_state)
        self.guards.state.consecutive_spikes = 0
        self.guards.record_rollback(at_step, self.step, (state["samples_consumed"], skipped_to))
        self._restart_data()
        self.metrics.event(f"rollback at step {at_step} to {path} (step {self.step}); skipping samples "
                           f"[{state['samples_consumed']}, {skipped_to})")

    # ------------------------------------------------------------------ data
    def samples_consumed(self) -> int:
        return self.step * self.global_batch + self.data_offset

    def _restart_data(self) -> None:
        self.train_data.load_state_dict(self.train_data.state_at(self.samples_consumed()))
        loader = torch.utils.data.DataLoader(self.train_data, batch_size=None, num_workers=self.cfg.data.num_workers)
        self.batches = iter(loader)

    def _step_batches(self) -> list[dict]:
        """This step's micro-batches; a data error stops every rank here (collective)."""
        batches = next_step_batches(self.batches, self.micro_steps, self.world)
        return [{k: v.to(self.env.device) for k, v in batch.items()} for batch in batches]

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self) -> StepResult:
        """Forward/backward over the micro-batches, then the (possibly vetoed) optimizer step."""
        clock = PhaseClock()
        cfg, engine = self.cfg, self.engine
        lr = lr_at(self.step, cfg)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        set_router_warmup(self.model, self.step)
        batch_number = self.samples_consumed() // self.global_batch + 1  # in the data stream, for fault injection
        sums = torch.zeros(4, dtype=torch.float64)  # loss, byte nats, bytes, replaced windows over micro-batches
        stats: list[ModelStatistics] = []
        with clock.phase("data"):
            batches = self._step_batches()
        for micro, batch in enumerate(batches):
            with clock.phase("forward"):
                out = engine(batch["input_ids"], labels=batch["labels"])
            loss = self.faults.on_loss(out.loss, batch_number)
            with clock.phase("backward"):
                engine.backward(loss)
            if micro < self.micro_steps - 1:
                with clock.phase("optimizer"):
                    engine.step()  # not the accumulation boundary: DeepSpeed only counts the micro-step
            sums += torch.tensor([loss.item(), out.stats.byte_nats.item(), out.stats.n_bytes.item(),
                                  batch["replaced"].sum().item()], dtype=torch.float64)
            stats.append(out.stats)
        loss_sum, byte_nats, n_bytes, replaced = self._global_sum(sums)
        self.replaced_windows += int(replaced)
        step_loss, step_bpb = loss_sum / (self.micro_steps * self.world), bits_per_byte(byte_nats, n_bytes)
        with clock.phase("optimizer"):
            verdict, grad_norm = self._guarded_optimizer_step(step_loss)
        self.guards.record(verdict, step_loss, grad_norm)
        self._after_update(verdict.apply)
        self.step += 1
        return StepResult(loss=step_loss, bpb=step_bpb, lr=lr, grad_norm=grad_norm, verdict=verdict,
                          stats=ModelStatistics.mean(stats), phases=clock.summary(), replaced_windows=int(replaced))

    def _guarded_optimizer_step(self, loss: float) -> tuple[Verdict, float]:
        """engine.step() at the accumulation boundary. DeepSpeed computes the global grad norm, then calls
        our optimizer's step(), whose gate asks the safeguards (same inputs, same verdict on every rank)."""
        own_norm = None if self.cfg.deepspeed.zero_stage else self._grad_norm_stage0()
        decided: dict = {}

        def gate() -> bool:
            if not decided:
                norm = own_norm if own_norm is not None else float(self.engine.optimizer._global_grad_norm)
                decided.update(verdict=self.guards.judge(loss, norm), norm=norm)
            return decided["verdict"].apply

        self.optimizer.gate = gate
        try:
            self.engine.step()
        finally:
            self.optimizer.gate = None
        if not decided:  # DeepSpeed skipped the update itself (non-finite gradients under ZeRO)
            norm = self.engine.get_global_grad_norm()
            decided.update(verdict=Verdict(apply=False, reason="nonfinite"),
                           norm=float("inf") if norm is None else float(norm))
        return decided["verdict"], decided["norm"]

    def _global_sum(self, values: torch.Tensor) -> list[float]:
        values = values.clone()
        if self.world > 1:
            dist.all_reduce(values)
        return values.tolist()

    def _grad_norm_stage0(self) -> float:
        """Global L2 norm of the (already all-reduced) gradients: dense + experts of every EP rank."""
        dense, experts = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for p in self.model.parameters():
            if p.grad is not None:
                sq = p.grad.detach().double().pow(2).sum().cpu()
                if getattr(p, "allreduce", True):
                    dense += sq
                else:
                    experts += sq
        ep = self.cfg.deepspeed.expert_parallel_size
        if ep > 1:
            dist.all_reduce(experts, group=get_expert_parallel_group(ep))
        return math.sqrt(float(dense + experts))

    def _after_update(self, applied: bool) -> None:
        if applied:
            update_moe_biases(self.model)
        else:  # forget the load counted for a vetoed step
            for module in self.model.modules():
                if isinstance(module, MoEFeedForward) and hasattr(module, "load_since_update"):
                    module.load_since_update.zero_()

    # ------------------------------------------------------------------ evaluation and sampling
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation bits per byte (eval_bpb) and the bytes it counted (eval_bytes): synergy-eval's windows and
        definition over the validation shard sets, ranks taking turns by batch of batch.micro_batch_size
        windows, train.eval_batches batches per rank (0 = the whole set). Collective."""
        tally = collective_read(lambda: evaluate_share(self.engine, self.valid_sources, self.cfg.data.seq_len,
                                                       self.cfg.batch.micro_batch_size, self.rank, self.world,
                                                       self.cfg.train.eval_batches), self.world)
        nats, n_bytes = self._global_sum(torch.tensor([tally.nats, tally.bytes], dtype=torch.float64))
        return {"eval_bpb": bits_per_byte(nats, n_bytes), "eval_bytes": int(n_bytes)}

    def generate_sample(self) -> Path | None:
        """All ranks generate together (expert-parallel layers need every rank); rank 0 writes it."""
        t = self.cfg.train
        if t.sample_bytes == 0:
            return None
        self.engine.eval()
        model = self.engine.module
        if self.cfg.deepspeed.zero_stage == 3:
            import deepspeed  # heavy, and only after init_distributed() chose DeepSpeed's accelerator

            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                text = model.generate(t.sample_prompt.encode(), t.sample_bytes, temperature=0.8, top_k=40,
                                      seed=self.cfg.seed)
        else:
            text = model.generate(t.sample_prompt.encode(), t.sample_bytes, temperature=0.8, top_k=40,
                                  seed=self.cfg.seed)
        self.engine.train()
        path = self.run_dir / "sample.txt"
        if self.env.is_main:
            path.write_bytes(t.sample_prompt.encode() + text)
        return path

    # ------------------------------------------------------------------ the loop
    def fit(self) -> int:
        """Train to train.max_steps (returns 0), or until a SIGTERM/SIGUSR1 checkpoint (returns 75), or until a
        checkpoint cannot be written (returns 74, the previous checkpoint standing)."""
        try:
            note = self.metrics.event if self.env.is_main else None  # the watchdog's line, in events.log too
            with stop_signal_handlers(self._on_signal), Watchdog(self.cfg.train, self.rank, note) as dog:
                self._restart_data()
                while self.step < self.cfg.train.max_steps:
                    started = time.perf_counter()
                    with dog.step(self.step + 1):  # a hung step exits with WATCHDOG_EXIT_CODE (76)
                        result = self.train_step()
                    elapsed = time.perf_counter() - started
                    self._report_skip(result)
                    if result.verdict.rollback:
                        self._rollback()
                        continue
                    evaluation = self._evaluate_if_due()
                    self._log_if_due(result, elapsed, evaluation)
                    if self._stop_requested() and self.step < self.cfg.train.max_steps:
                        return self._checkpoint_and_requeue()
                    self._checkpoint_if_due()
                    self.faults.after_step(self.step, lambda: self.stop_signal is not None)
                self._finish()
                return 0
        except ckpt.CheckpointWriteError as err:  # every rank raises it, with the same message
            with suppress(OSError):  # the line is printed first; events.log may sit on the full disk too
                self.metrics.event(f"synergy-train: {err}")
            return CHECKPOINT_WRITE_EXIT_CODE
        finally:
            self.metrics.close()

    # ------------------------------------------------------------------ what fit() calls at its named points
    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum  # finish the current step, then checkpoint and exit

    def _stop_requested(self) -> bool:
        """Whether any rank was signalled (collective: every rank stops at the same step)."""
        flag = torch.tensor([1.0 if self.stop_signal is not None else 0.0])
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _checkpoint_and_requeue(self) -> int:
        self.save()
        self.metrics.event(f"signal received: checkpoint at step {self.step}, exiting with {REQUEUE_EXIT_CODE}")
        return REQUEUE_EXIT_CODE

    def _report_skip(self, result: StepResult) -> None:
        if result.replaced_windows:
            self.metrics.event(f"step {self.step}: {result.replaced_windows} window(s) replaced: they touch corrupt "
                               "shards, named in the warnings (data.on_corrupt=skip)")
        verdict = result.verdict
        if not verdict.apply:
            self.metrics.event(f"step {self.step}: update skipped ({verdict.reason}), loss {result.loss:.4f}, "
                               f"grad norm {result.grad_norm:.4g}")

    def _evaluate_if_due(self) -> dict:
        """Validation bpb every train.eval_every_steps ({} on other steps)."""
        if not self.valid_sources or self.step % self.cfg.train.eval_every_steps != 0:
            return {}
        evaluation = self.evaluate()
        self.metrics.event(f"step {self.step}: validation bpb {evaluation['eval_bpb']:.4f}")
        return evaluation

    def _log_if_due(self, result: StepResult, elapsed: float, evaluation: dict) -> None:
        """The metrics record (metrics.jsonl, TensorBoard, console line) and router alarms, every
        log.every_steps, on evaluation steps and at the last step."""
        cfg = self.cfg
        if not (evaluation or self.step % cfg.log.every_steps == 0 or self.step == cfg.train.max_steps):
            return
        verdict = result.verdict
        targets = {f"stage{i}": s.router.target_bytes_per_concept for i, s in enumerate(cfg.model.stages)}
        stats = result.stats
        bytes_per_s = self.global_batch * cfg.data.seq_len / elapsed
        # bytes per innermost concept token
        concept_ratio = (float(stats.stages[-1].bytes_per_concept) if stats.stages else 1.0) or 1.0
        if self.flops_per_byte is None:
            self.flops_per_byte = self._flops_per_byte(stats)
        record = {
            **stats.flatten(),  # first: the step-wide values below (bpb over all ranks' bytes) take precedence
            "loss": result.loss, "bpb": result.bpb, **evaluation, "lr": result.lr,
            "grad_norm": result.grad_norm, "skipped": not verdict.apply, "skip_reason": verdict.reason,
            "skipped_steps": self.guards.state.skipped_nonfinite + self.guards.state.skipped_spikes,
            "skipped_nonfinite": self.guards.state.skipped_nonfinite,
            "skipped_spikes": self.guards.state.skipped_spikes, "rollbacks": len(self.guards.state.rollbacks),
            "data_skipped_windows": self.replaced_windows,
            "step_time_s": elapsed, "bytes_per_s": bytes_per_s, "concept_tokens_per_s": bytes_per_s / concept_ratio,
            "mfu": (self.flops_per_byte or 0.0) * bytes_per_s / self.peak_flops, "world_size": self.world,
            "samples_consumed": self.samples_consumed(),
            "data_state": self.train_data.state_at(self.samples_consumed()),
            "memory_mb": self._memory_mb(), **result.phases,
        }
        record["router_alarms"] = self._raise_router_alarms(stats, targets)
        if cfg.train.compile:
            record.update(compile_counts())  # recompilations included: must stay bounded
        self.metrics.log(self.step, record)

    def _raise_router_alarms(self, stats: ModelStatistics, targets: dict[str, float]) -> int:
        """Report each router alarm when it starts, not every step it lasts; returns how many are on."""
        alarms = self.guards.router_alarms(stats, targets)
        for kind, text in alarms.items():
            if kind not in self.last_alarms:
                self.metrics.event(f"step {self.step}: router alarm: {text}")
        self.last_alarms = set(alarms)
        return len(alarms)

    def _checkpoint_if_due(self) -> None:
        every = self.cfg.checkpoint.every_steps
        if every and self.step % every == 0 and self.step < self.cfg.train.max_steps:
            self.save()

    def _finish(self) -> None:
        """At train.max_steps: the final checkpoint (unless this step's exists) and the sample."""
        saved_now = self.last_checkpoint is not None and ckpt.tag_for(self.step) == self.last_checkpoint.name
        if self.cfg.checkpoint.save_at_end and not saved_now:
            self.save()
        sample = self.generate_sample()
        if self.env.is_main:
            print(f"\ndone: {self.step} steps\n  checkpoint: {self.last_checkpoint}\n  metrics:    "
                  f"{self.run_dir / 'metrics.jsonl'}\n  sample:     {sample}", flush=True)
            if sample is not None:
                text = sample.read_bytes().decode("utf-8", errors="replace")
                print(f"--- sample ---\n{text}\n--------------", flush=True)

    def _flops_per_byte(self, stats: ModelStatistics) -> float | None:
        try:
            realised = [float(stage.bytes_per_concept) for stage in stats.stages]
            return float(flops_per_byte(self.cfg.model, self.cfg.data.seq_len, realised or None))
        except Exception as err:  # MFU is informative; never stop training for it
            self.metrics.event(f"MFU unavailable: {err}")
            return 0.0

    def _memory_mb(self) -> float:
        if self.env.device_type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(cfg: Config) -> int:
    """Build a Trainer, fit, tear down the process group; returns the exit status."""
    trainer = Trainer(cfg)
    status = trainer.fit()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return status


__all__ = ["Trainer", "StepResult", "train", "REQUEUE_EXIT_CODE"]
