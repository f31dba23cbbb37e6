"""Seed-model scale on this machine: memory per rank, start-up, checkpoints, export and speed on the
Raiden-shaped scale model (scripts.make_scale_model), projected to the real 26-layer model. What each
configuration and part runs and records: docs/distributed.md ("Measured at seed-model scale").

    make bench-scale                                # writes bench/scale.json, bench/scale.md
    python -m scripts.bench_scale --configs activations --update   # re-measure one part into bench/scale.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from scripts import bench_train, harness
from scripts.harness import ROOT, PeakRss, describe, release_free_memory, rss, rss_parts, vm_hwm

CONFIGS = ("single", "fsdp2", "zero3")
SHARDED = CONFIGS[1:]
GB = 1e9


def gathered_layers(backend: str, layers: int) -> int:
    """Decoder layers' worth of gathered weights a rank holds at its peak besides its shard: 2 (a gathered unit
    costs twice its bytes), 3 for FSDP2 with a next layer to prefetch in backward (docs/distributed.md)."""
    return 3 if backend == "fsdp2" and layers > 1 else 2


REAL_LAYERS = 26  # Kquant03/Raiden-16x3.43B
RECIPE_TOKENS = 2048  # recipes/raiden-16x3b*.yaml: block_size 2048, per_device_train_batch_size 1
# Fixed costs of a GPU process that a CPU cannot measure: stated assumptions, added to the projection.
OVERHEADS = {
    "CUDA context": 0.6 * GB,  # driver context + torch's kernels, lazy loading on (CUDA 12, H100-class)
    "NCCL buffers": 1.0 * GB,  # several GPUs only: communicators' channel buffers, streams, workspace
}
FRAGMENTATION = 0.10  # the caching allocator's reserved-but-unused share, over the tensors' bytes
TARGETS = {"rss_vs_predicted": 0.15, "checkpoint_share": 0.01, "startup_share": 0.10, "export_rss": 0.25}


# ---- the model's bytes, from the safetensors headers (no weights read) --------------------


def model_anatomy(model_dir: Path) -> dict:
    from router_tune.io.shards import read_header

    sizes = {n: t.nbytes for f in sorted(model_dir.glob("*.safetensors")) for n, t in read_header(f)[1].items()}
    config = json.loads((model_dir / "config.json").read_text())
    under = lambda prefix: sum(b for n, b in sizes.items() if n.startswith(prefix))
    per_layer = [under(f"model.layers.{i}.") for i in range(config["num_hidden_layers"])]
    return {
        "layers": config["num_hidden_layers"],
        "model_bytes": sum(sizes.values()),
        "layer_bytes": max(per_layer),
        "moe_block_bytes": under("model.layers.0.block_sparse_moe."),
        "attention_bytes": under("model.layers.0.self_attn."),
        "outside_layers_bytes": sum(sizes.values()) - sum(per_layer),
        "expert_bytes": sum(b for n, b in sizes.items() if ".experts." in n),
        "config": {k: config[k] for k in ("hidden_size", "intermediate_size", "num_local_experts", "vocab_size")},
    }


# ---- one rank of one configuration, or one part (a fresh process) -------------------------


def worker(args) -> None:
    import torch

    from router_tune.training.trainer import RouterTrainer

    release_free_memory()
    after_imports, parts_after_imports = rss(), rss_parts()
    from datasets import load_from_disk

    sharded, zero3 = args.child != "single", args.child == "zero3"
    if zero3:
        # bf16 partitions as on a GPU (zero.Init follows `bf16.enabled`): TrainingArguments refuse bf16 without a
        # GPU unless `use_cpu`, which turns DeepSpeed into DDP, so the device check is passed (docs/distributed.md)
        import transformers.training_args as training_args

        training_args.is_torch_bf16_gpu_available = lambda: True
    config = harness.recipe(
        None, model_name_or_path=str(args.model), model_dtype="bfloat16", output_dir=str(args.run_dir),
        max_steps=args.steps, per_device_train_batch_size=1,
        gradient_accumulation_steps=1 if sharded else 2,  # the same global batch: 2 x 1 x seq
        learning_rate=0.5, lr_scheduler_type="constant", warmup_steps=0, routing_log_every=1, logging_steps=1,
        save_strategy="steps", save_steps=args.steps, seed=0, data_seed=0,
        use_cpu=args.child == "single",  # fsdp2: ACCELERATE_USE_CPU=1; zero3: none (see its yaml)
        bf16=zero3,
    )  # fmt: skip
    data = load_from_disk(str(args.data))
    clock = harness.step_clock()
    anon_peak = PeakRss(lambda: rss_parts().get("anon", 0)).start()  # private memory: tensors, heap (no file pages)
    load_peak = PeakRss().start()
    trainer = RouterTrainer(args=config, train_dataset=data, source_names=["random"], callbacks=[clock])
    peak_load = load_peak.stop()
    release_free_memory()
    rank = trainer.accelerator.process_index
    result = {  # written now too: a configuration stopped while training still reports its start-up
        "config": args.child,
        "world": trainer.accelerator.num_processes,
        "rank": rank,
        "rss_after_imports": after_imports,
        "rss_parts_after_imports": parts_after_imports,
        "peak_rss_load": peak_load,
        "rss_after_load": rss(),
        "rss_parts_after_load": rss_parts(),
        "startup_seconds": dict(trainer.startup_seconds),
    }
    Path(f"{args.json}.loaded{rank}.json").write_text(json.dumps(result, indent=2) + "\n")
    train_peak = PeakRss().start()
    done = threading.Event()

    def progress() -> None:  # the training peak so far, each second: a rank stopped for memory still reports it
        while not done.wait(1.0):
            so_far = {"peak_rss_train": train_peak.peak, "peak_rss_anon": anon_peak.peak, "steps": len(clock.times)}
            Path(f"{args.json}.training{rank}.json").write_text(json.dumps(so_far) + "\n")

    threading.Thread(target=progress, daemon=True).start()
    train_call = time.perf_counter()
    trainer.train()
    done.set()
    local = full = 0  # parameter bytes this rank holds / the whole model's, after wrapping
    for p in trainer.model.parameters():
        if hasattr(p, "ds_tensor"):
            local += p.ds_tensor.numel() * p.ds_tensor.element_size()
            full += p.ds_numel * p.ds_tensor.element_size()
            continue
        local += (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
        full += p.numel() * p.element_size()
    tokens_per_step = 2 * args.seq  # global
    result.update(
        distributed_type=str(trainer.accelerator.distributed_type),
        threads=torch.get_num_threads(),
        rss_parts_end=rss_parts(),
        peak_rss_train=train_peak.stop(),
        peak_rss_process=vm_hwm(),
        peak_rss_anon=anon_peak.stop(),
        param_bytes_held=local,
        param_bytes_full=full,
        startup_seconds={**trainer.startup_seconds, "prepare": clock.begin - train_call},
        step_seconds=[b - a for a, b in zip([clock.begin] + clock.times, clock.times)],
        tokens_per_s=clock.tokens_per_s(tokens_per_step),  # the first step (warm-up) is not timed
        tokens_per_s_incl_first=clock.tokens_per_s(tokens_per_step, warmup=0),
        steps=trainer.state.global_step,
    )
    Path(f"{args.json}.rank{rank}.json").write_text(json.dumps(result, indent=2) + "\n")
    trainer.accelerator.end_training()  # process group down before exit: gloo aborts at teardown otherwise


def export_worker(args) -> dict:
    """`router-tune export RUN --out DIR --force` (verification on) in this fresh process."""
    import torch  # noqa: F401  (imported before the baseline RSS, as bench_export does: the CLI imports lazily)
    import transformers  # noqa: F401

    from router_tune.cli import main as cli

    release_free_memory()
    after_imports = rss()
    start = time.perf_counter()
    code = cli(["export", str(args.run_dir), "--out", str(args.export_dir), "--force"])
    seconds = time.perf_counter() - start
    return {"exit_code": code, "seconds": seconds, "rss_after_imports": after_imports, "peak_rss_process": vm_hwm()}


def activation_worker(args) -> dict:
    """One micro-batch of 1 x seq, two steps (the first warms up), checkpointing as asked: RssAnon at each decoder
    layer's input and output in the last step's forward, and its peak while training (the markdown explains)."""
    import torch
    from datasets import load_from_disk
    from transformers import TrainerCallback

    from router_tune.training.trainer import RouterTrainer

    torch.set_num_threads(2)
    config = harness.recipe(
        None, model_name_or_path=str(args.model), model_dtype="bfloat16", output_dir=str(args.run_dir),
        max_steps=2, per_device_train_batch_size=1, gradient_accumulation_steps=1, learning_rate=0.5,
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_steps=1000, seed=0, use_cpu=True,
        bf16=True, activation_checkpointing=bool(args.checkpointing),
    )  # fmt: skip
    marks: list[int] = []

    def mark(*_) -> None:
        release_free_memory()
        marks.append(rss_parts()["anon"])

    class StepStart(TrainerCallback):
        def on_step_begin(self, *a, **k):
            marks.clear()  # the forward's marks come first; a checkpointed layer's recompute adds more later

    trainer = RouterTrainer(
        args=config, train_dataset=load_from_disk(str(args.data)), source_names=["random"], callbacks=[StepStart()]
    )
    layers = trainer.model.get_decoder().layers
    layers[0].register_forward_pre_hook(mark)
    for layer in layers:
        layer.register_forward_hook(mark)
    release_free_memory()
    after_load = rss_parts()["anon"]
    peak = PeakRss(lambda: rss_parts().get("anon", 0)).start()
    trainer.train()
    forward = marks[: len(layers) + 1]
    return {
        "seq": args.seq,
        "checkpointing": bool(args.checkpointing),
        "layers": len(layers),
        "anon_after_load": after_load,
        "peak_anon_train": peak.stop(),
        "kept_per_layer": [b - a for a, b in zip(forward, forward[1:])],
        "steps": trainer.state.global_step,
    }


def peak_worker(args) -> dict:
    import torch

    torch.set_num_threads(2)
    return {"threads": 2, "size": 2048, "flops": {d: harness.matmul_peak_flops(d) for d in ("float32", "bfloat16")}}


# --child NAME: one of these parts, or a configuration's rank (`worker`)
PARTS = {"export": export_worker, "peak": peak_worker, "activations": activation_worker}


# ---- the parent: one configuration at a time ----------------------------------------------


def watch(cmd: list[str], env: dict, log: Path, timeout: float, min_available: float = 0) -> dict:
    """`cmd` in fresh processes, output to `log`; samples every process it starts (each rank) for its
    peak RSS, so a configuration stopped for memory still says how far each rank got. Stops it when the
    machine's available memory falls under `min_available` bytes (the machine is shared: the OOM killer
    must not get there first)."""
    import signal

    import psutil

    # the previous configuration's memory must be back before this one starts (and is judged by the guard)
    wait_until = time.perf_counter() + 120
    while psutil.virtual_memory().available < 2 * min_available and time.perf_counter() < wait_until:
        time.sleep(1)
    start, peaks, stopped = time.perf_counter(), {}, None
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        parent = psutil.Process(proc.pid)
        while proc.poll() is None:
            available = psutil.virtual_memory().available
            if available < min_available or time.perf_counter() - start > timeout:
                stopped = f"available memory {available / GB:.2f} GB" if available < min_available else "timeout"
                # torch's launcher starts each rank in a session of its own: kill them one by one
                group = parent.children(recursive=True)
                os.killpg(proc.pid, signal.SIGKILL)
                for child in group:
                    with contextlib.suppress(psutil.Error):
                        child.kill()
                psutil.wait_procs(group, timeout=120)  # every rank gone, its memory returned
                break
            for child in [parent, *parent.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    peaks[child.pid] = max(peaks.get(child.pid, 0), child.memory_info().rss)
            time.sleep(0.1)
        code = proc.wait()
    return {
        "wall_s": time.perf_counter() - start,
        "exit_code": code,
        "stopped": stopped,
        "sampled_peak_rss_by_pid": {str(k): v for k, v in peaks.items()},
    }


def measure_config(name: str, args) -> dict:
    work = args.work
    run_dir, stem = work / f"run-{name}", work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    for old in work.glob(f"{name}.json.*.json"):
        old.unlink()
    me = harness.flags(model=args.model, data=work / "blocks", steps=args.steps, seq=args.seq, run_dir=run_dir)
    me += ["--json", f"{stem}.json", "--child", name]
    if name == "single":
        cmd, env = [*harness.module_cmd("bench_scale"), *me], harness.child_env(2)
    else:
        yaml = "cpu-fsdp2.yaml" if name == "fsdp2" else "cpu-deepspeed-zero3.yaml"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"recipes/accelerate/{yaml}"]
        cmd += ["--mixed_precision", "bf16"] if name == "zero3" else []  # bf16 partitions, as on a GPU (see worker)
        cmd += ["--main_process_port", str(harness.free_port()), "-m", "scripts.bench_scale", *me]
        env = harness.child_env(1, **({"ACCELERATE_USE_CPU": "1"} if name == "fsdp2" else {"DS_ACCELERATOR": "cpu"}))
    result = watch(cmd, env, work / f"{name}.log", args.timeout, args.min_available_gb * GB)
    written = lambda kind: [json.loads(p.read_text()) for p in sorted(work.glob(f"{name}.json.{kind}*.json"))]
    ranks, files = written("rank"), harness.dir_files(run_dir / f"checkpoint-{args.steps}")
    result.update(ranks=ranks, checkpoint_bytes=sum(files.values()), checkpoint_files=files)
    if result["exit_code"] != 0 or not ranks:
        tail = (work / f"{name}.log").read_text(errors="replace").splitlines()[-40:]
        loaded = written("loaded")
        for r in loaded:  # how far training got before the stop
            progress = work / f"{name}.json.training{r['rank']}.json"
            r["training_so_far"] = json.loads(progress.read_text()) if progress.is_file() else None
        result.update(failed=True, log_tail=tail, loaded_ranks=loaded)
        peaks = sorted(result["sampled_peak_rss_by_pid"].values())[-2:]
        print(f"{name}: FAILED (exit {result['exit_code']}, {result['stopped']}); sampled peaks {peaks}")
        return result
    peaks = ", ".join(f"{r['peak_rss_process'] / GB:.2f}" for r in ranks)
    print(f"{name}: {result['wall_s']:.0f} s, peak RSS per rank (GB) {peaks}")
    return result


def measure_part(name: str, cmd: list[str], args, min_available: float = 0) -> dict:
    """One part (baseline, export, peak, an activations run) in a fresh watched process: the JSON line it
    prints last."""
    log = args.work / f"{name}.log"
    result = watch(cmd, harness.child_env(2), log, args.timeout, min_available)
    if result["exit_code"] != 0:
        raise SystemExit(f"exit {result['exit_code']}; see {log}")
    return json.loads(log.read_text().strip().splitlines()[-1])


def measure_baseline(args) -> dict:
    out = args.work / "run-baseline"
    shutil.rmtree(out, ignore_errors=True)
    cmd = bench_train.cmd(
        impl="baseline", model_dir=args.model, data=args.work / "blocks", out_dir=out, batch=1, grad_accum=2,
        steps=args.steps, warmup=1, threads=2, dtype="bfloat16", logging_steps=1,
    )  # fmt: skip
    result = measure_part("baseline", cmd, args)
    shutil.rmtree(out, ignore_errors=True)  # its checkpoint holds the whole model
    print(f"baseline: {result['tokens_per_s']:.1f} tokens/s")
    return result


def measure_export(args) -> dict:
    export_dir, checkpoint = args.work / "export", args.work / "run-single" / f"checkpoint-{args.steps}"
    cmd = harness.module_cmd("bench_scale", "--child", "export", "--run-dir", checkpoint, "--export-dir", export_dir)
    result = measure_part("export", cmd, args)
    result["export_bytes"] = harness.checkpoint_bytes(export_dir)
    shutil.rmtree(export_dir, ignore_errors=True)
    print(f"export: {result['seconds']:.1f} s, {result['peak_rss_process'] / GB:.2f} GB")
    return result


def measure_activations(args) -> dict:
    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    prov, runs = harness.provenance(), []  # the commit measured, before anything is written
    for seq in args.activation_seqs:
        blocks = harness.make_random_blocks(args.work / f"blocks-{seq}", vocab=vocab, seq=seq, n_blocks=2)
        for checkpointing in (0, 1):
            name = f"activations-{seq}-{checkpointing}"
            done = args.work / f"{name}.json"
            if not done.exists():  # else measured by an earlier call on this work directory: resumed
                cmd = harness.module_cmd("bench_scale", "--child", "activations")
                cmd += harness.flags(model=args.model, data=blocks, seq=seq, checkpointing=checkpointing)
                cmd += harness.flags(run_dir=args.work / "run-activations")
                result = measure_part(name, cmd, args, args.min_available_gb * GB)
                done.write_text(json.dumps(result, indent=2) + "\n")
            runs.append(json.loads(done.read_text()))
    return {"provenance": prov, "runs": runs}


# --configs beside CONFIGS: one fresh process each (`--update` re-measures activations or peak alone)
MEASURES = {
    "baseline": measure_baseline,
    "export": measure_export,
    "peak": lambda args: measure_part("peak", harness.module_cmd("bench_scale", "--child", "peak"), args),
    "activations": measure_activations,
}


# ---- figures ------------------------------------------------------------------------------


def analyse(data: dict) -> dict:
    a = data["model"]
    cfg = {n: c for n, c in data["configs"].items() if not c.get("failed")}
    model_bytes = a["model_bytes"]
    single = cfg["single"]["ranks"][0]
    activations = single["peak_rss_train"] - single["rss_after_load"]  # one micro-batch of 1 x seq, 2 layers
    # the same for private memory: peak RssAnon minus RssAnon after loading
    activations_anon = max(0, single["peak_rss_anon"] - single["rss_parts_after_load"]["anon"])
    out = {
        "activations_bytes": activations,
        "activations_anon_bytes": activations_anon,
        "single_peak": single["peak_rss_process"],
        "failed": {
            n: {
                "stopped": c.get("stopped"),
                "exit_code": c["exit_code"],
                # the two largest processes sampled: the ranks (the launcher holds a few hundred MB)
                "sampled_peak_rss_ranks": sorted(c["sampled_peak_rss_by_pid"].values())[-2:],
                "loaded_ranks": c.get("loaded_ranks", []),
            }
            for n, c in data["configs"].items()
            if c.get("failed")
        },
    }

    def against_prediction(name: str, r: dict, measured: float, anon: float) -> dict:
        """One rank's peaks (RSS, private) against the prediction and the 1-process run."""
        shard = model_bytes / 2 + gathered_layers(name, a["layers"]) * a["layer_bytes"]
        predicted = r["rss_after_imports"] + shard + activations
        predicted_anon = r["rss_parts_after_imports"]["anon"] + shard + activations_anon
        return {
            "rank": r["rank"],
            "predicted": predicted,
            "measured": measured,
            "ratio": measured / predicted,
            "predicted_anon": predicted_anon,
            "measured_anon": anon,
            "ratio_anon": anon / predicted_anon,
            "vs_single": measured / single["peak_rss_process"],
            "vs_single_anon": anon / single["peak_rss_anon"],
        }

    within = TARGETS["rss_vs_predicted"]
    for name in [n for n in SHARDED if n in cfg]:
        rows = [against_prediction(name, r, r["peak_rss_process"], r["peak_rss_anon"]) for r in cfg[name]["ranks"]]
        out[name] = {
            "per_rank": rows,
            "pass_within_15pct": all(abs(x["ratio"] - 1) <= within for x in rows),
            "pass_within_15pct_anon": all(abs(x["ratio_anon"] - 1) <= within for x in rows),
            "below_single": all(x["vs_single"] < 1 for x in rows),
            "below_single_anon": all(x["vs_single_anon"] < 1 for x in rows),
        }
    for name, x in out["failed"].items():  # stopped: how far each rank got, against the same prediction
        x["per_rank_so_far"] = []  # lower bounds: the run was stopped before its peak
        for r in x["loaded_ranks"] if name in SHARDED else []:
            so_far = r.get("training_so_far") or {}
            measured = max(r["peak_rss_load"], so_far.get("peak_rss_train", 0))
            anon = so_far.get("peak_rss_anon", r["rss_parts_after_load"]["anon"])
            row = against_prediction(name, r, measured, anon)
            row.update(steps_done=so_far.get("steps"), peak_rss_train_so_far=so_far.get("peak_rss_train"))
            x["per_rank_so_far"].append(row)
    out["startup"] = startup = {}
    for name, c in data["configs"].items():
        ranks = c["ranks"] or c.get("loaded_ranks")  # stopped while training: the phases before it
        if not ranks:
            continue
        s = max(ranks, key=lambda r: sum(r["startup_seconds"].values()))["startup_seconds"]  # slowest rank
        share = (s.get("fingerprints", 0) + s.get("rescale probe", 0)) / s["load"]
        startup[name] = {**s, "fingerprint_probe_share_of_load": share, "pass": share <= TARGETS["startup_share"]}
    out["checkpoints"] = {
        n: {"bytes": c["checkpoint_bytes"], "share": c["checkpoint_bytes"] / model_bytes} for n, c in cfg.items()
    }
    out["checkpoints_pass"] = all(v["share"] <= TARGETS["checkpoint_share"] for v in out["checkpoints"].values())
    if e := data.get("export"):
        out["export"] = {
            "seconds": e["seconds"],
            "peak_rss": e["peak_rss_process"],
            "ratio": e["peak_rss_process"] / model_bytes,
            "ratio_above_imports": (e["peak_rss_process"] - e["rss_after_imports"]) / model_bytes,
            "pass": e["peak_rss_process"] / model_bytes <= TARGETS["export_rss"],
        }
    n = bench_train.active_params(argparse.Namespace(**data["model_config"]))
    speed = {"active_params": n, "flops_per_token": 4 * n["total_active"]}
    rt, base = single.get("tokens_per_s"), data.get("baseline", {}).get("tokens_per_s")
    speed["router_tune_tokens_per_s"], speed["baseline_tokens_per_s"] = rt, base
    speed["ratio"] = rt / base if rt and base else None
    peak = data.get("peak", {}).get("flops", {})
    if rt:
        speed["achieved_flops"] = achieved = rt * speed["flops_per_token"]
        speed["share_of_peak"] = {d: achieved / f for d, f in peak.items()}
        if base:
            speed["baseline_share_of_peak"] = {d: base * speed["flops_per_token"] / f for d, f in peak.items()}
    speed.update({f"{c}_tokens_per_s": cfg[c]["ranks"][0]["tokens_per_s"] for c in SHARDED if c in cfg})
    out["speed"] = speed
    if data.get("activations"):
        out["activations"] = activation_figures(data["activations"])
    out["projection"] = project(data, out)
    return out


