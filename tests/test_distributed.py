"""Two ranks (gloo on loopback) against one process on the same batches.

`distributed_scenario.py` runs the same session — LoRA and full fine-tuning (FSDP2), 3 steps on
a batch of 5 data that 2 ranks split unevenly, a batch of 1 (one rank idles), DPO pairs split
across the ranks, a weighted combination, a custom loss coupling every datum, sampling, saving —
once in this process and once under `bios launch --nproc-per-node 2`. Then each side continues
from the other's checkpoints. A third job loses a rank and must say so.
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bios.client.service import ServiceClient
from bios.commands.launch import strip_distributed_flags, torchrun_command
from bios.distributed.sampling import split_requests
from bios.distributed.step import split_ranges
from bios.engine.decoding import SampleRequest, SampleSettings
from bios.engine.engine import Engine
from bios.types import ModelInput, SamplingParams
from distributed_scenario import continue_from, scenario, train, train_in_shares
from server_process import ServerProcess, free_port

HERE = Path(__file__).parent
SCENARIO = str(HERE / "distributed_scenario.py")


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "BIOS_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    return {**env, **extra}


def _assert_close(one, two, where: str = "") -> None:
    if isinstance(one, dict):
        assert one.keys() == two.keys(), where
        for key in one:
            _assert_close(one[key], two[key], f"{where}.{key}")
    elif isinstance(one, list | tuple):
        assert len(one) == len(two), where
        for index, (a, b) in enumerate(zip(one, two, strict=True)):
            _assert_close(a, b, f"{where}[{index}]")
    elif isinstance(one, torch.Tensor | float):
        torch.testing.assert_close(
            torch.as_tensor(two), torch.as_tensor(one), atol=1e-5, rtol=1e-5, msg=where
        )
    elif not isinstance(one, str):  # paths differ (run ids); everything else must be equal
        assert one == two, where


def _folder(home: Path, path: str) -> Path:
    run_id, kind, name = path.removeprefix("bios://").split("/")
    return home / "runs" / run_id / kind / name


def _assert_same_files(home: Path, one: str, two: str) -> None:
    """Two checkpoints hold the same tensors (within 1e-5) in the same files."""
    first, second = _folder(home, one), _folder(home, two)
    files = sorted(p.name for p in first.glob("*.safetensors"))
    assert files == sorted(p.name for p in second.glob("*.safetensors")) and files
    for name in files:
        a, b = load_file(first / name), load_file(second / name)
        assert a.keys() == b.keys(), name
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-5, msg=key)


@pytest.fixture(scope="module")
def both(tiny_models: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    """(home, one process's results, two ranks' results, one process continuing theirs)."""
    torch.set_num_threads(1)
    model = tiny_models["qwen3"]  # tied embeddings: FSDP2 must keep them tied
    home = tmp_path_factory.mktemp("bios-dist-home")
    try:
        service = ServiceClient(engine=Engine(home=home))
        one = scenario(service, model)
        target = home / "two.pt"
        command = [sys.executable, "-m", "bios.cli", "launch", "--nproc-per-node", "2"]
        command += [SCENARIO, model, str(target), one["lora_path"], one["full_path"]]
        started = time.monotonic()
        done = subprocess.run(
            command, env=_env(home, BIOS_DIST_TIMEOUT="60"), capture_output=True, timeout=240
        )
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        print(f"2-rank job: {time.monotonic() - started:.1f} s")
        two = torch.load(target, weights_only=False)
        theirs = two["scenario"]
        ours_continued = continue_from(service, theirs["lora_path"], theirs["full_path"])
        own_continued = continue_from(service, one["lora_path"], one["full_path"])
        one["shares"] = train_in_shares(service, model)
    finally:
        torch.set_num_threads(2)
    return home, one, two, ours_continued, own_continued


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_three_steps_equal_one_process(both, kind):
    """`loss:sum`, per-datum logprobs and grad norms of 3 steps on 5 data split 3/2."""
    _, one, two, _, _ = both
    _assert_close(one[kind], two["scenario"][kind], kind)
    _assert_close(one[f"{kind}_one"], two["scenario"][f"{kind}_one"], f"{kind}_one")


def test_a_sharded_run_counts_its_own_shards_of_the_gradients(both):
    """The memory check counts the gradients a step makes (4 bytes a value): one process the
    whole model's, rank 0 of two only its FSDP2 shards (the first ⌈rows / 2⌉ rows of each)."""
    _, one, two, _, _ = both
    shapes = one["full_shapes"]
    assert two["scenario"]["full_shapes"] == shapes
    assert one["full_gradient_bytes"] == sum(4 * math.prod(shape) for shape in shapes)
    first_shards = sum(4 * math.ceil(s[0] / 2) * math.prod(s[1:]) for s in shapes)
    assert two["scenario"]["full_gradient_bytes"] == first_shards


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_weights_after_three_steps_equal(both, kind):
    """The checkpoints (gathered on rank 0 for FSDP2) hold the same weights and moments."""
    home, one, two, _, _ = both
    _assert_same_files(home, one[f"{kind}_path"], two["scenario"][f"{kind}_path"])


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_two_ranks_are_one_process_accumulating_their_shares(both, kind):
    """The weights and moments after 3 steps on 2 ranks are those of one process accumulating
    the same two shares: bit for bit for LoRA; for FSDP2 up to the rounding of the gradient norm
    (summed shard by shard) that clipping scales by. What remains against the whole batch at
    once (above, 1e-5) is float rounding of differently shaped products, not distribution."""
    home, one, two, _, _ = both
    ours = _folder(home, one["shares"][kind])
    theirs = _folder(home, two["scenario"][f"{kind}_path"])
    for file in sorted(p.name for p in ours.glob("*.safetensors")):
        a, b = load_file(ours / file), load_file(theirs / file)
        assert a.keys() == b.keys()
        for key in a:
            if kind == "lora":
                assert torch.equal(a[key], b[key]), key
            else:
                torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5, msg=key)


