"""The launcher's commands for each intent and environment, SLURM hostlists, and the shipped launch configs."""

import json
import shlex
import subprocess
import sys

import pytest
import yaml

from launch.__main__ import main as launch_main
from launch.__main__ import parse_args
from launch.commands import (
    DEBUG_OVERRIDES,
    FSDP_CONFIGS,
    INTENTS,
    MULTI_GPU_CONFIG,
    ZERO_CONFIGS,
    Command,
    Host,
    Request,
    build_command,
)
from launch.slurm import PORT_BASE, PORT_SPAN, LaunchError, expand_hostlist, port_for_job
from tests.conftest import ROOT

ENTRY = ("--config", "configs/quickstart.yaml")
CPU_HOST = Host(gpus=0, cpus=4, free_port=41000)
GPU_HOST = Host(gpus=8, cpus=64, free_port=41000)
SLURM_4X8 = {
    "SLURM_JOB_NODELIST": "gpu-[01-04]",
    "SLURM_NODEID": "2",
    "SLURM_JOB_NUM_NODES": "4",
    "SLURM_GPUS_ON_NODE": "8",
    "SLURM_JOB_ID": "4242",
    "SLURM_CPUS_ON_NODE": "64",
}
SLURM_PORT = PORT_BASE + 4242 % PORT_SPAN
ACCELERATE_CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
DEEPSPEED_CONFIGS = sorted((ROOT / "configs" / "deepspeed").glob("*.json"))


def command(intent: str, nproc: int | None = None, env: dict | None = None, host: Host = CPU_HOST, **kw) -> Command:
    return build_command(Request(intent, nproc=nproc, script_args=ENTRY, **kw), env or {}, host)


# --- single node -------------------------------------------------------------------------------------------


def test_debug_is_one_plain_python_process_with_small_data_overrides():
    cmd = command("debug")
    assert cmd.argv == ["python", "harness/train.py", *ENTRY, *DEBUG_OVERRIDES]
    assert cmd.env == {}
    assert DEBUG_OVERRIDES == (
        "train.max_steps=20",
        "data.max_train_samples=256",
        "data.max_eval_samples=128",
        "logging.every_steps=1",
    )


def test_debug_keeps_the_users_own_value_for_a_debug_key():
    cmd = build_command(Request("debug", script_args=(*ENTRY, "train.max_steps=3")), {}, CPU_HOST)
    assert cmd.argv.count("train.max_steps=3") == 1
    assert not any(arg.startswith("train.max_steps=2") for arg in cmd.argv)
    assert "data.max_train_samples=256" in cmd.argv


def test_debug_shows_one_gpu_only():
    assert command("debug", host=GPU_HOST).env == {"CUDA_VISIBLE_DEVICES": "0"}
    assert command("debug", env={"CUDA_VISIBLE_DEVICES": "5,6"}, host=GPU_HOST).env == {"CUDA_VISIBLE_DEVICES": "5"}
    assert command("debug", host=Host(gpus=1)).env == {}


@pytest.mark.parametrize("kwargs", [{"nproc": 2}, {"nodes": 2}, {"from_slurm": True}])
def test_debug_refuses_more_than_one_process(kwargs):
    with pytest.raises(LaunchError, match="debug runs one process"):
        command("debug", **kwargs)


