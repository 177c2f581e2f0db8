"""Communication model: what each rank sends and receives per optimizer step under each topology the harness
runs, by collective kind, and what that means for throughput on N nodes x G GPUs.

    python benchmarks/scaling.py --model bert-base-uncased --topology zero2 --gpus 64
    python benchmarks/scaling.py --model microsoft/deberta-v3-large --topology fsdp --gpus 512 --step-seconds 0.4
    python benchmarks/scaling.py --table            # BERT-base and DeBERTa-v3-large at 8, 64 and 512 GPUs

Bytes come from the model's parameters (counted on the meta device: nothing is downloaded for the names in
PRESETS; other names and local folders are read with AutoConfig), the precision and the harness's settings for
each topology. Collectives are rings, as NCCL's are: an all-reduce of S bytes sends and receives 2(W-1)/W x S per
rank, a reduce-scatter, all-gather or reduce (W-1)/W x S, a broadcast about S. On gloo (CPU) a reduce-scatter is
an all-reduce followed by a copy, and costs as much. Per optimizer step of A micro-batches:

  ddp     all-reduce of the fp32 gradients once per step (no_sync between micro-batches; buckets change the
          count of collectives, not the bytes), and the module buffers broadcast at every forward (DDP's
          broadcast_buffers, Accelerate's default)
  zero1   the fp32 gradients reduced at the step's end (communication_data_type fp32, as the harness sets):
          DeepSpeed all-reduces a bucket that spans several ranks' partitions (use_multi_rank_bucket_allreduce,
          the default; the harness's 5e8-element buckets span them all) and reduces it to its owner otherwise;
          then an all-gather of the updated parameters
  zero2   as zero1, but gradients are reduced at every micro-batch (partitioned gradients)
  zero3   all-gather of the partitioned parameters at every forward (those above
          stage3_param_persistence_threshold = 10 x hidden size, Accelerate's "auto"; the harness's
          max_reuse_distance keeps them gathered through backward), all-gather of the persistent ones (the
          others: each rank updates its partition of them too) after each optimizer step, reduce-scatter of
          all gradients at every micro-batch (buckets of hidden size squared)
  fsdp    FSDP2 as the harness applies it: all-gather of every unit's parameters (in the compute precision) at
          every forward and again in backward (fsdp_reshard_after_forward: true, the root unit included), except
          the forward after a micro-batch's backward (no reshard until the step's last: A + 1 per step), one
          fp32 reduce-scatter of the gradients at the step's end
  *-offload  the same bytes on the network: offloading moves state between GPU and host, not between ranks

The harness's own per-step collectives (loss, flags, gradient norm: a few floats) and the transports' framing
(gloo's message headers, TCP/IP's) are left out: the bytes are the collectives' payload. The model is checked
against the payload each rank's TCP sockets carried (logging.network_bytes; gloo, tiny BERT, fp32) on the
two-node test cluster (tests/integration/test_two_nodes.py) and for every topology on one host
(tests/distributed/test_network_bytes.py): within 5%. ZeRO-3 is the farthest, 4% over: its 75 collectives per
step of tiny BERT (one all-gather per module, reduce-scatters in small buckets) each carry gloo's headers.

The projection adds communication time (bytes / link bandwidth, the slowest link of the ring) to a compute time
per step, with none of it overlapped (a bound from below on samples/s), and with all of it overlapped (from
above).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root on the path, for `harness`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOPOLOGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp", "zero3-offload", "fsdp-offload")
KINDS = ("all-reduce", "reduce-scatter", "reduce", "all-gather", "broadcast")
REDUCE_BUCKET = {"zero1": 500_000_000, "zero2": 500_000_000}
"""configs/deepspeed/zero{1,2}.json's reduce_bucket_size, in elements (ZeRO-3's is "auto": hidden size squared)."""
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

DEBERTA_V3 = {"vocab_size": 128100, "relative_attention": True, "position_buckets": 256, "norm_rel_ebd": "layer_norm",
              "share_att_key": True, "pos_att_type": ["p2c", "c2p"], "position_biased_input": False,
              "max_relative_positions": -1, "type_vocab_size": 0}  # fmt: skip
"""DeBERTa-v3's config beyond DebertaV2Config's defaults (the base size)."""
PRESETS = {  # Hugging Face names whose architecture is known here, so that nothing is downloaded
    "bert-base-uncased": ("bert", {}),
    "bert-large-uncased": (
        "bert",
        {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
    ),  # fmt: skip
    "roberta-base": (
        "roberta",
        {"vocab_size": 50265, "max_position_embeddings": 514, "type_vocab_size": 1, "pad_token_id": 1},
    ),  # fmt: skip
    "microsoft/deberta-v3-base": ("deberta-v2", DEBERTA_V3),
    "microsoft/deberta-v3-large": (
        "deberta-v2",
        {
            **DEBERTA_V3,
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "intermediate_size": 4096,
        },
    ),  # fmt: skip
}
LINKS = {  # name: (GPUs per node, intra-node GB/s per GPU, inter-node GB/s per GPU)
    "h100-nvlink-ib400": (8, 450.0, 50.0),  # NVLink 4: 900 GB/s bidirectional; one 400 Gb/s NIC per GPU
    "h100-nvlink-ib100": (8, 450.0, 12.5),  # the same nodes on 100 Gb/s
}


@dataclass(frozen=True)
class ModelShape:
    """What communication depends on: parameter counts, buffers and the FSDP2 unit layout."""

    name: str
    parameters: int
    partitioned: int
    """ZeRO-3: parameters in tensors above the persistence threshold (the others stay whole on every rank)."""
    root_parameters: int
    """FSDP2: parameters outside the encoder layers (embeddings, pooler, head): the root unit's (reported)."""
    buffer_bytes: int
    """Module buffers (DDP broadcasts them at every forward)."""
    hidden_size: int