def activation_figures(act: dict) -> dict:
    """Per checkpointing setting: what the forward keeps per decoder layer and the rest of a step's peak, each a
    line in the tokens through the two longest sequences measured, read at the recipe's 1 x 2048 (the markdown)."""
    out = {}
    for ckpt in (False, True):
        rows = []
        for r in sorted((r for r in act["runs"] if r["checkpointing"] == ckpt), key=lambda r: r["seq"]):
            kept = sum(r["kept_per_layer"]) / r["layers"]
            peak = r["peak_anon_train"] - r["anon_after_load"]
            rows.append({"seq": r["seq"], "kept_per_layer": kept, "rest": peak - r["layers"] * kept, "peak": peak})
        first, last = rows[-2] if len(rows) > 1 else None, rows[-1]

        def at_recipe(key: str, first=first, last=last) -> float:  # through the two points (0 with one)
            if first is None:
                return last[key] * RECIPE_TOKENS / last["seq"]
            slope = (last[key] - first[key]) / (last["seq"] - first["seq"])
            return last[key] + slope * (RECIPE_TOKENS - last["seq"])

        out["on" if ckpt else "off"] = {
            "runs": rows,
            "kept_per_layer_per_token": at_recipe("kept_per_layer") / RECIPE_TOKENS,
            "rest_per_token": at_recipe("rest") / RECIPE_TOKENS,
            "at_recipe": REAL_LAYERS * at_recipe("kept_per_layer") + at_recipe("rest"),
        }
    return out