def test_cpu_is_torchrun_with_a_port_and_the_cores_shared_out():
    cmd = command("cpu", 2)
    assert cmd.argv == ["torchrun", "--nproc_per_node", "2", "--master_port", "41000", "harness/train.py", *ENTRY]
    assert cmd.env == {"OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}  # 4 cores / 2 processes; CPU only
    assert "--cpu" not in cmd.argv  # `accelerate launch --cpu --num_processes 2` would start ONE process


def test_cpu_keeps_the_users_thread_count_and_port():
    cmd = command("cpu", 3, env={"OMP_NUM_THREADS": "1", "MASTER_PORT": "29555"})
    assert cmd.env == {"CUDA_VISIBLE_DEVICES": ""}
    assert cmd.argv[:5] == ["torchrun", "--nproc_per_node", "3", "--master_port", "29555"]
    assert command("cpu", 2, port=23000).argv[4] == "23000"


def test_cpu_needs_a_process_count():
    with pytest.raises(LaunchError, match="NPROC_PER_NODE"):
        command("cpu", host=GPU_HOST)
    assert command("cpu", env={"NPROC_PER_NODE": "3"}).argv[2] == "3"


def test_gpus_is_accelerate_ddp_with_one_process_per_visible_gpu():
    assert command("gpus", 4, host=GPU_HOST).argv == [
        "accelerate", "launch", "--config_file", MULTI_GPU_CONFIG, "--num_processes", "4",
        "--main_process_port", "41000", "harness/train.py", *ENTRY,
    ]  # fmt: skip
    assert command("gpus", host=GPU_HOST).argv[5] == "8"
    assert command("gpus", env={"CUDA_VISIBLE_DEVICES": "0,1,2"}, host=GPU_HOST).argv[5] == "3"
    # One GPU: the entry itself, nothing between it and a preemption's TERM (accelerate launch's one-process
    # launcher would SIGKILL it 5 s later); with restarts, torchrun restarts it.
    assert command("gpus", 1, host=GPU_HOST).argv == ["python", "harness/train.py", *ENTRY]
    restarting = command("gpus", 1, host=GPU_HOST, max_restarts=2)
    assert restarting.argv[:5] == ["torchrun", "--nproc_per_node", "1", "--max-restarts", "2"]
    assert "CUDA_VISIBLE_DEVICES" not in restarting.env


def test_gpus_without_gpus_runs_cpu_gloo_processes():
    cmd = command("gpus", 2)
    assert cmd.argv[:3] == ["torchrun", "--nproc_per_node", "2"]
    assert "no GPUs" in cmd.notes[0]
    with pytest.raises(LaunchError, match="no GPUs are visible"):
        command("gpus", env={"CUDA_VISIBLE_DEVICES": ""}, host=GPU_HOST)


@pytest.mark.parametrize("intent", list(ZERO_CONFIGS))
def test_zero_intents_use_their_deepspeed_accelerate_config(intent):
    cmd = command(intent, 2)
    assert cmd.argv == [
        "accelerate", "launch", "--config_file", ZERO_CONFIGS[intent], "--num_processes", "2",
        "--main_process_port", "41000", "harness/train.py", *ENTRY,
    ]  # fmt: skip
    assert command(intent, host=GPU_HOST).argv[5] == "8"
    # Without GPUs the launcher's own DeepSpeed import is told the accelerator (no "unable to detect" warning).
    assert cmd.env == {"DS_ACCELERATOR": "cpu"} and command(intent, host=GPU_HOST).env == {}
    assert command(intent, 2, env={"DS_ACCELERATOR": "xpu"}).env == {}


def test_script_selects_another_entry_point():
    cmd = build_command(Request("zero2", 2, script="harness/pretrain.py", script_args=ENTRY), {}, CPU_HOST)
    assert cmd.argv[-3:] == ["harness/pretrain.py", *ENTRY]


def test_nproc_per_node_overrides_the_gpu_count_and_n_overrides_both():
    env = {"NPROC_PER_NODE": "2"}
    assert command("gpus", env=env, host=GPU_HOST).argv[5] == "2"
    assert command("zero2", 4, env=env, host=GPU_HOST).argv[5] == "4"


def test_unknown_intent_and_bad_counts_are_errors():
    with pytest.raises(LaunchError, match="unknown intent"):
        command("zero4", 2)
    with pytest.raises(LaunchError, match="NPROC_PER_NODE='two'"):
        command("cpu", env={"NPROC_PER_NODE": "two"})
    with pytest.raises(LaunchError, match="port 70000"):
        command("cpu", 2, port=70000)


# --- multi-node from flags ---------------------------------------------------------------------------------


def test_multi_node_gpus_from_flags():
    cmd = command("gpus", 8, host=GPU_HOST, nodes=2, node_rank=1, head_addr="node01", port=29400)
    assert cmd.argv == [
        "accelerate", "launch", "--config_file", MULTI_GPU_CONFIG, "--num_processes", "16",
        "--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "node01",
        "--main_process_port", "29400", "harness/train.py", *ENTRY,
    ]  # fmt: skip


def test_multi_node_zero_uses_one_standard_launcher_per_node():
    cmd = command("zero3", 4, host=GPU_HOST, nodes=3, node_rank=0, head_addr="10.0.0.1", port=29400)
    assert cmd.argv[5] == "12"
    assert cmd.argv[cmd.argv.index("--deepspeed_multinode_launcher") + 1] == "standard"
    assert "--deepspeed_multinode_launcher" not in command("zero3", 4, host=GPU_HOST).argv


def test_multi_node_cpu_is_torchrun_with_nnodes():
    cmd = command("cpu", 2, nodes=2, node_rank=1, head_addr="127.0.0.1", port=29400)
    assert cmd.argv == [
        "torchrun", "--nproc_per_node", "2", "--nnodes", "2", "--node_rank", "1",
        "--master_addr", "127.0.0.1", "--master_port", "29400", "harness/train.py", *ENTRY,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"node_rank": 0, "head_addr": "h"}, "needs --port"),
        ({"node_rank": 0, "port": 29400}, "needs --head-addr"),
        ({"head_addr": "h", "port": 29400}, "needs --node-rank"),
        ({"node_rank": 2, "head_addr": "h", "port": 29400}, "outside 0..1"),
    ],
)
def test_multi_node_flags_must_be_complete(kwargs, message):
    with pytest.raises(LaunchError, match=message):
        command("gpus", 8, host=GPU_HOST, nodes=2, **kwargs)


