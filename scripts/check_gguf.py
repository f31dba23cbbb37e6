"""Check that llama.cpp's converter reads a router_tune export, and that the GGUF holds the trained routers.

    python scripts/check_gguf.py runs/demo/export [--routers runs/demo/routers.safetensors]

The converter is pure Python, vendored in the llama-cpp-python sdist on PyPI: downloaded once into
build/llama.cpp, it converts the export to an f32 GGUF, and every router tensor read back with gguf-py
(`blk.N.ffn_gate_inp.weight`) is compared with the export's (and the trained routers when given).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from safetensors import safe_open

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
CACHE = Path(__file__).resolve().parent.parent / "build" / "llama.cpp"


def converter() -> Path:
    """The vendored llama.cpp tree (converter + gguf-py), downloaded and extracted once."""
    if (CACHE / "convert_hf_to_gguf.py").is_file():
        return CACHE
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", LLAMA_CPP_PYTHON, "-d", tmp],
            check=True,
        )
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            prefix = tar.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
            wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")  # the script, its package, gguf-py
            members = [
                m for m in tar.getmembers() if m.name.startswith(prefix) and m.name[len(prefix) :].startswith(wanted)
            ]
            for m in members:
                m.name = m.name[len(prefix) :]
            tar.extractall(CACHE, members=members, filter="data")
    return CACHE


def export_routers(model_dir: Path) -> dict[int, np.ndarray]:
    routers = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                if name.endswith("block_sparse_moe.gate.weight"):
                    routers[int(name.split(".")[2])] = f.get_tensor(name).float().numpy()
    if not routers:
        sys.exit(f"{model_dir} has no legacy-layout routers: export it with --layout legacy")
    return routers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a legacy-layout export (router-tune export ... --layout legacy)")
    parser.add_argument("--routers", type=Path, help="the run's routers.safetensors, compared too")
    parser.add_argument("--outfile", type=Path, help="GGUF path (default: a temporary file)")
    args = parser.parse_args()

    tree = converter()
    outfile = args.outfile or Path(tempfile.mkdtemp()) / "model-f32.gguf"
    env = {"PYTHONPATH": f"{tree}:{tree / 'gguf-py'}", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(args.model), "--outfile", str(outfile)]
    subprocess.run([*cmd, "--outtype", "f32"], check=True, env=env)

    sys.path.insert(0, str(tree / "gguf-py"))
    from gguf import GGUFReader

    tensors = {t.name: np.asarray(t.data) for t in GGUFReader(str(outfile)).tensors}
    expected = export_routers(args.model)
    trained = {}
    if args.routers:
        with safe_open(str(args.routers), "pt") as f:
            trained = {int(k.split(".")[2]): f.get_tensor(k).numpy() for k in f.keys() if k.endswith("mlp.gate.weight")}
    for layer, weight in sorted(expected.items()):
        got = tensors[f"blk.{layer}.ffn_gate_inp.weight"].reshape(weight.shape)
        np.testing.assert_array_equal(got, weight)
        if layer in trained:
            np.testing.assert_allclose(got, trained[layer], rtol=0, atol=float(np.abs(trained[layer]).max()) * 2**-7)
    print(
        f"{outfile}: {len(tensors)} tensors; routers of {len(expected)} layers equal the export's"
        + (" and the trained routers" if trained else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