def project(data: dict, figures: dict) -> dict:
    """The 26-layer model from per-layer figures measured here (see the markdown for the formula)."""
    a = data["model"]
    layers = a["layers"]
    real = a["outside_layers_bytes"] + REAL_LAYERS * a["layer_bytes"]
    act_per_layer = figures["activations_bytes"] / layers
    # the measured per-token figures at the recipe's micro-batch when there are any, else the 1 x seq run's
    measured = figures.get("activations")
    activations = {k: measured[k]["at_recipe"] if measured else REAL_LAYERS * act_per_layer for k in ("on", "off")}
    byte_scale = real / a["model_bytes"]
    rows = {}
    for name, world, gpu_gb in (("single", 1, 141), ("fsdp2", 8, 80), ("zero3", 8, 80)):
        gathered = gathered_layers(name, REAL_LAYERS) * a["layer_bytes"] if world > 1 else 0
        fixed = OVERHEADS["CUDA context"] + (OVERHEADS["NCCL buffers"] if world > 1 else 0)
        tensors = {k: real / world + gathered + v for k, v in activations.items()}
        memory = tensors["on"]  # the recipes' setting: activation checkpointing on
        per_gpu = {s: tensors[k] * (1 + FRAGMENTATION) + fixed for k, s in (("on", ""), ("off", "_no_checkpointing"))}
        row = {
            "gpus": world,
            "gpu_gb": gpu_gb,
            "weights_per_gpu": real / world,
            "gathered_unit": gathered,
            "activations": activations["on"],
            "activations_no_checkpointing": activations["off"],
            "fixed_overheads": fixed,
            "tensors_per_gpu": memory,
            **{f"memory_per_gpu{s}": m for s, m in per_gpu.items()},
            **{f"fits{s}": m <= gpu_gb * GB for s, m in per_gpu.items()},
        }
        if st := figures["startup"].get(name):
            phases = {k: st.get(k, 0) * byte_scale for k in ("load", "fingerprints")}
            phases["rescale probe"] = st.get("rescale probe", 0) * REAL_LAYERS / layers
            if "prepare" in st:  # absent when the run stopped before training
                phases["prepare"] = st["prepare"] * byte_scale
            row.update(startup_from=name, startup_seconds=phases, startup_total=sum(phases.values()))
        # the worst anon ratio of a finished 2-rank run of this backend, else a stopped one's (a lower bound)
        done = figures.get(name, {}).get("per_rank")
        so_far = figures["failed"].get(name, {}).get("per_rank_so_far")
        if world > 1 and (done or so_far):
            row["ratio_from"], row["ratio_is_lower_bound"] = name, not done
            ratio = max(x["ratio_anon"] for x in done or so_far)  # on the tensors; the overheads are assumed
            row["memory_per_gpu_times_measured_ratio"] = memory * ratio * (1 + FRAGMENTATION) + fixed
        rows[name] = row
    return {"real_model_bytes": real, "activations_per_layer": act_per_layer, "byte_scale": byte_scale, "rows": rows}


