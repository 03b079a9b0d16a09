"""``hpcdist plan``: print per-GPU memory of DP, DDP and ZeRO 0-3 for a model size and the backend to use.

    hpcdist plan --params 7B --gpus-per-node 8 --nodes 4 --gpu-memory 80GB
    hpcdist plan --model convnet --gpus-per-node 2 --gpu-memory 24GiB --precision fp32 --json
"""

from __future__ import annotations

import dataclasses
import json

import click

from hpc import plan as model
from hpc import shown, vocab
from hpc.commands.options import fail

COLUMNS = ("plan", "params", "grads", "optimizer", "per GPU", "host/rank", "comm", "fits")


def report(params: int, nodes: int, gpus_per_node: int, gpu_memory: int | None, precision: str,
           optimizer: str) -> dict:
    """The plan as plain values: what ``--json`` prints and the table is drawn from."""
    rows = model.estimate(params, nodes, gpus_per_node, gpu_memory, precision, optimizer)
    choice = model.recommend(params, nodes, gpus_per_node, gpu_memory, precision, optimizer)
    return {"params": params, "nodes": nodes, "gpus_per_node": gpus_per_node,
            "data_parallel_degree": nodes * gpus_per_node, "gpu_memory_bytes": gpu_memory,
            "precision": precision, "optimizer": optimizer, "model_state_fraction": model.MODEL_STATE_FRACTION,
            "plans": [{**dataclasses.asdict(e), "gpu_bytes": e.gpu_bytes} for e in rows],
            "recommendation": dataclasses.asdict(choice)}


def table(rep: dict) -> str:
    """The report as aligned text: one row per plan, then the headroom rule and the recommendation."""
    hb = model.human_bytes
    lines = [(r["label"], hb(r["params_bytes"]), hb(r["grads_bytes"]), hb(r["optimizer_bytes"]), hb(r["gpu_bytes"]),
              hb(r["cpu_bytes"]) if r["cpu_bytes"] else "-", f"{r['comm_volume']:g}x",
              {True: "yes", False: "no", None: "?"}[r["fits"]] if r["applicable"] else "n/a")
             for r in rep["plans"]]
    rule = ["-" * max(map(len, column)) for column in zip(COLUMNS, *lines)]
    memory = model.human_bytes(rep["gpu_memory_bytes"]) if rep["gpu_memory_bytes"] else "unknown"
    out = [f"{rep['params']:,} parameters, {rep['precision']} {rep['optimizer']}, {rep['nodes']} node(s) x "
           f"{rep['gpus_per_node']} GPU(s) (Nd={rep['data_parallel_degree']}), {memory} per GPU",
           "", *shown.aligned((COLUMNS, rule, *lines), right=range(1, len(COLUMNS)))]
    out += ["", "comm: elements sent and received per step by the busiest GPU, in multiples of the parameter count",
            f"fits: model states <= {rep['model_state_fraction']:.0%} of GPU memory; the rest is for activations, "
            "buckets, gathered ZeRO-3 layers and fragmentation"]
    out += [f"{r['label']}: {r['note']}" for r in rep["plans"] if r["name"] == "dp"]
    out += ["DP is never recommended: it is a quick single-node try; DDP holds the same memory with one process per "
            "GPU and no GPU-0 hot spot"]
    rec = rep["recommendation"]
    stage = "" if rec["zero_stage"] is None else f" ZeRO-{rec['zero_stage']}"
    out += ["", f"recommendation: {rec['backend']}{stage}{' with CPU offload' if rec['offload'] else ''}",
            f"because: {rec['reason']}"]
    return "\n".join(out)


@click.command()
@click.option("--params", "params_text", help="Parameter count: 7B, 1.3B, 350M, 125000.")
@click.option("--model", "model_name", type=click.Choice(sorted(model.MODELS)), help="A built-in model instead.")
@click.option("--nodes", type=int, default=1, show_default=True)
@click.option("--gpus-per-node", type=int, default=1, show_default=True)
@click.option("--gpu-memory", "gpu_memory_text", help="Memory per GPU: 80GB, 80GiB, 24G. Without it, fit is unknown.")
@click.option("--precision", type=click.Choice(vocab.DTYPES), default="bf16", show_default=True)
@click.option("--optimizer", type=click.Choice(model.OPTIMIZERS), default="adam", show_default=True,
              help="adam, or sgd with momentum.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(params_text: str | None, model_name: str | None, nodes: int, gpus_per_node: int,
         gpu_memory_text: str | None, precision: str, optimizer: str, as_json: bool) -> None:
    """Estimate per-GPU memory of DP, DDP and ZeRO 0-3 and recommend a backend."""
    if (params_text is None) == (model_name is None):
        fail("plan", model.PlanError("give exactly one of --params (e.g. 7B) or --model"))
    try:
        params = model.parse_count(params_text) if params_text else model.model_params(model_name)
        gpu_memory = model.parse_bytes(gpu_memory_text) if gpu_memory_text else None
        rep = report(params, nodes, gpus_per_node, gpu_memory, precision, optimizer)
    except model.PlanError as exc:
        fail("plan", exc)
    click.echo(json.dumps(rep, indent=2) if as_json else table(rep))