def test_master_addr_and_port_from_the_environment_complete_the_flags():
    cmd = command("cpu", 2, env={"MASTER_ADDR": "h0", "MASTER_PORT": "29411"}, nodes=2, node_rank=1)
    assert cmd.argv[7:11] == ["--master_addr", "h0", "--master_port", "29411"]


# --- SLURM -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, hosts",
    [
        ("gpu-[01-04]", ["gpu-01", "gpu-02", "gpu-03", "gpu-04"]),
        ("node[001-003,007],login1", ["node001", "node002", "node003", "node007", "login1"]),
        ("a1,b[2-3]", ["a1", "b2", "b3"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[08-10]", ["n08", "n09", "n10"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("gpu[3]-ib", ["gpu3-ib"]),
        ("login1", ["login1"]),
        ("c[1-2],d[5,7-8]", ["c1", "c2", "d5", "d7", "d8"]),
    ],
)
def test_expand_hostlist(spec, hosts):
    assert expand_hostlist(spec) == hosts


@pytest.mark.parametrize("spec", ["n[1-", "n1-2]", "n[3-1]", "n[a-b]", "a,,b", "n[[1-2]]"])
def test_expand_hostlist_rejects_malformed_lists(spec):
    with pytest.raises(LaunchError, match="hostlist"):
        expand_hostlist(spec)


def test_slurm_4_nodes_x_8_gpus_zero3():
    cmd = command("zero3", env=SLURM_4X8, from_slurm=True)
    assert cmd.argv == [
        "accelerate", "launch", "--config_file", ZERO_CONFIGS["zero3"], "--num_processes", "32",
        "--num_machines", "4", "--machine_rank", "2", "--main_process_ip", "gpu-01",
        "--main_process_port", str(SLURM_PORT), "--deepspeed_multinode_launcher", "standard",
        "harness/train.py", *ENTRY,
    ]  # fmt: skip
    assert cmd.env == {}


def test_slurm_every_node_agrees_except_on_its_rank():
    argvs = [command("gpus", env={**SLURM_4X8, "SLURM_NODEID": str(r)}, from_slurm=True).argv for r in range(4)]
    for rank, argv in enumerate(argvs):
        assert argv[argv.index("--machine_rank") + 1] == str(rank)
        assert argv[:9] == argvs[0][:9] and argv[10:] == argvs[0][10:]
    assert argvs[0][3] == MULTI_GPU_CONFIG and argvs[0][5] == "32"


def test_slurm_port_is_deterministic_and_in_range():
    assert port_for_job("4242") == 19242 and port_for_job("123456") == 18456
    assert all(PORT_BASE <= port_for_job(str(job)) < PORT_BASE + PORT_SPAN for job in range(0, 10**6, 7919))
    cmd = command("gpus", env={**SLURM_4X8, "MASTER_PORT": "29999", "MASTER_ADDR": "10.1.1.1"}, from_slurm=True)
    assert cmd.argv[cmd.argv.index("--main_process_port") + 1] == "29999"
    assert cmd.argv[cmd.argv.index("--main_process_ip") + 1] == "10.1.1.1"


@pytest.mark.parametrize(
    "gpu_env, expected",
    [
        ({"SLURM_GPUS_ON_NODE": "8"}, "32"),
        ({"SLURM_GPUS_PER_NODE": "a100:4"}, "16"),
        ({"SLURM_GPUS_PER_NODE": "2"}, "8"),
        ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, "12"),
        ({"SLURM_GPUS_ON_NODE": "8", "NPROC_PER_NODE": "1"}, "4"),
    ],
)
def test_slurm_processes_per_node(gpu_env, expected):
    env = {k: v for k, v in SLURM_4X8.items() if k != "SLURM_GPUS_ON_NODE"} | gpu_env
    assert command("zero2", env=env, from_slurm=True).argv[5] == expected