def test_a_rejected_custom_loss_changes_nothing_on_any_rank(both):
    """Rank 0 rejects a NaN loss and tells the other ranks before any backward pass: the same
    error as one process, every rank's state unchanged, and the job goes on (the rest of the
    scenario runs after it)."""
    _, one, two, _, _ = both
    assert two["scenario"]["rejected"] == one["rejected"]
    assert "non-finite" in one["rejected"]["message"] and one["rejected"]["unchanged"]


def test_lora_replicas_stay_identical(both):
    _, _, two, _, _ = both
    fingerprints = two["replicas"]
    assert len(fingerprints) == 2 and len(set(fingerprints)) == 1


@pytest.mark.parametrize("part", ["dpo", "dpo_ref", "combined", "custom", "after_custom"])
def test_objectives_that_couple_data_are_exact(both, part):
    """DPO pairs cut by the split, combinations with `:mean` metrics, a custom loss of all data."""
    _, one, two, _, _ = both
    _assert_close(one[part], two["scenario"][part], part)


@pytest.mark.parametrize(
    "part", ["samples", "base_samples", "full_samples", "saved_samples", "full_generate"]
)
def test_sampling_over_two_ranks_equals_one_process(both, part):
    """Samples split over the ranks (a request cut in two parts among them): the same tokens,
    logprobs and prompt logprobs as one process, for snapshots of LoRA and FSDP2 runs, the base
    model and saved weights."""
    _, one, two, _, _ = both
    _assert_close(one[part], two["scenario"][part], part)


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_checkpoints_cross_between_one_and_two_ranks(both, kind):
    """One process's checkpoint continued on 2 ranks, and 2 ranks' checkpoint continued in one
    process, both equal one process continuing its own."""
    home, _, two, ours_continued, own_continued = both
    theirs_continued = two["continued"]
    _assert_close(own_continued[kind], theirs_continued[kind], f"2 ranks continuing, {kind}")
    _assert_close(own_continued[kind], ours_continued[kind], f"1 process continuing, {kind}")
    own_path = own_continued[f"{kind}_path"]
    _assert_same_files(home, own_path, theirs_continued[f"{kind}_path"])
    _assert_same_files(home, own_path, ours_continued[f"{kind}_path"])


def test_serve_on_two_ranks_equals_one_process(tiny_models, tmp_path):
    """`bios serve --nproc-per-node 2` (re-executed under torchrun): LoRA steps and samples over
    HTTP equal the embedded engine in one process."""
    model = tiny_models["qwen3"]
    params = SamplingParams(max_tokens=4, temperature=1.0, seed=5)

    def session(service: ServiceClient) -> list:
        client = service.create_lora_training_client(model, rank=4, seed=2)
        record = train(client, steps=2)
        sampler = client.save_weights_and_get_sampling_client("s")
        response = sampler.sample(ModelInput.from_ints([3, 1, 4]), 3, params).result()
        return [record, [(s.tokens, s.logprobs) for s in response.sequences]]

    (tmp_path / "server").mkdir()
    server = ServerProcess(tmp_path / "server", [model], extra_args=["--nproc-per-node", "2"])
    try:
        two = session(ServiceClient(base_url=server.url))
        log = (tmp_path / "server" / "server.log").read_text()
        assert "rank 0 of 2 (gloo)" in log
    finally:
        server.stop()
    torch.set_num_threads(1)
    try:
        one = session(ServiceClient(engine=Engine(home=tmp_path / "one")))
    finally:
        torch.set_num_threads(2)
    _assert_close(one, two, "serve")