def shape_of(name: str, num_labels: int = 2) -> ModelShape:
    """Count a sequence classifier's parameters on the meta device, from PRESETS, a local folder, a hub name
    (AutoConfig) or `builtin:tiny-bert`."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from harness.config import ModelConfig
    from harness.fsdp import shard_units
    from harness.model import TINY_BERT, tiny_bert_config

    if name == TINY_BERT:
        config = tiny_bert_config([str(i) for i in range(num_labels)], ModelConfig())[1]
    elif name in PRESETS:
        model_type, kwargs = PRESETS[name]
        config = AutoConfig.for_model(model_type, num_labels=num_labels, **kwargs)
    else:
        config = AutoConfig.from_pretrained(name, num_labels=num_labels)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    threshold = 10 * config.hidden_size
    parameters = sum(p.numel() for p in model.parameters())
    in_layers = sum(p.numel() for unit in shard_units(model) for p in unit.parameters())
    return ModelShape(
        name=name,
        parameters=parameters,
        partitioned=sum(p.numel() for p in model.parameters() if p.numel() > threshold),
        root_parameters=parameters - in_layers,
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        hidden_size=config.hidden_size,
    )


def ring(kind: str, payload: float, world: int, backend: str = "nccl") -> float:
    """Bytes one rank sends (and receives) in a collective over `payload` bytes (the whole tensor)."""
    if world < 2:
        return 0.0
    if kind == "reduce-scatter" and backend == "gloo":
        kind = "all-reduce"  # gloo reduces the whole tensor everywhere, then keeps its chunk
    share = (world - 1) / world
    factor = {
        "all-reduce": 2 * share,
        "reduce-scatter": share,
        "reduce": share,
        "all-gather": share,
        "broadcast": share,
    }
    return factor[kind] * payload


def step_bytes(shape: ModelShape, topology: str, world: int, precision: str = "fp32", micro_batches: int = 1,
               backend: str = "nccl") -> dict[str, float]:  # fmt: skip
    """Bytes each rank sends per optimizer step, by collective kind (and as much received)."""
    topology = topology.removesuffix("-offload")
    grads = 4 * shape.parameters  # fp32 gradients (fp32 masters under autocast; DeepSpeed communicates in fp32)
    params = DTYPE_BYTES[precision] * shape.parameters  # parameters in the compute precision
    per_kind = dict.fromkeys(KINDS, 0.0)
    a = micro_batches

    def add(kind: str, payload: float, times: int = 1) -> None:
        per_kind[kind] += times * ring(kind, payload, world, backend)

    if topology == "ddp":
        add("all-reduce", grads)
        add("broadcast", shape.buffer_bytes, a)
    elif topology in ("zero1", "zero2"):
        spans_partitions = REDUCE_BUCKET[topology] >= shape.parameters / world
        add("all-reduce" if spans_partitions else "reduce", grads, 1 if topology == "zero1" else a)
        add("all-gather", params)
    elif topology == "zero3":
        add("all-gather", DTYPE_BYTES[precision] * shape.partitioned, a)
        add("all-gather", DTYPE_BYTES[precision] * (shape.parameters - shape.partitioned))
        add("reduce-scatter", grads, a)
    elif topology == "fsdp":
        # Forward, and backward again; between micro-batches the harness keeps the gathered parameters (no
        # reshard after a backward that does not sync), so the next forward gathers nothing: a + 1 per step.
        add("all-gather", params, a + 1)
        add("reduce-scatter", grads)
    else:
        raise ValueError(f"topology {topology!r}: one of {', '.join(TOPOLOGIES)}")
    return per_kind


def projection(shape: ModelShape, topology: str, gpus: int, link: str, step_seconds: float, samples_per_gpu: int,
               precision: str = "bf16") -> dict[str, float]:  # fmt: skip
    """Samples/s and scaling efficiency on `gpus` GPUs: one GPU's compute time per step plus the step's bytes
    over the ring's slowest link (the network once the ring spans nodes), with none or all of it overlapped."""
    per_node, intra, inter = LINKS[link]
    bandwidth = (intra if gpus <= per_node else inter) * 1e9
    sent = sum(step_bytes(shape, topology, gpus, precision).values())
    comm = sent / bandwidth
    one_gpu = samples_per_gpu / step_seconds
    serial = gpus * samples_per_gpu / (step_seconds + comm)
    overlapped = gpus * samples_per_gpu / max(step_seconds, comm)
    return {"bytes_per_rank": sent, "comm_seconds": comm, "samples_per_s_serial": serial,
            "samples_per_s_overlapped": overlapped, "efficiency_serial": serial / (gpus * one_gpu),
            "efficiency_overlapped": overlapped / (gpus * one_gpu)}  # fmt: skip