def test_slurm_without_gpus_runs_cpu_gloo_processes_with_torchrun():
    env = {k: v for k, v in SLURM_4X8.items() if k != "SLURM_GPUS_ON_NODE"}
    env |= {"SLURM_JOB_NODELIST": "cpu[1-2]", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "NPROC_PER_NODE": "2"}
    cmd = command("gpus", env=env, host=GPU_HOST, from_slurm=True)  # device files do not count under SLURM
    assert cmd.argv == [
        "torchrun", "--nproc_per_node", "2", "--nnodes", "2", "--node_rank", "1",
        "--master_addr", "cpu1", "--master_port", str(SLURM_PORT), "harness/train.py", *ENTRY,
    ]  # fmt: skip
    assert cmd.env == {"OMP_NUM_THREADS": "32"}  # SLURM_CPUS_ON_NODE=64 / 2
    del env["NPROC_PER_NODE"]
    with pytest.raises(LaunchError, match="SLURM gave this node no GPUs.*NPROC_PER_NODE"):
        command("gpus", env=env, from_slurm=True)


def test_slurm_single_node_needs_no_multi_node_flags():
    env = SLURM_4X8 | {"SLURM_JOB_NODELIST": "gpu-07", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0"}
    argv = command("zero2", env=env, from_slurm=True).argv
    assert "--num_machines" not in argv and argv[5] == "8"
    assert argv[argv.index("--main_process_port") + 1] == str(SLURM_PORT)


def test_flags_override_slurm():
    argv = command("gpus", 2, env=SLURM_4X8, from_slurm=True, port=24000, head_addr="gpu-04").argv
    assert argv[5] == "8"
    assert argv[argv.index("--main_process_ip") + 1] == "gpu-04"
    assert argv[argv.index("--main_process_port") + 1] == "24000"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"SLURM_JOB_NODELIST": None}, "SLURM_JOB_NODELIST"),
        ({"SLURM_NODEID": None}, "SLURM_NODEID is not set"),
        ({"SLURM_NODEID": "4"}, "outside the job's 4 nodes"),
        ({"SLURM_JOB_NUM_NODES": "3"}, "names 4 hosts"),
        ({"SLURM_JOB_ID": None}, "MASTER_PORT"),
    ],
)
def test_slurm_environment_problems_name_the_variable(change, message):
    env = {k: v for k, v in (SLURM_4X8 | change).items() if v is not None}
    with pytest.raises(LaunchError, match=message):
        command("gpus", env=env, from_slurm=True)