def gb(b) -> str:
    return f"{b / GB:.2f}"


def memory_row(label: str, r: dict, peaks: tuple, pr: dict | None, ge: str = "") -> str:
    """A row of the memory table: rank `r`'s RSS up to loading, its `peaks` (training, RSS, anon), and `pr`, its
    figures against the prediction and the 1-process run (None for that run); `ge` marks a stopped run's bounds."""
    train, measured, anon = peaks
    parts = r["rss_parts_after_load"]
    after_load = f"{gb(r['rss_after_load'])} ({gb(parts.get('anon', 0))} + {gb(parts.get('file', 0))})"
    cells = [label, r["rank"], gb(r["rss_after_imports"]), gb(r["peak_rss_load"]), after_load]
    cells += [f"{ge}{gb(train)}" if train else "-", f"{ge}{gb(measured)}"]
    ratio = lambda key: f"{ge}{pr[key]:.2f}"
    cells += [gb(pr["predicted"]), ratio("ratio")] if pr else ["-", "-"]
    cells.append(f"{ge}{gb(anon)}")
    cells += [gb(pr["predicted_anon"]), ratio("ratio_anon")] if pr else ["-", "-"]
    cells += [ratio("vs_single"), ratio("vs_single_anon")] if pr else ["1.00", "1.00"]
    return harness.md_row(cells)


