"""Serve the fine-tuned simulator over HTTP with vLLM's OpenAI-compatible server.

    python -m zslib.serve_simulator --profile tiny [--port 8001] [--host 127.0.0.1] [-p key=value ...] [--print]

Serves ``outputs/<profile>/simulator/`` under the name ``simulator.served_name``: the full model,
or, when notebook 03 saved a LoRA adapter, the base with the adapter as a named module (the base
itself is then ``<served_name>-base``). Engine settings come from the profile's ``vllm:`` section with
its ``simulator_vllm:`` section's keys in place (``Profile.simulator_vllm_config``), tensor and data
parallelism included. It listens on the first of ``simulator.url``'s URLs unless ``--port`` says
otherwise: start one server per URL (``--port``) for a list. Then run with ``-p simulator.serve=http``
(and ``simulator.url`` if not the default). ``--print`` shows the command without starting it. The
server takes one CPU core per worker on a CPU build, or tensor x data parallel GPUs; Ctrl-C stops it.

vLLM's own ``vllm serve`` command fails in the CPU build (it looks for a package named ``vllm``),
so this starts ``python -m vllm.entrypoints.openai.api_server``, which works in both builds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from . import config
from .generation.vllm_backend import checkpoint_dtype, engine_args, prepare_environment

FLAGS = {"dtype": "--dtype", "max_model_len": "--max-model-len", "max_num_seqs": "--max-num-seqs",
         "seed": "--seed", "kv_cache_memory_bytes": "--kv-cache-memory-bytes",
         "gpu_memory_utilization": "--gpu-memory-utilization", "tensor_parallel_size": "--tensor-parallel-size",
         "data_parallel_size": "--data-parallel-size"}


def command(profile, host: str | None = None, port: int | None = None, folder: str | Path | None = None) -> list[str]:
    """The server's command line for the profile's fine-tuned simulator (or the one in ``folder``), at the
    first of ``simulator.url``'s URLs unless ``host`` or ``port`` say otherwise."""
    url = urlparse(profile.simulator.urls[0])
    host, port = host or url.hostname or "127.0.0.1", port or url.port or 8001
    sim, name, vcfg = Path(folder or profile.simulator_dir), profile.simulator.served_name, profile.simulator_vllm_config
    adapter = sim / "adapter_config.json"
    if adapter.exists():
        base = Path(profile.simulator_path)
        rank = json.loads(adapter.read_text()).get("r", profile.simulator.lora_r)
        model = [str(base), "--served-model-name", f"{name}-base", "--enable-lora", "--max-lora-rank", str(rank),
                 "--lora-modules", f"{name}={sim}"]
        weights = base if (base / "config.json").exists() else None
    elif (sim / "config.json").exists():
        model, weights = [str(sim), "--served-model-name", name], sim
    else:
        raise FileNotFoundError(f"no fine-tuned simulator in {sim}: run notebook 03 first")
    dtype = vcfg.dtype if vcfg.dtype != "auto" else (checkpoint_dtype(weights) if weights else "auto")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", *model,
           "--host", host, "--port", str(port)]
    for key, value in engine_args(vcfg, dtype).items():
        if key in FLAGS:
            cmd += [FLAGS[key], str(value)]
    cmd += ["--enforce-eager"] if vcfg.enforce_eager else []
    cmd += ["--enable-prefix-caching" if vcfg.enable_prefix_caching else "--no-enable-prefix-caching"]
    return cmd


def wait_until_ready(url: str, timeout_s: float = 300.0, process: subprocess.Popen | None = None) -> None:
    """Poll ``<url>/models`` until the server answers; an error if ``process`` exits or time runs out."""
    import requests
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the simulator server for {url} exited with code {process.returncode} before it was ready")
        try:
            if requests.get(f"{url.rstrip('/')}/models", timeout=5).ok:
                return
        except requests.exceptions.RequestException:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"the simulator server at {url} was not ready after {timeout_s:g} s")


def start(profile, host: str | None = None, port: int | None = None, log=None,
          folder: str | Path | None = None) -> subprocess.Popen:
    """Start the server in the background (stop it with ``.terminate()``)."""
    prepare_environment()
    return subprocess.Popen(command(profile, host, port, folder), stdout=log, stderr=subprocess.STDOUT if log else None,
                            env=dict(os.environ))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zslib.serve_simulator", description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--host")
    ap.add_argument("--port", type=int)
    ap.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                    help="override a profile value (YAML syntax), e.g. -p vllm.kv_cache_memory_bytes=536870912")
    ap.add_argument("--print", action="store_true", help="print the command and exit")
    args = ap.parse_args(argv)
    from .pipeline import parse_overrides
    profile = config.load_profile(args.profile, parse_overrides(args.param))
    cmd = command(profile, args.host, args.port)
    print(" ".join(cmd), flush=True)
    if args.print:
        return 0
    prepare_environment()
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