def test_slurm_nodelist_fallback_and_node_count_from_the_list():
    env = {"SLURM_NODELIST": "a1,b[2-3]", "SLURM_NODEID": "1", "SLURM_JOBID": "7", "SLURM_GPUS_ON_NODE": "2"}
    argv = command("gpus", env=env, from_slurm=True).argv
    assert argv[5:12] == ["6", "--num_machines", "3", "--machine_rank", "1", "--main_process_ip", "a1"]


# --- printing and the command line -------------------------------------------------------------------------


def test_shell_line_is_quoted_and_round_trips():
    cmd = Command(["torchrun", "harness/train.py", "run name=with space"], env={"OMP_NUM_THREADS": "2"})
    line = cmd.shell()
    assert line == "OMP_NUM_THREADS=2 torchrun harness/train.py 'run name=with space'"
    assert shlex.split(line)[1:] == cmd.argv


def test_parse_args_splits_at_the_double_dash():
    args, entry = parse_args(["zero2", "4", "--nodes", "2", "--", "--config", "c.yaml", "--nodes=x"])
    assert (args.intent, args.nproc, args.nodes, args.dry_run) == ("zero2", 4, 2, False)
    assert entry == ["--config", "c.yaml", "--nodes=x"]


@pytest.mark.parametrize("argv", [["cpu", "2"], ["zero4", "--"], ["cpu", "0", "--"], ["cpu", "--nodes", "0", "--"],
                                  ["cpu", "2", "--max-restarts", "-1", "--"]])  # fmt: skip