def render(data: dict) -> str:
    a, f = data["model"], data["figures"]
    cfg = {n: c for n, c in data["configs"].items() if not c.get("failed")}
    ok = lambda b: "PASS" if b else "MISS"
    again = (
        f" Figures and predictions recomputed from these measurements with `--reanalyse` ({describe(r)})."
        if (r := data.get("reanalysed"))
        else ""
    )
    lines = [
        "# Seed-model scale (issue 12): the Raiden-shaped scale model on this machine\n",
        f"{data['machine']}. {describe(data['provenance'])}. Regenerate: `make bench-scale` (scripts/bench_scale.py, "
        f"~{data['wall_s'] / 60:.0f} min here).{again}\n",
        f"Model: scripts/make_scale_model.py, Raiden's widths (hidden {a['config']['hidden_size']}, intermediate "
        f"{a['config']['intermediate_size']}, {a['config']['num_local_experts']} experts, top-2, vocab "
        f"{a['config']['vocab_size']}), {a['layers']} layers, bf16, mergekit legacy layout: {gb(a['model_bytes'])} GB "
        f"(one decoder layer {gb(a['layer_bytes'])} GB, of which the MoE block {gb(a['moe_block_bytes'])} GB; "
        f"embeddings, head and final norm {gb(a['outside_layers_bytes'])} GB). GB = 1e9 bytes.\n",
        f"Batch: every configuration takes {data['steps']} optimizer steps of the same global batch, 2 sequences "
        f"of {data['seq']} random tokens: 1 process with micro-batch 1 x {data['seq']} and gradient accumulation "
        f"2 (2 threads); 2 gloo ranks with micro-batch 1 x {data['seq']} each (1 thread each). Short, so that "
        "three ~6 GB configurations finish in minutes on 2 cores. One configuration at a time, fresh processes.\n",
        "## Memory per rank (GB)\n",
        "Predicted per rank = RSS after imports (that rank's interpreter, torch, transformers, deepspeed) + model "
        "bytes / 2 + k x one decoder layer (the largest unit gathered at once) + activations, with k = 2 for "
        "ZeRO-3 (a gathered unit costs twice its bytes: the flat all-gather output and the per-parameter copies "
        "made from it, 2.00x measured for both backends) and k = 3 for FSDP2 with more than one layer (in "
        "backward it also prefetches the next layer while the current one is unsharded: 1 + 2), where activations "
        f"= the 1-process run's peak while training minus its RSS after loading ({gb(f['activations_bytes'])} GB "
        f"for one micro-batch of 1 x {data['seq']}; anon: {gb(f['activations_anon_bytes'])} GB). FSDP2 (transformers' "
        "load-time plan) shards each decoder layer as one unit and gathers it whole; ZeRO-3 gathers the MoE block "
        "whole (a leaf module) and the attention projections module by module, so one decoder layer bounds both. "
        "Measured: RSS = the kernel's peak for the process (VmHWM, loading included); anon = the peak of its private "
        "memory (RssAnon, sampled every 20 ms: tensors and heap, without the pages of memory-mapped files, which are "
        "page cache shared by every process that maps the file). The 'anon' prediction starts from RssAnon after "
        "imports instead of RSS.\n",
        "| configuration | rank | after imports | peak loading | after loading (anon + file) | peak training | "
        "peak RSS | predicted | ratio | peak anon | predicted anon | ratio anon | RSS vs 1 process | "
        "anon vs 1 process |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in cfg.items():
        for r in c["ranks"]:
            pr = next((x for x in f.get(name, {}).get("per_rank", []) if x["rank"] == r["rank"]), None)
            lines.append(memory_row(name, r, (r["peak_rss_train"], r["peak_rss_process"], r["peak_rss_anon"]), pr))
    for name, x in f["failed"].items():
        why = x["stopped"] or f"exit {x['exit_code']}"
        loaded = {r["rank"]: r for r in x["loaded_ranks"]}
        for pr in x.get("per_rank_so_far", []):
            label = f"{name} (stopped: {why}, {pr['steps_done'] or 0} steps done; peaks so far)"
            peaks = (pr["peak_rss_train_so_far"], pr["measured"], pr["measured_anon"])
            lines.append(memory_row(label, loaded[pr["rank"]], peaks, pr, ge=">= "))
        if not x.get("per_rank_so_far"):
            peaks = " and ".join(gb(b) for b in x["sampled_peak_rss_ranks"])
            lines.append(f"| {name} | - | stopped ({why}) | sampled peaks: {peaks} |" + " |" * 10)
    lines.append("")
    for name in [n for n in SHARDED if n in f]:
        x = f[name]
        lines.append(
            f"- {name}: within 15% of the prediction on every rank: RSS {ok(x['pass_within_15pct'])}, anon "
            f"{ok(x['pass_within_15pct_anon'])}; below the 1-process peak: RSS {ok(x['below_single'])}, anon "
            f"{ok(x['below_single_anon'])}."
        )
    lines += [
        "",
        "## Start-up per phase (s, slowest rank)\n",
        "load: `from_pretrained` (FSDP2: sharded at load); fingerprints: expert hashes (main process, "
        "broadcast); rescale probe: skipped when no router's stored weights can saturate; prepare: `train()` "
        "until its first step (accelerator.prepare, optimizer; ZeRO-3: deepspeed.initialize partitions here). "
        "Target: fingerprints + probe <= 10% of load.\n",
        "| configuration | load | fingerprints | rescale probe | prepare | (fingerprints + probe) / load |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in f["startup"].items():
        prepare = f"{s['prepare']:.1f}" if "prepare" in s else "(stopped in training)"
        lines.append(
            f"| {name} | {s['load']:.1f} | {s.get('fingerprints', 0):.1f} | {s.get('rescale probe', 0):.2f} | "
            f"{prepare} | {100 * s['fingerprint_probe_share_of_load']:.1f}% {ok(s['pass'])} |"
        )
    lines += [
        "",
        "## Checkpoints (router-only) and export\n",
        "| configuration | checkpoint bytes | share of the model's bytes (target <= 1%) | files |",
        "|---|---|---|---|",
    ]
    for name, c in cfg.items():
        ck = f["checkpoints"][name]
        files = ", ".join(sorted(c["checkpoint_files"]))
        lines.append(f"| {name} | {ck['bytes']:,} | {100 * ck['share']:.4f}% {ok(ck['share'] <= 0.01)} | {files} |")
    if e := f.get("export"):
        lines += [
            "",
            f"`router-tune export RUN/checkpoint-{data['steps']} --out DIR` (full format, verification on), in a "
            f"fresh process: {e['seconds']:.1f} s, peak RSS {gb(e['peak_rss'])} GB = {e['ratio']:.3f}x the model's "
            f"bytes (target <= 0.25x: {ok(e['pass'])}); {e['ratio_above_imports']:.3f}x above the "
            f"{gb(data['export']['rss_after_imports'])} GB the process holds after importing torch and transformers.",
        ]
    s = f["speed"]
    lines += [
        "",
        "## Training speed (1 process, 2 threads, bf16 weights)\n",
        f"N = {s['active_params']['total_active']:,} active parameters per token (bench_train.active_params: "
        f"attention, router, top-2 experts' MLPs, LM head), 4N = {s['flops_per_token'] / 1e9:.2f} GFLOP per token. "
        "Tokens/s over the steps after the first. Matmul peak: the best 2048^3 product at 2 threads.\n",
        "| | tokens/s | achieved GFLOP/s at 4N | share of fp32 matmul peak | share of bf16 matmul peak |",
        "|---|---|---|---|---|",
    ]
    peak = data.get("peak", {}).get("flops", {})
    for label, tps in (("router_tune (RouterTrainer)", s["router_tune_tokens_per_s"]),
                       ("transformers Trainer (baseline)", s["baseline_tokens_per_s"])):  # fmt: skip
        if tps:
            fl = tps * s["flops_per_token"]
            shares = " | ".join(f"{100 * fl / peak[d]:.1f}%" if d in peak else "-" for d in ("float32", "bfloat16"))
            lines.append(f"| {label} | {tps:.1f} | {fl / 1e9:.1f} | {shares} |")
    if s.get("ratio"):
        lines.append(f"\nrouter_tune / baseline: {s['ratio']:.2f}x.")
    if peak:
        lines.append(
            f"Matmul peak here: fp32 {peak['float32'] / 1e9:.1f} GFLOP/s, bf16 {peak['bfloat16'] / 1e9:.1f} GFLOP/s."
        )
    for name in [n for n in SHARDED if s.get(f"{n}_tokens_per_s")]:
        lines.append(f"{name} (2 ranks x 1 thread): {s[f'{name}_tokens_per_s']:.1f} tokens/s.")
    pj, acts = f["projection"], f.get("activations")
    lines += ["", f"## Projection to the real model ({REAL_LAYERS} layers, {gb(pj['real_model_bytes'])} GB bf16)\n"]
    if acts:
        act = data["activations"]
        lines += [
            f"Activations, measured ({describe(act['provenance'])}): one process (2 threads), RouterTrainer as "
            "recipes/raiden-16x3b.yaml trains (bf16 weights and autocast, fp32 routers, chunked CE), one micro-batch "
            f"of 1 x T random tokens on this {a['layers']}-layer model, two steps, activation checkpointing off and "
            "on. kept = the rise of private memory (RssAnon, freed heap returned first) across a decoder layer in "
            "the last step's forward, mean over the layers: what the forward keeps per layer until backward; "
            "rest = the step's peak of RssAnon above RssAnon after loading, minus the layers' kept: the head and "
            "chunked CE, one layer's backward and, with checkpointing, one layer's recompute. Each is taken as "
            f"a line in T through the two longest T and read at the recipes' micro-batch, 1 x {RECIPE_TOKENS} "
            f"(block_size, per_device_train_batch_size 1); activations at {REAL_LAYERS} layers = {REAL_LAYERS} x "
            "kept + rest. This assumes attention memory linear in T (SDPA's fused kernels on CPU and GPU; "
            "eager attention would add T^2 scores per head) and a GPU keeping the same tensors as the CPU.\n",
            "| checkpointing | T | kept per layer, MB | rest, MB | step peak, MB | per token at 2048: kept per "
            f"layer, KB | rest, KB | activations at {REAL_LAYERS} layers x 1 x {RECIPE_TOKENS}, GB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for key, x in acts.items():
            at_recipe = f"{x['kept_per_layer_per_token'] / 1e3:.1f} | {x['rest_per_token'] / 1e3:.1f} | "
            for r in x["runs"]:  # the figures at the recipe's micro-batch on the last (longest) run's row
                tail = at_recipe + gb(x["at_recipe"]) if r is x["runs"][-1] else " | | "
                peaks = f"{r['kept_per_layer'] / 1e6:.1f} | {r['rest'] / 1e6:.1f} | {r['peak'] / 1e6:.1f}"
                lines.append(f"| {key} | {r['seq']} | {peaks} | {tail} |")
        lines.append("")
    if "fixed_overheads" not in pj["rows"]["single"]:  # an earlier analysis's figures: what it lacks is left "-"
        lines += ["These figures predate the fixed overheads and checkpointing off (`--reanalyse` adds them).", ""]
    activations = (
        f"at 1 x {RECIPE_TOKENS} as above (each GPU trains its own micro-batch)"
        if acts
        else f"= {REAL_LAYERS} x {gb(pj['activations_per_layer'])} GB per layer measured at 1 x {data['seq']}"
    )
    assumed = ", ".join(f"{k} {gb(v)} GB" for k, v in OVERHEADS.items())
    lines += [
        f"Memory per GPU, computed: weights = the bytes outside the layers + {REAL_LAYERS} x one layer's bytes "
        "(the safetensors headers here), divided by the GPUs; + k x one decoder layer gathered (k = 3 FSDP2, "
        f"2 ZeRO-3, as in the 2-rank prediction; {gb(a['layer_bytes'])} GB each; none on one GPU); + activations "
        f"{activations}; then x {1 + FRAGMENTATION:.2f} for the caching allocator's fragmentation and + the fixed "
        f"overheads. Stated assumptions, not measured (no GPU here): {assumed} (several GPUs only), fragmentation "
        f"{FRAGMENTATION:.0%} of the tensors. 'x measured ratio' multiplies the tensors by the worst anon measured / "
        "predicted ratio at 2 ranks first. Start-up: load, fingerprints and prepare scaled by the bytes "
        f"({pj['byte_scale']:.2f}x), the probe by the layers, from the configuration measured here (single for 1 "
        "GPU, the 2-rank runs for 8 GPUs: no credit taken for more ranks reading in parallel, and this machine's disk "
        "and page cache, not a GPU host's).\n",
        "| setting | weights per GPU | gathered | activations, checkpointing on / off | fixed overheads | memory per "
        "GPU, checkpointing on (recipes) | x measured ratio | fits | checkpointing off | fits | start-up s (load + "
        "fingerprints + probe + prepare) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    labels = {"single": "1 x 141 GB, bf16, 1 process", "fsdp2": "8 x 80 GB, FSDP2", "zero3": "8 x 80 GB, ZeRO-3"}
    yes = lambda b: "yes" if b else "no"

    def cell(r: dict, key: str, show=gb) -> str:  # "-" where the figures of an earlier analysis lack `key`
        return show(r[key]) if key in r else "-"

    for name, r in pj["rows"].items():
        st = r.get("startup_seconds")
        stext = f"{r['startup_total']:.0f} ({' + '.join(f'{v:.0f}' for v in st.values())})" if st else "not measured"
        corrected = r.get("memory_per_gpu_times_measured_ratio")
        corrected = (">= " if r.get("ratio_is_lower_bound") else "") + gb(corrected) if corrected else "-"
        lines.append(
            f"| {labels[name]} | {cell(r, 'weights_per_gpu')} | {cell(r, 'gathered_unit')} | "
            f"{cell(r, 'activations')} / {cell(r, 'activations_no_checkpointing')} | {cell(r, 'fixed_overheads')} | "
            f"{cell(r, 'memory_per_gpu')} | {corrected} | {cell(r, 'fits', yes)} | "
            f"{cell(r, 'memory_per_gpu_no_checkpointing')} | {cell(r, 'fits_no_checkpointing', yes)} | {stext} |"
        )
    lines.append("")
    return "\n".join(lines) + "\n"


def add_args(parser) -> None:
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-scale")
    parser.add_argument("--model", type=Path, default=ROOT / "build" / "scale-model")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration")
    parser.add_argument("--configs", nargs="+", default=[*CONFIGS, *MEASURES], choices=[*CONFIGS, *MEASURES])
    parser.add_argument("--activation-seqs", type=int, nargs="+", default=[256, 512], help="activations' tokens")
    parser.add_argument("--update", action="store_true", help="measure --configs only, into OUT/scale.json's others")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    parser.add_argument("--min-available-gb", type=float, default=1.5, help="stop a configuration below this free GB")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the scale model, if --model is made")
    parser.add_argument("--reanalyse", action="store_true", help="figures and markdown again from OUT/scale.json")
    parser.add_argument("--checkpointing", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--export-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)


def run(args) -> dict:
    if args.reanalyse:  # the analysis changed, the measurements stand: both commits are recorded
        data = json.loads((args.out / "scale.json").read_text())
        data["figures"], data["reanalysed"] = analyse(data), harness.provenance()
        return data
    start = time.perf_counter()
    prov = harness.provenance()  # before anything is written
    if args.smoke:  # Raiden's layout at toy widths, one step after the warm-up of every configuration
        args.seq, args.steps, args.model, args.activation_seqs = 16, 2, args.work / "tiny-scale-model", [16, 32]
        shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
        if not args.model.is_dir():
            from scripts.make_scale_model import RAIDEN, write_checkpoint

            write_checkpoint(args.model, {**RAIDEN, **shape, "num_hidden_layers": 2}, shards=2)
    if not args.model.is_dir():
        make = harness.module_cmd("make_scale_model", "--out", args.model, "--layers", args.layers)
        subprocess.run(make, check=True, cwd=ROOT)
    args.work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.work / "blocks", ignore_errors=True)
    config = json.loads((args.model / "config.json").read_text())
    harness.make_random_blocks(args.work / "blocks", vocab=config["vocab_size"], seq=args.seq, n_blocks=4 * args.steps)
    if args.update:  # the other measurements stand; each part measured here records its own commit
        data = json.loads((args.out / "scale.json").read_text())
        for name in args.configs:
            if name not in ("activations", "peak"):
                raise SystemExit(f"--update measures activations or peak, not {name}")
            data[name] = MEASURES[name](args)
        data["figures"], data["reanalysed"] = analyse(data), harness.provenance()
        return data
    data = {
        "provenance": prov,
        "steps": args.steps,
        "seq": args.seq,
        "model_dir": str(args.model),
        "model": model_anatomy(args.model),
        "model_config": {k: v for k, v in config.items() if isinstance(v, int)},
        "configs": {},
    }
    for name in args.configs:
        if name in CONFIGS:
            data["configs"][name] = measure_config(name, args)
        else:
            data[name] = MEASURES[name](args)
    data["figures"] = analyse(data)
    data["wall_s"] = time.perf_counter() - start
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    data["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {ram:.0f} GiB RAM"
    return data


if __name__ == "__main__":
    harness.main("scale", __doc__, run, render, add_args, child=lambda a: PARTS.get(a.child, worker)(a))