def test_a_dead_rank_fails_the_request_clearly(tiny_models, tmp_path):
    """Rank 1 is killed (SIGKILL); rank 0's next request fails at once, naming the cause."""
    port = free_port()
    ready, go, target = tmp_path / "ready", tmp_path / "go", tmp_path / "result.pt"
    processes = []
    for rank in range(2):
        env = _env(
            tmp_path,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            BIOS_DIST_TIMEOUT="30",
        )
        command = [sys.executable, "-m", "bios.launch", SCENARIO, "kill", tiny_models["llama"]]
        command += [str(target), str(ready), str(go)]
        processes.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )
    leader, follower = processes
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert leader.poll() is None, leader.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the job did not start"
            time.sleep(0.1)
        os.kill(follower.pid, signal.SIGKILL)
        follower.wait(timeout=10)
        go.touch()
        leader.wait(timeout=60)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert leader.returncode == 0, leader.stderr.read().decode()[-3000:]
    result = torch.load(target, weights_only=False)
    print(f"after {result['seconds']:.2f} s: {result['error']}")
    assert result["error"] is not None
    assert "DistributedError" in result["error"]
    assert "a rank died or stopped responding" in result["error"]
    assert result["seconds"] < 30


def test_launch_command_lines():
    assert torchrun_command(2, 1, None, None, ["x.py"])[3:] == [
        "--nproc-per-node",
        "2",
        "--standalone",
        "x.py",
    ]
    assert torchrun_command(4, 2, "node0:29400", 1, ["-m", "m"])[3:] == [
        "--nproc-per-node",
        "4",
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--master-addr",
        "node0",
        "--master-port",
        "29400",
        "-m",
        "m",
    ]
    assert "--rdzv-backend" in torchrun_command(4, 2, "node0:29400", None, [])
    with pytest.raises(ValueError, match="rdzv-endpoint"):
        torchrun_command(2, 2, None, None, [])
    argv = ["--model", "m", "--nproc-per-node", "2", "--nnodes=1", "--port", "9"]
    assert strip_distributed_flags(argv) == ["--model", "m", "--port", "9"]


def test_split_ranges_are_contiguous_balanced_and_non_empty():
    assert split_ranges([5, 9, 13, 17, 21], 2) == [(0, 3), (3, 5)]
    assert split_ranges([100, 1, 1, 1], 2) == [(0, 1), (1, 4)]
    assert split_ranges([1], 3) == [(0, 1), (1, 1), (1, 1)]  # fewer data than ranks
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        count, parts = (int(x) for x in torch.randint(1, 12, (2,), generator=generator))
        lengths = torch.randint(1, 50, (count,), generator=generator).tolist()
        ranges = split_ranges(lengths, parts)
        assert len(ranges) == parts and ranges[0][0] == 0 and ranges[-1][1] == count
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        if count >= parts:
            assert all(stop > start for start, stop in ranges)


def test_sample_requests_split_into_parts_of_one_random_stream():
    settings = SampleSettings(max_tokens=3, temperature=1.0, top_k=-1, top_p=1.0, seed=1)
    requests = [
        SampleRequest([1, 2], 5, settings, prompt_logprobs=True),
        SampleRequest([3], 2, settings, topk_prompt_logprobs=2),
    ]
    shares = split_requests(requests, 2)  # 7 rows: 3 | 4
    assert [(i, p.first_sample, p.num_samples, p.total_samples) for i, p in shares[0]] == [
        (0, 0, 3, 5)
    ]
    assert [(i, p.first_sample, p.num_samples, p.total_samples) for i, p in shares[1]] == [
        (0, 3, 2, 5),
        (1, 0, 2, 2),
    ]
    # Only the part with a request's first sample computes its prompt logprobs.
    assert shares[0][0][1].prompt_logprobs and not shares[1][0][1].prompt_logprobs
    assert shares[1][1][1].topk_prompt_logprobs == 2
