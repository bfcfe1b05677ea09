"""The training loop. Read it top to bottom:

    Trainer(cfg)   launch env -> process group -> data -> model -> DeepSpeed engine -> resume
    fit()          for each step: micro-batches (forward, backward) -> safeguards -> optimizer step
                   -> metrics -> evaluation -> checkpoint -> stop on a signal; at the end a sample

Exit status of fit(): 0 when train.max_steps is reached, REQUEUE_EXIT_CODE (75) after a
SIGTERM/SIGUSR1 checkpoint.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import resource
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from synergy_dist.checkpoint import store as ckpt
from synergy_dist.config import Config, has_moe_layers, save_config, set_expert_parallel_size, validate_for_world
from synergy_dist.train.distributed import (
    REQUEUE_EXIT_CODE,
    detect_env,
    init_distributed,
    peak_flops_per_second,
    resolve_dtype,
)
from synergy_dist.train.ds_config import build_ds_config
from synergy_dist.train.metrics import MetricsLogger, to_number
from synergy_dist.train.optimizer import GatedAdamW, lr_at
from synergy_dist.train.phases import PhaseClock
from synergy_dist.train.safeguards import Safeguards, Verdict


class _InfGradient(torch.autograd.Function):
    """Fault injection: identity forward, infinite gradient backward (a finite loss with bad grads)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sample_shards(cfg: Config, is_main: bool) -> tuple[list, list]:
    """Train/valid shard sets of the bundled sample corpus, preprocessed once (by rank 0) on first use."""
    from synergy_dist import SAMPLE_CORPUS

    fraction = cfg.data.sample_valid_fraction
    # The preprocess plan records its input path, so each installation (checkout) gets its own cache.
    key = hashlib.sha256(f"{SAMPLE_CORPUS.resolve()}-{SAMPLE_CORPUS.stat().st_size}-{fraction}".encode()).hexdigest()[:12]
    out = Path(cfg.data.sample_dir or Path.home() / ".cache" / "synergy_dist" / f"sample-{key}")
    if is_main:
        from data_pipeline.preprocess import preprocess

        preprocess([str(SAMPLE_CORPUS)], out, valid_fraction=fraction, progress=True)
    if dist.is_initialized():
        dist.barrier()
    return [str(out / "train")], [str(out / "valid")]


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.env = detect_env()
        validate_for_world(cfg, self.env.world_size, self.env.device_type)  # before any compute
        init_distributed(self.env)
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
        train_sources, valid_sources = list(cfg.data.sources), list(cfg.data.valid_sources)
        if not train_sources:
            train_sources, sample_valid = sample_shards(cfg, self.env.is_main)
            valid_sources = valid_sources or sample_valid
        if cfg.data.weights:
            train_sources = list(zip(train_sources, cfg.data.weights))
        self.train_data = self._dataset(train_sources, rank=self.rank, world=self.world, global_batch=self.global_batch)
        self.valid_data = None
        if valid_sources and cfg.train.eval_every_steps:
            eval_global = self.world * cfg.batch.micro_batch_size
            self.valid_data = self._dataset(valid_sources, rank=self.rank, world=self.world, global_batch=eval_global)

        # Model, identical on every rank (same seed), then DeepSpeed.
        self.model = self._build_model()
        self.engine = self._build_engine()
        seed_everything(cfg.seed * 1_000_003 + 7919 * (self.rank + 1))  # per-rank stream (MoE jitter, dropout)

        self.guards = Safeguards(cfg.safeguards)
        self.metrics = MetricsLogger(self.run_dir, self.env.is_main, cfg.train.max_steps,
                                     cfg.log.tensorboard, cfg.log.console)
        self.step = 0  # optimizer steps done (applied or skipped)
        self.data_offset = 0  # samples skipped past by rollbacks
        self.stop_signal: int | None = None
        self.last_checkpoint: Path | None = None
        self.last_alarms: set[str] = set()
        if cfg.checkpoint.resume:
            self._resume()

    # ------------------------------------------------------------------ building
    def _dataset(self, sources: list, rank: int, world: int, global_batch: int):
        from data_pipeline.stream import StreamingByteDataset

        return StreamingByteDataset(sources, seq_len=self.cfg.data.seq_len, global_batch_size=global_batch,
                                    micro_batch_size=self.cfg.batch.micro_batch_size, seed=self.cfg.seed,
                                    rank=rank, world_size=world, pack=self.cfg.data.pack,
                                    on_corrupt=self.cfg.data.on_corrupt,
                                    batched=True)  # yields collated micro-batches: no per-sample tensors

    def _build_model(self) -> torch.nn.Module:
        from synergy_dist.model import SynergyLM

        ep = self.cfg.deepspeed.expert_parallel_size
        set_expert_parallel_size(self.cfg, ep)
        if has_moe_layers(self.cfg.model):
            from synergy_dist.model.expert_parallel import init_expert_parallel_groups

            init_expert_parallel_groups(ep)  # DeepSpeed's expert groups must exist before the model
        seed_everything(self.cfg.seed)
        model = SynergyLM(self.cfg.model)
        model.set_activation_checkpointing(self.cfg.deepspeed.activation_checkpointing)
        if self.dtype != torch.float32 and not has_moe_layers(self.cfg.model):
            model = model.to(self.dtype)  # MoE models stay fp32 and run under autocast (see ds_config)
        return model.to(self.env.device)

    def _build_engine(self):
        import deepspeed
        from synergy_dist.model.moe import moe_param_groups

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
            seed_everything(self.cfg.seed * 1_000_003 + 7919 * (self.rank + 1) + state["step"])
        self.step, self.data_offset = state["step"], state["data_offset"]
        self.guards.load_state_dict(state["safeguards"])
        self.last_checkpoint = path
        self.metrics.event(f"resumed from {path} at step {self.step} "
                           f"({state['world_size']} -> {self.world} ranks)")

    def save(self) -> None:
        c = self.cfg.checkpoint
        kill = None
        if self.cfg.debug.kill_in_save_at_step == self.step:  # fault injection: die with part of the checkpoint on disk
            def kill(_path: Path) -> None:
                os.kill(os.getpid(), signal.SIGKILL)
        self.last_checkpoint = ckpt.save_checkpoint(self.engine, self.ckpt_root, self.step, self._trainer_state(),
                                                    self.rank, self.world, on_rank_files_written=kill)
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

    def _next_batch(self) -> dict:
        return {k: v.to(self.env.device) for k, v in next(self.batches).items()}

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self) -> dict:
        """Forward/backward over the micro-batches, then the (possibly vetoed) optimizer step."""
        clock = PhaseClock()
        cfg, dbg, engine = self.cfg, self.cfg.debug, self.engine
        lr = lr_at(self.step, cfg)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        batch_number = self.samples_consumed() // self.global_batch + 1  # in the data stream, for fault injection
        sums = torch.zeros(2, dtype=torch.float64)  # loss, bpb summed over micro-batches
        aux_sum: dict = {}
        for micro in range(self.micro_steps):
            with clock.phase("data"):
                batch = self._next_batch()
            with clock.phase("forward"):
                out = engine(batch["input_ids"], labels=batch["labels"])
            loss = out.loss
            if batch_number in dbg.nan_loss_batches:
                loss = loss * float("nan")
            if batch_number in dbg.spike_loss_batches:
                loss = loss * dbg.spike_factor
            if batch_number in dbg.inf_grad_batches:
                loss = _InfGradient.apply(loss)
            with clock.phase("backward"):
                engine.backward(loss)
            if micro < self.micro_steps - 1:
                with clock.phase("optimizer"):
                    engine.step()  # not the accumulation boundary: DeepSpeed only counts the micro-step
            sums += torch.tensor([loss.item(), out.aux["bpb"].item()], dtype=torch.float64)
            for key, value in out.aux.items():
                scalar = isinstance(value, torch.Tensor) and value.numel() == 1
                aux_sum[key] = aux_sum.get(key, 0.0) + value.item() if scalar else value
        step_loss, step_bpb = self._global_mean(sums / self.micro_steps)
        with clock.phase("optimizer"):
            verdict, grad_norm = self._guarded_optimizer_step(step_loss)
        self.guards.record(verdict, step_loss, grad_norm)
        self._after_update(verdict.apply)
        self.step += 1
        aux = {k: (v / self.micro_steps if isinstance(v, float) else v) for k, v in aux_sum.items()}
        return {"loss": step_loss, "bpb": step_bpb, "lr": lr, "grad_norm": grad_norm, "verdict": verdict, "aux": aux,
                "phases": clock.summary()}

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

    def _global_mean(self, values: torch.Tensor) -> list[float]:
        if self.world > 1:
            dist.all_reduce(values)
            values = values / self.world
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
            from synergy_dist.model.expert_parallel import get_expert_parallel_group

            dist.all_reduce(experts, group=get_expert_parallel_group(ep))
        return math.sqrt(float(dense + experts))

    def _after_update(self, applied: bool) -> None:
        from synergy_dist.model.moe import MoEFeedForward, update_moe_biases

        if applied:
            update_moe_biases(self.model)
        else:  # forget the load counted for a vetoed step
            for module in self.model.modules():
                if isinstance(module, MoEFeedForward) and hasattr(module, "load_since_update"):
                    module.load_since_update.zero_()

    # ------------------------------------------------------------------ evaluation and sampling
    @torch.no_grad()
    def evaluate(self) -> dict:
        self.engine.eval()
        self.valid_data.load_state_dict(self.valid_data.state_at(0))
        loader = torch.utils.data.DataLoader(self.valid_data, batch_size=None)
        totals = torch.zeros(2, dtype=torch.float64)
        for _, batch in zip(range(self.cfg.train.eval_batches), loader):
            out = self.engine(batch["input_ids"].to(self.env.device), labels=batch["labels"].to(self.env.device))
            totals += torch.tensor([out.aux["bpb"].item(), 1.0], dtype=torch.float64)
        self.engine.train()
        bpb, _ = self._global_mean(totals / max(1.0, totals[1].item()))
        return {"eval_bpb": bpb}

    def generate_sample(self) -> Path | None:
        """All ranks generate together (expert-parallel layers need every rank); rank 0 writes it."""
        t = self.cfg.train
        if t.sample_bytes == 0:
            return None
        self.engine.eval()
        model = self.engine.module
        if self.cfg.deepspeed.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                text = model.generate(t.sample_prompt.encode(), t.sample_bytes, temperature=0.8, top_k=40, seed=self.cfg.seed)
        else:
            text = model.generate(t.sample_prompt.encode(), t.sample_bytes, temperature=0.8, top_k=40, seed=self.cfg.seed)
        self.engine.train()
        path = self.run_dir / "sample.txt"
        if self.env.is_main:
            path.write_bytes(t.sample_prompt.encode() + text)
        return path

    # ------------------------------------------------------------------ the loop
    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum  # finish the current step, then checkpoint and exit

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_signal is not None else 0.0])
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def fit(self) -> int:
        cfg = self.cfg
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGUSR1, self._on_signal)
        self._restart_data()
        bytes_per_step = self.global_batch * cfg.data.seq_len
        peak = peak_flops_per_second(self.env.device_type, self.dtype) * self.world
        flops_per_byte = None
        targets = {f"stage{i}": s.router.target_bytes_per_concept for i, s in enumerate(cfg.model.stages)}
        while self.step < cfg.train.max_steps:
            started = time.perf_counter()
            result = self.train_step()
            elapsed = time.perf_counter() - started
            verdict: Verdict = result["verdict"]
            if not verdict.apply:
                self.metrics.event(f"step {self.step}: update skipped ({verdict.reason}), loss {result['loss']:.4f}, "
                                   f"grad norm {result['grad_norm']:.4g}")
            if verdict.rollback:
                self._rollback()
                continue
            evaluation = {}
            if self.valid_data is not None and self.step % cfg.train.eval_every_steps == 0:
                evaluation = self.evaluate()
                self.metrics.event(f"step {self.step}: validation bpb {evaluation['eval_bpb']:.4f}")
            if evaluation or self.step % cfg.log.every_steps == 0 or self.step == cfg.train.max_steps:
                aux = {k: to_number(v) for k, v in result["aux"].items()}
                bytes_per_s = bytes_per_step / elapsed
                innermost = f"stage{len(targets) - 1}/bytes_per_concept"
                concept_ratio = aux.get(innermost, 1.0) or 1.0  # bytes per innermost concept token
                if flops_per_byte is None:
                    flops_per_byte = self._flops_per_byte(aux)
                record = {
                    "loss": result["loss"], "bpb": result["bpb"], **evaluation, "lr": result["lr"],
                    "grad_norm": result["grad_norm"], "skipped": not verdict.apply, "skip_reason": verdict.reason,
                    "skipped_steps": self.guards.state.skipped_nonfinite + self.guards.state.skipped_spikes,
                    "skipped_nonfinite": self.guards.state.skipped_nonfinite,
                    "skipped_spikes": self.guards.state.skipped_spikes, "rollbacks": len(self.guards.state.rollbacks),
                    "step_time_s": elapsed, "bytes_per_s": bytes_per_s, "concept_tokens_per_s": bytes_per_s / concept_ratio,
                    "mfu": (flops_per_byte or 0.0) * bytes_per_s / peak, "world_size": self.world,
                    "samples_consumed": self.samples_consumed(), "data_state": self.train_data.state_at(self.samples_consumed()),
                    "memory_mb": self._memory_mb(), **result["phases"], **aux,
                }
                alarms = self.guards.router_alarms(aux, targets)
                record["router_alarms"] = len(alarms)
                for kind, text in alarms.items():
                    if kind not in self.last_alarms:  # print when an alarm starts, not every step it lasts
                        self.metrics.event(f"step {self.step}: router alarm: {text}")
                self.last_alarms = set(alarms)
                self.metrics.log(self.step, record)
            due = cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0
            if self._stop_requested() and self.step < cfg.train.max_steps:
                self.save()
                self.metrics.event(f"signal received: checkpoint at step {self.step}, exiting with {REQUEUE_EXIT_CODE}")
                self.metrics.close()
                return REQUEUE_EXIT_CODE
            if due and self.step < cfg.train.max_steps:
                self.save()
            if cfg.debug.hang_after_step == self.step:
                deadline = time.time() + 600  # a test kills us here, or signals us to go on and stop
                while self.stop_signal is None and time.time() < deadline:
                    time.sleep(0.02)
        if cfg.checkpoint.save_at_end and (self.last_checkpoint is None or ckpt.tag_for(self.step) != self.last_checkpoint.name):
            self.save()
        sample = self.generate_sample()
        if self.env.is_main:
            print(f"\ndone: {self.step} steps\n  checkpoint: {self.last_checkpoint}\n  metrics:    "
                  f"{self.run_dir / 'metrics.jsonl'}\n  sample:     {sample}", flush=True)
            if sample is not None:
                print(f"--- sample ---\n{sample.read_bytes().decode('utf-8', errors='replace')}\n--------------", flush=True)
        self.metrics.close()
        return 0

    def _flops_per_byte(self, aux: dict) -> float | None:
        try:
            from synergy_dist.model.accounting import flops_per_byte

            stages = len(self.cfg.model.stages)
            realised = [aux.get(f"stage{i}/bytes_per_concept") for i in range(stages)]
            return float(flops_per_byte(self.cfg.model, self.cfg.data.seq_len, realised if stages else None))
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


__all__ = ["Trainer", "train", "REQUEUE_EXIT_CODE"]
