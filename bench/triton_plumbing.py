"""What the Triton plumbing costs per request, python backend vs pytriton's own binding, without any model work.

Both serve the same "encoder" that returns zeros: [cells, 1,200] input_ids / values / attention_mask in,
[cells, 512] cell_embedding out (the PyTorch encoder's wire format at whole-human size), with dynamic
batching.  The python backend runs it in a stub process the server feeds through shared memory (what
`scgpt-hf serve MODEL` uses); pytriton's binding runs it in the process that called `Triton.bind`, one hop
further (the proxy model in the stub forwards over ZeroMQ and shared memory).  Same server (nvidia-pytriton
0.7.0's Triton 2.51), gRPC client, CPU; the difference is the plumbing alone.

    .venv/bin/python bench/triton_plumbing.py [--cells 8] [--requests 200]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

LENGTH, HIDDEN = 1200, 512
ECHO_MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            n = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy().shape[0]
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("cell_embedding", np.zeros((n, 512), np.float32))]))
        return out
'''
PYTRITON_SERVER = '''
import sys, time
import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

http, grpc, metrics = map(int, sys.argv[1:4])

@batch
def infer(input_ids, values, attention_mask):
    return {"cell_embedding": np.zeros((input_ids.shape[0], 512), np.float32)}

with Triton(config=TritonConfig(http_port=http, grpc_port=grpc, metrics_port=metrics, http_address="127.0.0.1",
                                grpc_address="127.0.0.1")) as triton:
    triton.bind(model_name="echo", infer_func=infer,
                inputs=[Tensor(name="input_ids", dtype=np.int64, shape=(-1,)),
                        Tensor(name="values", dtype=np.float32, shape=(-1,)),
                        Tensor(name="attention_mask", dtype=np.int64, shape=(-1,))],
                outputs=[Tensor(name="cell_embedding", dtype=np.float32, shape=(512,))],
                config=ModelConfig(max_batch_size=64, batcher=DynamicBatcher(max_queue_delay_microseconds=1000)))
    print("READY", flush=True)
    triton.serve()
'''


def _python_backend_repository(root: Path) -> Path:
    """The echo model in the PyTorch encoder's config (scgpt_hf.export.triton's builder), named "echo"."""
    from scgpt_hf.export.triton import Batching, render_model_config, torch_encoder_config

    config = torch_encoder_config({"cell_embedding": [HIDDEN]}, Batching(64, (8, 16, 64), 1000), {},
                                  batch_labels=False)
    config.name = "echo"
    (root / "echo" / "1").mkdir(parents=True)
    (root / "echo" / "1" / "model.py").write_text(ECHO_MODEL)
    (root / "echo" / "config.pbtxt").write_text(render_model_config(config, "zeros"))
    return root


def measure(url: str, cells: int, requests: int) -> list[dict]:
    import triton_throughput

    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 60000, (cells, LENGTH)).astype(np.int64),
             "values": rng.random((cells, LENGTH)).astype(np.float32),
             "attention_mask": np.ones((cells, LENGTH), np.int64)}
    return [triton_throughput.run_case(url, "grpc", "echo", lambda _rng: feeds, cells, concurrency,
                                       max(10, requests // concurrency), batched_model=None)
            for concurrency in (1, 8)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()

    from scgpt_hf.serving import TritonServer, find_server_env, free_port

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        with TritonServer(_python_backend_repository(Path(tmp) / "repo")) as server:
            results["python backend"] = measure(server.grpc_url, args.cells, args.requests)
        env = find_server_env()
        ports = [free_port() for _ in range(3)]
        script = Path(tmp) / "pytriton_server.py"
        script.write_text(textwrap.dedent(PYTRITON_SERVER))
        # The same environment TritonServer gives its server (the stubs need this Python's own libpython first).
        server_env = TritonServer(Path(tmp) / "repo", server_env=env).environment()[1]
        proc = subprocess.Popen([str(env / "bin" / "python"), str(script), *map(str, ports)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=server_env)
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and "READY" not in (proc.stdout.readline() or ""):
                if proc.poll() is not None:
                    sys.exit(f"pytriton server exited: {proc.stdout.read()[-3000:]}")
            time.sleep(2)
            results["pytriton binding"] = measure(f"127.0.0.1:{ports[1]}", args.cells, args.requests)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print(f"{args.cells} cells x {LENGTH} tokens per request, zeros back; gRPC, CPU")
    print(f"{'plumbing':>18} {'conc':>5} {'requests/s':>11} {'p50 ms':>8} {'p99 ms':>8}")
    for name, cases in results.items():
        for c in cases:
            print(f"{name:>18} {c['concurrency']:>5} {c['cells_per_s'] / args.cells:>11.1f} {c['p50_ms']:>8.2f} "
                  f"{c['p99_ms']:>8.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