def test_parse_args_rejects_bad_command_lines(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert "usage: python -m launch" in capsys.readouterr().err


def test_main_dry_run_prints_the_resolved_command_and_errors_exit_2(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert launch_main(["zero2", "2", "--port", "23456", "--dry-run", "--", *ENTRY]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    words = [word for word in shlex.split(out[0]) if "=" not in word.split("/")[0]]  # less DS_ACCELERATOR=cpu
    assert words[1:] == [
        "launch", "--config_file", ZERO_CONFIGS["zero2"], "--num_processes", "2",
        "--main_process_port", "23456", "harness/train.py", *ENTRY,
    ]  # fmt: skip
    assert words[0].endswith("accelerate")
    assert launch_main(["cpu", "--dry-run", "--", *ENTRY]) == 2
    assert "NPROC_PER_NODE" in capsys.readouterr().err
    assert launch_main(["cpu", "2", "--script", "harness/nope.py", "--dry-run", "--", *ENTRY]) == 2
    assert "harness/nope.py" in capsys.readouterr().err


def test_dry_run_subprocess_prints_one_line_and_runs_nothing(tmp_path):
    out_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "launch", "cpu", "2", "--port", "23457", "--dry-run", "--", *ENTRY,
         f"output_dir={out_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    argv = shlex.split(lines[0])
    assert argv.pop(0) == "CUDA_VISIBLE_DEVICES="  # the environment additions lead the line
    assert argv[0].endswith("torchrun")
    assert argv[1:] == ["--nproc_per_node", "2", "--master_port", "23457", "harness/train.py", *ENTRY,
                        f"output_dir={out_dir}"]  # fmt: skip
    assert not out_dir.exists()


# --- shipped configs ---------------------------------------------------------------------------------------


def _load_yaml(path):
    return yaml.safe_load(path.read_text())


def test_every_intent_has_its_config_files():
    for config in [MULTI_GPU_CONFIG, *ZERO_CONFIGS.values(), *FSDP_CONFIGS.values()]:
        assert (ROOT / config).is_file(), config
    assert set(INTENTS) == {"debug", "cpu", "gpus", "zero1", "zero2", "zero3", "zero3-offload", "fsdp", "fsdp-offload"}
    names = {p.name for p in ACCELERATE_CONFIGS}
    assert {"multi_node_gpu.yaml", "multi_node_zero3.yaml", "cpu_gloo.yaml"} <= names


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_loads_and_says_how_to_use_it(path):
    from accelerate.commands.config.config_args import load_config_from_file

    text = path.read_text()
    assert text.startswith("# "), "start with a comment: the topology and the command that uses it"
    header = text.split("\n\n")[0]
    assert f"configs/accelerate/{path.name}" in header
    cfg = _load_yaml(path)
    loaded = load_config_from_file(str(path))  # accelerate's own loader rejects unknown keys
    assert loaded.num_processes == cfg["num_processes"] >= 1
    # Any other gpu_ids makes Accelerate overwrite CUDA_VISIBLE_DEVICES: a job given GPU 3 would train on GPU 0.
    assert cfg.get("gpu_ids", "all") == "all", path.name
    if cfg["distributed_type"] == "DEEPSPEED":
        ds_file = cfg["deepspeed_config"]["deepspeed_config_file"]
        assert not ds_file.startswith("/") and (ROOT / ds_file).is_file(), ds_file
        # Accelerate raises "... will be ignored" for these next to a deepspeed_config_file.
        ignored = {"mixed_precision", "zero_stage", "gradient_accumulation_steps", "gradient_clipping"}
        assert not ignored & (set(cfg) | set(cfg["deepspeed_config"])), path.name
        assert cfg["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"
    else:
        assert cfg["mixed_precision"] == "no"  # the experiment's train.precision owns precision
    if path.name.startswith("multi_node"):
        assert cfg["num_machines"] == 2 and cfg["same_network"] is True


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_no_accelerate_config_uses_the_one_process_cpu_forms(path):
    # `distributed_type: MULTI_CPU` (or use_cpu: true) makes `accelerate launch` start ONE process unless
    # mpirun is configured; N CPU processes come from a torchrun-style launch (MULTI_GPU, DEEPSPEED, FSDP types).
    cfg = _load_yaml(path)
    assert cfg["distributed_type"] in ("NO", "MULTI_GPU", "DEEPSPEED", "FSDP")
    assert cfg.get("use_cpu", False) is False
    assert cfg["num_processes"] >= 2 or cfg["distributed_type"] == "NO"


@pytest.mark.parametrize("intent", list(FSDP_CONFIGS))
def test_fsdp_configs_are_fsdp2_and_offload_as_their_intent_says(intent):
    fsdp = _load_yaml(ROOT / FSDP_CONFIGS[intent])["fsdp_config"]
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_offload_params"] is (intent == "fsdp-offload")
    assert command(intent, 2).argv[:6] == ["accelerate", "launch", "--config_file", FSDP_CONFIGS[intent],
                                           "--num_processes", "2"]  # fmt: skip


@pytest.mark.parametrize("intent", list(ZERO_CONFIGS))
def test_zero_config_stage_matches_the_intent(intent):
    cfg = _load_yaml(ROOT / ZERO_CONFIGS[intent])
    ds = json.loads((ROOT / cfg["deepspeed_config"]["deepspeed_config_file"]).read_text())
    assert ds["zero_optimization"]["stage"] == int(intent[4])
    offload = ds["zero_optimization"].get("offload_optimizer", {}).get("device")
    assert offload == ("cpu" if intent == "zero3-offload" else None)


def test_multi_node_zero3_template_points_at_zero3():
    cfg = _load_yaml(ROOT / "configs/accelerate/multi_node_zero3.yaml")
    assert cfg["deepspeed_config"]["deepspeed_config_file"] == "configs/deepspeed/zero3.json"


@pytest.mark.parametrize("path", DEEPSPEED_CONFIGS, ids=lambda p: p.name)
def test_deepspeed_json_leaves_experiment_values_to_the_harness(path):
    ds = json.loads(path.read_text())
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                "gradient_clipping"):  # fmt: skip
        assert ds[key] == "auto", key
    assert ds["bf16"] == {"enabled": "auto"}
    assert ds["fp16"]["enabled"] == "auto" and ds["fp16"]["loss_scale"] == 0  # 0: dynamic loss scaling
    assert "scheduler" not in ds  # the harness's own scheduler
    assert ds["steps_per_print"] >= 10**6 and ds["wall_clock_breakdown"] is False
    zero = ds["zero_optimization"]
    if zero["stage"] == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    # No optimizer block anywhere: the harness passes torch's AdamW (also to the offloaded CPU partitions).
    assert "optimizer" not in ds
    if path.name == "zero3_offload.json":
        assert ds["zero_force_ds_cpu_optimizer"] is False
        for part in ("offload_optimizer", "offload_param"):
            assert zero[part] == {"device": "cpu", "pin_memory": True}


def test_deepspeed_configs_are_the_four_stages():
    assert [p.name for p in DEEPSPEED_CONFIGS] == ["zero1.json", "zero2.json", "zero3.json", "zero3_offload.json"]


def test_sweep_summary_selects_by_validation_and_shows_test_beside(tmp_path, capsys):
    from launch.sweep import main as sweep_main

    # task-0 is best on test, task-1 on validation: the summary must pick task-1.
    for index, (validation, test) in enumerate(((0.40, 0.91), (0.30, 0.85), (0.35, 0.88))):
        task = tmp_path / f"task-{index}"
        task.mkdir()
        (tmp_path / f"task-{index}.overrides").write_text(f"train.lr={index}e-5\n")
        (task / "exit_status.json").write_text(json.dumps({"status": "completed"}))
        (task / "results.json").write_text(json.dumps({
            "best": {"metric": "loss", "value": validation}, "test": {"loss": test, "accuracy": 1 - test},
            "optimizer_steps": 10, "wall_seconds": 1.0,
        }))  # fmt: skip
    (tmp_path / "task-3").mkdir()  # still running: listed last, unranked
    assert sweep_main(["summarize", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:7] == ["rank", "task", "overrides", "status", "validation", "loss", "test"]
    assert [line.split()[1] for line in lines[1:4]] == ["task-1", "task-2", "task-0"]
    assert lines[1].endswith("<- selected") and "0.3000" in lines[1] and "0.8500" in lines[1]
    assert not any(line.endswith("<- selected") for line in lines[2:])
    assert lines[4].split()[0] == "task-3" and "running or lost" in lines[4]


@pytest.mark.parametrize("script", ["train.sbatch", "pretrain.sbatch", "sweep.sbatch"])
def test_sbatch_scripts_log_where_they_are_submitted_and_give_the_step_its_cpus(script):
    text = (ROOT / "slurm" / script).read_text()
    output = next(line for line in text.splitlines() if line.startswith("#SBATCH --output="))
    assert "/" not in output.split("=", 1)[1], "a log folder that does not exist makes SLURM drop the job"
    if script == "train.sbatch":  # the others exec it
        srun = next(line for line in text.splitlines() if line.startswith("srun "))
        assert '--cpus-per-task="$SLURM_CPUS_PER_TASK"' in srun
        # The user's overrides come last and alone: an override appended after them (checkpoint.resume=auto, as
        # the script once did) would silently replace the user's checkpoint.resume=<folder>.
        step = text[text.index("srun ") : text.index("step=$!")]
        assert step.rstrip().endswith('--config "$config" "$@" &'), step