def fmt_bytes(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def print_one(args: argparse.Namespace) -> None:
    shape = shape_of(args.model)
    kinds = step_bytes(shape, args.topology, args.gpus, args.precision, args.micro_batches)
    print(f"{shape.name}: {shape.parameters / 1e6:.1f}M parameters ({shape.partitioned / 1e6:.1f}M partitioned "
          f"under ZeRO-3); {args.topology} on {args.gpus} GPUs, {args.precision}, {args.micro_batches} micro-batch(es)")  # fmt: skip
    print("bytes each rank sends (and receives) per optimizer step:")
    for kind in KINDS:
        print(f"  {kind:<15}{fmt_bytes(kinds[kind]):>12}")
    print(f"  {'total':<15}{fmt_bytes(sum(kinds.values())):>12}")
    p = projection(shape, args.topology, args.gpus, args.link, args.step_seconds, args.samples_per_gpu, args.precision)
    print(f"projection on {args.link} ({args.step_seconds} s compute per step, {args.samples_per_gpu} samples per GPU): "
          f"communication {p['comm_seconds'] * 1e3:.1f} ms per step; {p['samples_per_s_serial']:,.0f} samples/s "
          f"({p['efficiency_serial']:.0%} scaling efficiency) without overlap, up to {p['samples_per_s_overlapped']:,.0f} "
          f"({p['efficiency_overlapped']:.0%}) with full overlap")  # fmt: skip


def print_table(args: argparse.Namespace) -> None:
    rows = [("bert-base-uncased", 0.060), ("microsoft/deberta-v3-large", 0.400)]
    print(
        f"link {args.link}; bf16; {args.samples_per_gpu} samples per GPU per step; compute per step as given; "
        "efficiency without overlap / with full overlap"
    )
    print(
        f"{'model':<28}{'topology':<10}{'GPUs':>6}{'MB per rank':>13}{'comm ms':>9}{'samples/s':>22}{'efficiency':>14}"
    )
    for name, seconds in rows:
        shape = shape_of(name)
        for topology in ("ddp", "zero1", "zero2", "zero3", "fsdp"):
            for gpus in (8, 64, 512):
                p = projection(shape, topology, gpus, args.link, seconds, args.samples_per_gpu)
                print(f"{name:<28}{topology:<10}{gpus:>6}{p['bytes_per_rank'] / 1e6:>13.0f}"
                      f"{p['comm_seconds'] * 1e3:>9.1f}{p['samples_per_s_serial']:>11,.0f}-{p['samples_per_s_overlapped']:<10,.0f}"
                      f"{p['efficiency_serial']:>7.0%}/{p['efficiency_overlapped']:<6.0%}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="bert-base-uncased", help=f"a preset ({', '.join(PRESETS)}), a folder or a hub name"
    )
    parser.add_argument("--topology", default="ddp", choices=TOPOLOGIES)
    parser.add_argument("--gpus", type=int, default=8, help="ranks in all (nodes x GPUs per node)")
    parser.add_argument("--precision", default="bf16", choices=sorted(DTYPE_BYTES))
    parser.add_argument("--micro-batches", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--link", default="h100-nvlink-ib400", choices=sorted(LINKS))
    parser.add_argument(
        "--step-seconds",
        type=float,
        default=0.060,
        help="one GPU's compute time per optimizer step (measure it: benchmarks/gpu_check.py)",
    )
    parser.add_argument("--samples-per-gpu", type=int, default=32)
    parser.add_argument("--table", action="store_true", help="BERT-base and DeBERTa-v3-large at 8, 64, 512 GPUs")
    args = parser.parse_args(argv)
    if args.gpus < 1 or args.micro_batches < 1 or args.step_seconds <= 0 or args.samples_per_gpu < 1:
        parser.error("--gpus, --micro-batches and --samples-per-gpu must be >= 1, --step-seconds > 0")
    print_table(args) if args.table else print_one(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
